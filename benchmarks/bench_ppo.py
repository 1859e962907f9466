"""PPO figures (issue 11), printed as ONE JSON line, side by side in one run:

- rule score and KL to the reference on held-out prompts before and after PPO (the stage's own
  evaluation at iteration 0 and at the end), and the reward-model score before and after;
- wall time per iteration split into rollout (sampling, scoring, reference/critic passes) and update;
- rollout sampling tokens/s inside the PPO workers against the generation core's batched tokens/s on the
  same model, batch and lengths in a plain process (what the serving engine runs per replica; target
  >= 0.5).

Needs a run directory with `sft/model` and `reward/model` (e.g. the quickstart's after
`groundup reward --run RUN`). Writes `ppo/` into it.
Run: python benchmarks/bench_ppo.py --run runs/quickstart [--iterations 20]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def generation_tokens_per_s(model_dir: Path, prompts: list[list[dict]], max_new_tokens: int, seed: int) -> float:
    from model.checkpoint import load_model, load_tokenizer
    from model.generate import SamplingParams, generate

    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    encoded = [tokenizer.apply_chat_template(p, add_generation_prompt=True).ids for p in prompts]
    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed + i) for i in range(len(encoded))]
    generate(model, encoded[:4], params[:4], tokenizer)  # warm-up
    started = time.perf_counter()
    completions = generate(model, encoded, params, tokenizer)
    return sum(len(c.sampled_ids) for c in completions) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="runs/quickstart")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    run = Path(args.run)

    from pipelines import ppo
    from pipelines.config import build_config
    from pipelines.data.instructions import builtin_prompts
    from pipelines.train.metrics import read_metrics

    config = build_config(ppo.Config, overrides=[
        f"run={run}", f"train.length.steps={args.iterations}", f"train.eval.every_steps={args.iterations}",
        f"algo.prompts_per_iteration={args.prompts}", f"rollout.max_new_tokens={args.max_new_tokens}",
        "train.eval.max_rows=64", "train.optimizer.lr=1e-4", "kl.coef=0.05"])
    started = time.perf_counter()
    manifest = ppo.run(config)
    wall = time.perf_counter() - started
    train = [r for r in read_metrics(run / "ppo" / "metrics.jsonl") if r["kind"] == "train"]
    steady = train[1:] or train
    mean = lambda key: sum(r[key] for r in steady) / len(steady)  # noqa: E731
    rollout_tps = mean("time/generate_tokens_per_s")
    prompts = [p["prompt"] for p in builtin_prompts("train")[:args.prompts]]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    engine_tps = generation_tokens_per_s(run / "sft" / "model", prompts, args.max_new_tokens, 0)
    f = manifest["figures"]
    print(json.dumps({
        "iterations": len(train), "prompts_per_iteration": args.prompts,
        "rule_score_before": f.get("start_val_rule_score"), "rule_score_after": f.get("val_rule_score"),
        "rule_score_relative_gain": (f["val_rule_score"] / f["start_val_rule_score"] - 1)
        if f.get("start_val_rule_score") else None,
        "score_before": f.get("start_val_score"), "score_after": f.get("val_score"),
        "kl_before": f.get("start_val_kl"), "kl_after": f.get("val_kl"),
        "rollout_s_per_iteration": round(mean("time/rollout"), 3), "update_s_per_iteration": round(mean("time/update"), 3),
        "rollout_tokens_per_s": round(rollout_tps, 1), "generation_core_tokens_per_s": round(engine_tps, 1),
        "rollout_vs_generation_core": round(rollout_tps / engine_tps, 3), "wall_s": round(wall, 1),
    }))


if __name__ == "__main__":
    main()
