"""``groundup reward``: a reward model trained on preference pairs (Bradley–Terry), a Task of the one core.

Loss per pair: ``-log σ(r_chosen - r_rejected - margin)``, plus TRL's optional centring term
``c·(r_chosen + r_rejected)²`` that keeps scores near zero. The model is our decoder with a scalar head
on the hidden state of the reply's closing ``<|end|>`` (``model/reward.py``), started from the SFT
model (else pretraining, or ``--from``). The validation reward mean and standard deviation are stored
with the model (``reward.json``) for PPO's normalisation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from pipelines.cli import stage_main
from pipelines.posttrain import ModelSource, PostTrainConfig, common_flags, epochs
from pipelines.preferences import PairBatch, PairBatches, prepare_pair_stage
from pipelines.train.task import Figures, StepContext, TaskDefaults, TaskLoss, decay_groups

STAGE = "reward"


class Config(PostTrainConfig):
    TRAIN_DEFAULTS: ClassVar[dict[str, Any]] = {"optimizer": {"lr": 5e-5}, "length": {"steps": 100}}
    head_lr_scale: float = Field(10.0, gt=0, description="the new score head's learning rate / the peak")
    center_coefficient: float = Field(0.0, ge=0, description="TRL's centring term weight (0.01 is common)")


CLI_FLAGS = common_flags("--pairs", "preference pairs: JSONL/Parquet file or directory (repeatable; default: "
                                    "<run>/prefs/, else the built-in rule-labelled pairs)")


def reward_scores(model, batch: PairBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from model.reward import last_token_scores

    scores = last_token_scores(model(batch.both.tokens.to(device)), batch.both.lengths)
    return scores[:batch.pairs], scores[batch.pairs:]


@dataclass
class RewardTask(PairBatches, TaskDefaults):
    source: ModelSource = None  # type: ignore[assignment]
    head_lr_scale: float = 10.0
    center_coefficient: float = 0.0
    name: str = STAGE
    progress_figures: tuple[str, ...] = ("accuracy", "margin")

    def build_model(self) -> torch.nn.Module:
        from model.reward import RewardModel, load_reward_model

        if self.source.kind == "reward":  # continue a reward model
            return load_reward_model(self.source.path)
        return RewardModel.from_language_model(self.source.load_language_model())

    def param_groups(self, model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        return decay_groups(model, weight_decay, {"head.": self.head_lr_scale})

    def _terms(self, model, batch: PairBatch, device: torch.device):
        chosen, rejected = reward_scores(model, batch, device)
        losses = -F.logsigmoid(chosen - rejected - batch.margins.to(device))
        if self.center_coefficient:
            losses = losses + self.center_coefficient * (chosen + rejected) ** 2
        return losses, chosen.detach().double(), rejected.detach().double()

    def loss(self, ctx: StepContext, batch: PairBatch) -> TaskLoss:
        losses, chosen, rejected = self._terms(ctx.model, batch, ctx.device)
        n = batch.pairs
        return TaskLoss(losses.sum(), tokens=batch.both.real_tokens, metrics={
            "accuracy": (float((chosen > rejected).sum()), n), "rewards/chosen": (float(chosen.sum()), n),
            "rewards/rejected": (float(rejected.sum()), n), "margin": (float((chosen - rejected).sum()), n)})

    def eval_figures(self, ctx: StepContext, batch: PairBatch) -> Figures:
        losses, chosen, rejected = self._terms(ctx.model, batch, ctx.device)
        n = batch.pairs
        both = torch.cat([chosen, rejected])
        return {"loss": (float(losses.sum()), n), "accuracy": (float((chosen > rejected).sum()), n),
                "chosen": (float(chosen.sum()), n), "rejected": (float(rejected.sum()), n),
                "reward": (float(both.sum()), 2 * n), "reward_sq": (float((both ** 2).sum()), 2 * n)}

    def eval_summary(self, means: dict[str, float]) -> dict[str, float]:
        variance = max(means["reward_sq"] - means["reward"] ** 2, 0.0)
        return {"val_loss": means["loss"], "val_accuracy": means["accuracy"], "val_rewards/chosen": means["chosen"],
                "val_rewards/rejected": means["rejected"], "val_margin": means["chosen"] - means["rejected"],
                "val_reward_mean": means["reward"], "val_reward_std": variance ** 0.5}

    def export(self, state_dict: dict[str, torch.Tensor], directory: Path, figures: dict[str, float]) -> None:
        from model.reward import RewardModel, save_reward_model

        model = RewardModel(self.source.model_config())
        model.load_state_dict(state_dict, strict=False)  # a tied output weight may be absent
        stats = {"mean": figures.get("val_reward_mean", 0.0), "std": figures.get("val_reward_std", 1.0) or 1.0,
                 "val_accuracy": figures.get("val_accuracy")}
        save_reward_model(model, directory, self.source.load_tokenizer(), stats)


def prepare(config: Config):
    def make_task(train_set, validation_set, order, source) -> RewardTask:
        return RewardTask(train_set=train_set, validation_set=validation_set, order=order,
                          eval_max_rows=config.train.eval.max_rows, source=source,
                          head_lr_scale=config.head_lr_scale, center_coefficient=config.center_coefficient)

    return prepare_pair_stage(config, STAGE, make_task, allow_reward=True)


def run(config: Config) -> dict[str, Any]:
    from pipelines.train.stage import TrainingJob, check_resume, run_training

    started = time.time()
    check_resume(config, STAGE)
    spec, source, examples, use_gpu = prepare(config)
    n_train, n_validation = len(spec.task.train_set), len(spec.task.validation_set)
    print(f"{STAGE}: from {source.path}: {source.model_config().describe()} + a score head", flush=True)
    print(f"{STAGE}: {spec.plan.describe()} (pairs as sequences; {epochs(spec.plan, n_train):.2f} epochs)", flush=True)
    job = TrainingJob(
        stage=STAGE, config=config, spec=spec, use_gpu=use_gpu, title=f"reward model — {config.run}",
        inputs={"model": source.path, "pairs": examples.sources},
        counts={"train_pairs": n_train, "validation_pairs": n_validation, "rejected": dict(examples.rejects.counts),
                "epochs": epochs(spec.plan, n_train)},
        summary_figures=("final_train_loss", "start_val_accuracy", "val_accuracy", "val_reward_mean", "val_reward_std"))
    return run_training(job, started)


if __name__ == "__main__":
    stage_main(STAGE)
