"""Post-training figures (issue 10), printed as ONE JSON line, side by side in one run:

- SFT tokens/s against pretraining tokens/s on the same model, micro-batch size and process (a bare
  in-process loop over each Task's own batches and loss: the ratio measures what masking and padding
  cost; target >= 0.8). SFT counts real tokens only (padding excluded); the loops take steps in turn,
  so a busy machine's load falls on each alike;
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


class BareLoop:
    """Forward, backward and AdamW over a Task's own micro-batches, one process, no DeepSpeed."""

    def __init__(self, task, lr: float, count_real_tokens: bool):
        from pipelines.train.task import StepContext

        torch.manual_seed(0)
        self.task, self.count_real_tokens = task, count_real_tokens
        self.model = task.build_model().train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.ctx = StepContext(self.model, None, torch.device("cpu"))
        self.tokens, self.seconds = 0, 0.0

    def step(self, step: int, micro: int, measured: bool) -> None:
        batches = self.task.train_micro_batches(step, 0, 1, micro)
        started = time.perf_counter()
        for batch in batches:
            out = self.task.loss(self.ctx, batch)
            (out.total / self.task.count(batch)).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if measured:
            self.seconds += time.perf_counter() - started
            self.tokens += sum((b.real_tokens if self.count_real_tokens else b.numel()) for b in batches)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.params)


def interleaved(loops: list[BareLoop], steps: int, micro: int, warmup: int = 2) -> None:
    """Step every loop in turn, so a busy machine's load drifts over all of them alike."""
    for step in range(steps):
        for loop in loops:
            loop.step(step, micro, measured=step >= warmup)


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
    parser.add_argument("--skip-stages", action="store_true", help="only the in-process tokens/s and LoRA figures")
    args = parser.parse_args()
    run = Path(args.run)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from pipelines import dpo, pretrain, reward, sft
    from pipelines.config import build_config

    micro = args.micro
    common = ["train.use_gpu=false", "train.precision.dtype=fp32", f"train.batch.micro_batch_size={micro}"]
    pre_spec, *_ = pretrain.prepare(build_config(pretrain.Config, overrides=[
        f"run={run}", *common, f"train.batch.global_batch_sequences={micro}"]))
    sft_config = build_config(sft.Config, overrides=[f"run={run}", *common, f"train.batch.global_batch_sequences={micro}",
                                                     "train.eval.max_rows=128"])
    sft_spec, *_ = sft.prepare(sft_config)
    lora_spec, *_ = sft.prepare(build_config(sft.Config, overrides=[
        f"run={run}", *common, f"train.batch.global_batch_sequences={micro}", "train.eval.max_rows=128",
        "lora.rank=8"]))
    pre = BareLoop(pre_spec.task, 1e-3, count_real_tokens=False)
    full = BareLoop(sft_spec.task, 1e-3, count_real_tokens=True)
    lora = BareLoop(lora_spec.task, 5e-3, count_real_tokens=True)
    interleaved([pre, full, lora], args.steps, micro)
    figures = {
        "pretrain_tokens_per_s": round(pre.tokens_per_s, 1),
        "sft_tokens_per_s": round(full.tokens_per_s, 1),
        "sft_vs_pretrain_tokens_per_s": round(full.tokens_per_s / pre.tokens_per_s, 3),
        "full_trainable_parameters": full.trainable, "lora_r8_trainable_parameters": lora.trainable,
        "lora_r8_tokens_per_s": round(lora.tokens_per_s, 1),
        "lora_vs_full_tokens_per_s": round(lora.tokens_per_s / full.tokens_per_s, 3),
        "full_held_out_loss": round(held_out_loss(sft_spec.task, full.model), 4),
        "lora_r8_held_out_loss": round(held_out_loss(lora_spec.task, lora.model), 4),
        "bare_loop_steps": args.steps,
    }
    if args.skip_stages:
        print(json.dumps(figures))
        return
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
