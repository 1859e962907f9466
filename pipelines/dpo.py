"""``groundup dpo``: direct preference optimisation from the SFT model against a frozen reference.

With h = (log π(chosen) - log π(rejected)) - (log π_ref(chosen) - log π_ref(rejected)) summed over
each reply's tokens: the sigmoid loss ``-(1-ε)·log σ(βh) - ε·log σ(-βh)`` (ε: label smoothing) or the
IPO loss ``(h - 1/(2β))²``. The reference is the starting weights, held by every worker as a frozen
model (sharded like the policy under ZeRO-3) and run on the same batch: no precomputed pass, no file of
reference log-probs to keep in step with the batch order, and resume needs nothing extra.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from pipelines.cli import stage_main
from pipelines.posttrain import (
    LoraSettings,
    ModelSource,
    PostTrainConfig,
    add_reply_comparison,
    common_flags,
    epochs,
)
from pipelines.preferences import PairBatch, PairBatches, prepare_pair_stage
from pipelines.train.task import Figures, StepContext, TaskDefaults, TaskLoss

STAGE = "dpo"


class Config(PostTrainConfig):
    TRAIN_DEFAULTS: ClassVar[dict[str, Any]] = {"optimizer": {"lr": 5e-5}, "length": {"steps": 100}}
    beta: float = Field(0.1, gt=0, description="strength of the KL constraint to the reference")
    loss_type: Literal["sigmoid", "ipo"] = Field("sigmoid", description="DPO's sigmoid loss or IPO's squared loss")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="assumed share of flipped labels (sigmoid loss)")


CLI_FLAGS = (*common_flags("--pairs", "preference pairs: JSONL/Parquet file or directory (repeatable; default: "
                                      "<run>/prefs/, else the built-in rule-labelled pairs)"),)


def reply_logps(model, batch: PairBatch, device: torch.device) -> torch.Tensor:
    """Sum of log p over each row's reply tokens: [2n] (chosen rows, then rejected)."""
    from model.scoring import token_logprobs

    tokens = batch.both.tokens.to(device)
    targets = batch.both.targets.to(device)
    picked = token_logprobs(model(tokens[:, :-1]), targets)
    return (picked * (targets != -100)).sum(-1)


@dataclass
class DPOTask(PairBatches, TaskDefaults):
    source: ModelSource = None  # type: ignore[assignment]
    lora: LoraSettings = None  # type: ignore[assignment]
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    name: str = STAGE
    progress_figures: tuple[str, ...] = ("rewards/accuracies", "rewards/margins")

    def build_model(self) -> torch.nn.Module:
        return self.lora.apply(self.source.load_language_model())

    def build_frozen(self) -> torch.nn.Module:
        return self.source.load_language_model()

    def _terms(self, ctx: StepContext, batch: PairBatch):
        n = batch.pairs
        policy = reply_logps(ctx.model, batch, ctx.device)
        with torch.no_grad():
            reference = reply_logps(ctx.frozen, batch, ctx.device).to(policy.dtype)
        chosen_ratio, rejected_ratio = policy[:n] - reference[:n], policy[n:] - reference[n:]
        h = chosen_ratio - rejected_ratio
        if self.loss_type == "ipo":
            losses = (h - 1 / (2 * self.beta)) ** 2
        else:
            eps = self.label_smoothing
            losses = -(1 - eps) * F.logsigmoid(self.beta * h) - eps * F.logsigmoid(-self.beta * h)
        chosen_reward = (self.beta * chosen_ratio).detach().double()
        rejected_reward = (self.beta * rejected_ratio).detach().double()
        figures = {"rewards/chosen": (float(chosen_reward.sum()), n),
                   "rewards/rejected": (float(rejected_reward.sum()), n),
                   "rewards/margins": (float((chosen_reward - rejected_reward).sum()), n),
                   "rewards/accuracies": (float((chosen_reward > rejected_reward).sum()), n),
                   "logps/chosen": (float(policy[:n].detach().sum()), n),
                   "logps/rejected": (float(policy[n:].detach().sum()), n)}
        return losses, figures

    def loss(self, ctx: StepContext, batch: PairBatch) -> TaskLoss:
        losses, figures = self._terms(ctx, batch)
        return TaskLoss(losses.sum(), tokens=batch.both.real_tokens, metrics=figures)

    def eval_figures(self, ctx: StepContext, batch: PairBatch) -> Figures:
        losses, figures = self._terms(ctx, batch)
        return {"loss": (float(losses.sum()), batch.pairs), **figures}

    def eval_summary(self, means: dict[str, float]) -> dict[str, float]:
        return {f"val_{name}": value for name, value in means.items()}

    def export(self, state_dict: dict[str, torch.Tensor], directory: Path, figures: dict[str, float]) -> None:
        from model.checkpoint import save_checkpoint
        from pipelines.sft import language_model_from

        save_checkpoint(language_model_from(self.source, self.lora, state_dict), directory,
                        self.source.load_tokenizer(), metadata={"stage": self.name})


def prepare(config: Config):
    def make_task(train_set, validation_set, order, source) -> DPOTask:
        return DPOTask(train_set=train_set, validation_set=validation_set, order=order,
                       eval_max_rows=config.train.eval.max_rows, source=source, lora=config.lora, beta=config.beta,
                       loss_type=config.loss_type, label_smoothing=config.label_smoothing)

    return prepare_pair_stage(config, STAGE, make_task)


def run(config: Config) -> dict[str, Any]:
    from pipelines.train.stage import TrainingJob, check_resume, run_training

    started = time.time()
    check_resume(config, STAGE)
    spec, source, examples, use_gpu = prepare(config)
    n_train, n_validation = len(spec.task.train_set), len(spec.task.validation_set)
    print(f"{STAGE}: policy and frozen reference from {source.path}: {source.model_config().describe()}", flush=True)
    print(f"{STAGE}: {spec.plan.describe()} (pairs as sequences; {epochs(spec.plan, n_train):.2f} epochs)", flush=True)
    job = TrainingJob(
        stage=STAGE, config=config, spec=spec, use_gpu=use_gpu, title=f"dpo — {config.run}",
        inputs={"model": source.path, "pairs": examples.sources},
        counts={"train_pairs": n_train, "validation_pairs": n_validation, "rejected": dict(examples.rejects.counts),
                "epochs": epochs(spec.plan, n_train)},
        summary_figures=("final_train_loss", "start_val_rewards/margins", "val_rewards/margins",
                         "val_rewards/accuracies"))
    manifest = run_training(job, started)
    return add_reply_comparison(config, STAGE, {"before": source.path}, manifest)


if __name__ == "__main__":
    stage_main(STAGE)
