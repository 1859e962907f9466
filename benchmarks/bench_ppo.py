"""PPO figures (issue 11), printed as ONE JSON line, side by side in one run:

- the built-in rule score (share of held-out replies that follow the rule) and the KL to the reference
  on held-out prompts before and after PPO (the stage's own evaluation at iteration 0 and at the end), with
  the reward before and after;
- wall time per iteration split into rollout (sampling, scoring, reference passes) and update;
- rollout sampling tokens/s inside the PPO worker against the serving engine's batched tokens/s
  (``serving.engine.Engine``, what each replica runs) on the same model, batch, lengths and temperature
  in a plain process (target >= 0.5).

Default: the quickstart's PPO recipe (GRPO rewarded by the built-in rule; needs only `sft/model`).
``--reward-model``: GAE with the critic and reward from `<run>/reward/model` instead.
Writes `ppo/` into the run.
Run: python benchmarks/bench_ppo.py --run runs/quickstart [--iterations 20] [--reward-model]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def engine_tokens_per_s(model_dir: Path, prompts: list[list[dict]], max_new_tokens: int, temperature: float,
                        seed: int) -> float:
    """The serving engine's tokens/s with every prompt in one batch (its KV-cache rows = the batch)."""
    from model.checkpoint import load_model, load_tokenizer
    from model.generate import SamplingParams
    from serving.engine import Engine

    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    encoded = [tokenizer.apply_chat_template(p, add_generation_prompt=True).ids for p in prompts]
    engine = Engine(model, tokenizer, max_batch_size=len(encoded))
    tokens = [0]

    def count(event) -> None:
        if event.token_id is not None:  # the stop token too, as the rollout counts its sampled tokens
            tokens[0] += 1

    def one_pass(offset: int) -> float:
        tokens[0] = 0
        started = time.perf_counter()
        for i, prompt in enumerate(encoded):
            engine.submit(prompt, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                                 seed=seed + offset + i), count)
        engine.run_until_idle()
        return tokens[0] / (time.perf_counter() - started)

    one_pass(10_000)  # warm-up
    return sum(one_pass(1000 * k) for k in range(3)) / 3  # the mean, as the rollout figure is a mean


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="runs/quickstart")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per iteration")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--reward-model", action="store_true", help="GAE against <run>/reward/model")
    parser.add_argument("overrides", nargs="*", help="stage config overrides, e.g. kl.coef=0.1")
    args = parser.parse_args()
    run = Path(args.run)

    from pipelines import ppo
    from pipelines.config import build_config
    from pipelines.data.instructions import builtin_prompts
    from pipelines.quickstart import PPO_RECIPE
    from pipelines.train.metrics import read_metrics

    common = [f"run={run}", f"train.length.steps={args.iterations}", f"train.eval.every_steps={args.iterations}",
              f"algo.prompts_per_iteration={args.prompts}", f"rollout.max_new_tokens={args.max_new_tokens}", *args.overrides]
    if args.reward_model:
        config = build_config(ppo.Config, overrides=[*common, "train.eval.max_rows=128", "train.optimizer.lr=1e-4",
                                                     "kl.coef=0.05", "rollout.temperature=0.7"])
    else:
        config = build_config(ppo.Config, PPO_RECIPE, overrides=common)
    started = time.perf_counter()
    manifest = ppo.run(config)
    wall = time.perf_counter() - started
    train = [r for r in read_metrics(run / "ppo" / "metrics.jsonl") if r["kind"] == "train"]
    steady = train[1:] or train
    mean = lambda key: sum(r[key] for r in steady) / len(steady)
    rollout_tps = mean("time/generate_tokens_per_s")
    replies = config.algo.prompts_per_iteration * config.algo.group_size  # one worker samples them all
    prompts = [p["prompt"] for p in builtin_prompts("train")[:config.algo.prompts_per_iteration]
               for _ in range(config.algo.group_size)]
    # Like with like: the engine runs in a Ray task holding a PPO worker's CPUs (so the same thread count
    # and environment as the worker's rollouts, and as a serving replica), right after the PPO run.
    import ray

    cpus = config.train.cpus_per_worker
    measure = ray.remote(num_cpus=cpus)(engine_tokens_per_s)
    engine_tps = ray.get(measure.remote(run / "sft" / "model", prompts, args.max_new_tokens,
                                        config.rollout.temperature, 0))
    f = manifest["figures"]
    print(json.dumps({
        "iterations": len(train), "cpus_per_worker": config.train.cpus_per_worker, "prompts_per_iteration": config.algo.prompts_per_iteration,
        "replies_per_iteration": replies, "estimator": config.algo.estimator,
        "rule_score_before": f.get("start_val_rule_score"), "rule_score_after": f.get("val_rule_score"),
        "rule_score_relative_gain": round(f["val_rule_score"] / f["start_val_rule_score"] - 1, 3)
        if f.get("start_val_rule_score") else None,
        "rule_parts_before": f.get("start_val_rule_parts"), "rule_parts_after": f.get("val_rule_parts"),
        "score_before": f.get("start_val_score"), "score_after": f.get("val_score"),
        "kl_before": f.get("start_val_kl"), "kl_after": f.get("val_kl"),
        "rollout_s_per_iteration": round(mean("time/rollout"), 3), "update_s_per_iteration": round(mean("time/update"), 3),
        "rollout_tokens_per_s": round(rollout_tps, 1), "serving_engine_tokens_per_s": round(engine_tps, 1),
        "rollout_vs_serving_engine": round(rollout_tps / engine_tps, 3), "target": 0.5, "wall_s": round(wall, 1),
    }))


if __name__ == "__main__":
    main()
