"""Post-training figures (issue 10), printed as ONE JSON line, side by side in one run:

- SFT tokens/s against pretraining tokens/s on the same model, micro-batch size and process (a bare
  in-process loop over each Task's own batches and loss: the ratio measures what masking and padding
  cost; target >= 0.8). SFT counts real tokens only (padding excluded);
- the reward model's held-out accuracy on the built-in rule-labelled pairs and DPO's held-out
  implicit-reward accuracy, from real `groundup reward` / `groundup dpo` runs (Ray Train + DeepSpeed);
- LoRA rank 8 against full fine-tuning: trainable parameters, tokens/s and held-out SFT loss after the
  same number of steps.

Needs a run directory with `pretrain/model` and `data/` (e.g. the quickstart's). Writes `sft/`,
`reward/` and `dpo/` into it.
Run: python benchmarks/bench_posttrain.py --run runs/quickstart [--steps 40] [--stage-steps 60]
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def bare_steps(task, steps: int, lr: float, micro: int, count_real_tokens: bool) -> dict:
    """Forward, backward and AdamW over the Task's own micro-batches, one process, no DeepSpeed."""
    from pipelines.train.task import StepContext

    torch.manual_seed(0)
    model = task.build_model().train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ctx = StepContext(model, None, torch.device("cpu"))
    tokens, seconds = 0, 0.0
    for step in range(steps):
        batches = task.train_micro_batches(step, 0, 1, micro)
        started = time.perf_counter()
        for batch in batches:
            out = task.loss(ctx, batch)
            (out.total / task.count(batch)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:  # skip warm-up
            seconds += time.perf_counter() - started
            tokens += sum((b.real_tokens if count_real_tokens else b.numel()) for b in batches)
    return {"model": model, "tokens_per_s": tokens / seconds, "trainable": sum(p.numel() for p in params)}


def held_out_loss(task, model) -> float:
    from pipelines.train.task import StepContext

    ctx = StepContext(model.eval(), None, torch.device("cpu"))
    total = count = 0.0
    with torch.no_grad():
        for batch in task.eval_batches(0, 1, 16):
            figures = task.eval_figures(ctx, batch)
            total += figures["loss"][0]
            count += figures["loss"][1]
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="runs/quickstart")
    parser.add_argument("--steps", type=int, default=30, help="bare-loop steps per measurement")
    parser.add_argument("--stage-steps", type=int, default=60, help="reward and DPO steps")
    parser.add_argument("--micro", type=int, default=16)
    args = parser.parse_args()
    run = Path(args.run)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from pipelines import dpo, pretrain, reward, sft
    from pipelines.config import build_config

    micro = args.micro
    common = ["train.use_gpu=false", "train.precision.dtype=fp32", f"train.batch.micro_batch_size={micro}"]
    pre_spec, *_ = pretrain.prepare(build_config(pretrain.Config, overrides=[
        f"run={run}", *common, f"train.batch.global_batch_tokens={micro * 256}"]))
    sft_config = build_config(sft.Config, overrides=[f"run={run}", *common, f"train.batch.global_batch_sequences={micro}",
                                                     "train.eval.max_rows=128"])
    sft_spec, *_ = sft.prepare(sft_config)
    pre = bare_steps(pre_spec.task, args.steps, 1e-3, micro, count_real_tokens=False)
    full = bare_steps(sft_spec.task, args.steps, 1e-3, micro, count_real_tokens=True)
    lora_spec, *_ = sft.prepare(build_config(sft.Config, overrides=[
        f"run={run}", *common, f"train.batch.global_batch_sequences={micro}", "train.eval.max_rows=128",
        "lora.rank=8"]))
    lora = bare_steps(lora_spec.task, args.steps, 5e-3, micro, count_real_tokens=True)
    figures = {
        "pretrain_tokens_per_s": round(pre["tokens_per_s"], 1),
        "sft_tokens_per_s": round(full["tokens_per_s"], 1),
        "sft_vs_pretrain_tokens_per_s": round(full["tokens_per_s"] / pre["tokens_per_s"], 3),
        "full_trainable_parameters": full["trainable"], "lora_r8_trainable_parameters": lora["trainable"],
        "lora_r8_tokens_per_s": round(lora["tokens_per_s"], 1),
        "lora_vs_full_tokens_per_s": round(lora["tokens_per_s"] / full["tokens_per_s"], 3),
        "full_held_out_loss": round(held_out_loss(sft_spec.task, full["model"]), 4),
        "lora_r8_held_out_loss": round(held_out_loss(lora_spec.task, lora["model"]), 4),
        "bare_loop_steps": args.steps,
    }
    # Real stages: SFT (so reward and DPO start from a chat model), the reward model, DPO.
    if not (run / "sft" / "model" / "config.json").is_file():
        sft.run(build_config(sft.Config, overrides=[f"run={run}", "train.length.steps=100", "train.optimizer.lr=1e-3",
                                                    f"train.batch.micro_batch_size={micro}"]))
    stage = [f"run={run}", f"train.length.steps={args.stage_steps}", "train.optimizer.lr=5e-4",
             f"train.batch.micro_batch_size={micro}", f"train.eval.every_steps={args.stage_steps}",
             "train.eval.max_rows=400"]
    started = time.perf_counter()
    reward_figures = reward.run(build_config(reward.Config, overrides=stage))["figures"]
    reward_s = time.perf_counter() - started
    dpo_figures = dpo.run(build_config(dpo.Config, overrides=stage))["figures"]
    figures.update({
        "reward_held_out_accuracy": round(reward_figures["val_accuracy"], 4),
        "reward_start_held_out_accuracy": round(reward_figures["start_val_accuracy"], 4),
        "dpo_held_out_implicit_reward_accuracy": round(dpo_figures["val_rewards/accuracies"], 4),
        "dpo_held_out_margin": round(dpo_figures["val_rewards/margins"], 4),
        "reward_wall_s": round(reward_s, 1), "stage_steps": args.stage_steps,
    })
    assert all(not isinstance(v, float) or math.isfinite(v) for v in figures.values())
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
