"""``groundup pretrain``: next-token prediction on the data stage's packed shards.

The training machinery (Ray Train workers each driving a DeepSpeed engine, checkpoints, resume,
metrics) is the shared core in ``pipelines/train``; this module only adds the pretraining Task
(batches of packed rows, the next-token loss, bits per byte, samples, the safetensors export) and the
stage's config and outputs.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from pipelines.cli import Flag, stage_main
from pipelines.config import ConfigError, StageConfig
from pipelines.rundir import RunDir, join, local_copy
from pipelines.train.config import TrainConfig
from pipelines.train.data import (
    BatchOrder,
    PackedShards,
    bits_per_byte,
    eval_rows,
    shards_from_manifest,
    unigram_bits_per_byte,
)
from pipelines.train.task import Figures, StepContext, TaskDefaults, TaskLoss

STAGE = "pretrain"


class Config(StageConfig):
    model: str = Field("10m", description="model preset (model.config.PRESETS)")
    model_overrides: dict[str, Any] = Field(default_factory=dict, description="ModelConfig fields to change, e.g. n_layers")
    sequence_length: int | None = Field(None, ge=8, description="training context (default: the data's sequence_length)")
    train: TrainConfig = TrainConfig()
    resume: bool = Field(False, description="continue the run's latest complete checkpoint")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a Ray started by this stage (default: all)")


CLI_FLAGS = (
    Flag(("--run",), "run", "run directory holding data/ (outputs go to <run>/pretrain/)"),
    Flag(("--model",), "model", "model preset: 1m, 10m, 125m, 350m, 1.3b, or auto (sized from --flops by the "
         "run's fitted scaling laws: groundup scaling)"),
    Flag(("--seed",), "seed", "seed for initial weights and data order", {"type": int}),
    Flag(("--workers",), "train.num_workers", "Ray Train workers", {"type": int}),
    Flag(("--steps",), "train.length.steps", "train for this many optimizer steps", {"type": int}),
    Flag(("--tokens",), "train.length.tokens", "train on this many tokens", {"type": int}),
    Flag(("--flops",), "train.length.flops", "compute budget in FLOPs (6·N·D)", {"type": float}),
    Flag(("--tokens-per-parameter",), "train.length.tokens_per_parameter", "tokens per parameter (20 = Chinchilla)",
         {"type": float}),
    Flag(("--zero",), "train.zero.stage", "DeepSpeed ZeRO stage 0-3", {"type": int}),
    Flag(("--precision",), "train.precision.dtype", "auto, bf16, fp16 or fp32"),
    Flag(("--lr",), "train.optimizer.lr", "peak learning rate", {"type": float}),
    Flag(("--resume",), "resume", "continue from the latest complete checkpoint", {"action": "store_const", "const": True}),
)


@dataclass
class PretrainTask(TaskDefaults):
    """Packed rows -> next-token cross entropy. Picklable: ships paths, never arrays or models."""

    model_fields: dict[str, Any]
    train_shards: PackedShards
    validation_shards: PackedShards
    order: BatchOrder
    validation_tokens: int
    validation_bytes: int
    tokenizer_path: str
    eval_max_rows: int
    sample_count: int
    sample_tokens: int
    seed: int
    name: str = STAGE

    def model_config(self):
        from model.config import ModelConfig

        return ModelConfig(**self.model_fields)

    def build_model(self) -> torch.nn.Module:
        from model.llama import Transformer

        return Transformer(self.model_config())

    def train_micro_batches(self, step: int, rank: int, world: int, micro_batch_size: int) -> list[torch.Tensor]:
        return [self.train_shards.rows(rows) for rows in self.order.micro_batches(step, rank, world, micro_batch_size)]

    def count(self, batch: torch.Tensor) -> int:
        return batch[:, 1:].numel()

    def _loss_sum(self, model, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
        batch = batch.to(device, non_blocking=True)
        logits = model(batch[:, :-1]).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")

    def loss(self, ctx: StepContext, batch: torch.Tensor) -> TaskLoss:
        return TaskLoss(self._loss_sum(ctx.model, batch, ctx.device), tokens=batch.numel())

    def eval_batches(self, rank: int, world: int, micro_batch_size: int) -> list[torch.Tensor]:
        rows = eval_rows(self.validation_shards.num_rows, self.eval_max_rows, rank, world)
        return [self.validation_shards.rows(rows[i:i + micro_batch_size]) for i in range(0, len(rows), micro_batch_size)]

    def eval_figures(self, ctx: StepContext, batch: torch.Tensor) -> Figures:
        return {"loss": (float(self._loss_sum(ctx.model, batch, ctx.device)), self.count(batch))}

    def eval_summary(self, means: dict[str, float]) -> dict[str, float]:
        mean_loss = means["loss"]
        return {"val_loss": mean_loss, "val_perplexity": math.exp(min(mean_loss, 50.0)),
                "val_bits_per_byte": bits_per_byte(mean_loss, self.validation_tokens, self.validation_bytes)}

    def _model_from(self, state_dict: dict[str, torch.Tensor]):
        from model.llama import Transformer

        model = Transformer(self.model_config())
        model.load_state_dict(state_dict, strict=False)  # a tied output weight may be absent
        return model.eval()

    def samples(self, state_dict: dict[str, torch.Tensor]) -> list[str]:
        from model.generate import SamplingParams, generate
        from model.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(local_copy(self.tokenizer_path))
        prompts = [self.validation_shards.rows([i])[0, :8].tolist()
                   for i in range(min(self.sample_count, self.validation_shards.num_rows))]
        if not prompts:
            return []
        params = SamplingParams(max_new_tokens=self.sample_tokens, temperature=0.8, top_k=50, seed=self.seed)
        completions = generate(self._model_from(state_dict), prompts, params, tokenizer)
        return [tokenizer.decode(p) + " ⟶ " + c.text for p, c in zip(prompts, completions)]

    def export(self, state_dict: dict[str, torch.Tensor], directory: Path, figures: dict[str, float]) -> None:
        from model.checkpoint import save_checkpoint
        from model.tokenizer import Tokenizer

        save_checkpoint(self._model_from(state_dict), directory, Tokenizer.load(local_copy(self.tokenizer_path)),
                        metadata={"stage": STAGE})

    def data_position(self, step: int) -> dict[str, int]:
        return self.order.position(step)


def _read_data(run: RunDir) -> tuple[dict[str, Any], str]:
    """The data stage's outputs and its directory (a local path or an object-store URI)."""
    manifest = run.read_manifest("data")
    outputs = manifest.get("outputs", {})
    missing = [k for k in ("tokenizer", "vocab_size", "sequence_length", "splits") if k not in outputs]
    if missing:
        raise ConfigError(f"run {run.uri}: data/manifest.json lacks outputs {missing} (re-run `groundup data`)")
    for split in ("train", "validation"):
        if split not in outputs["splits"] or not outputs["splits"][split].get("shards"):
            raise ConfigError(f"run {run.uri}: the data stage wrote no {split} shards")
    return outputs, run.uri_of("data")


def prepare(config: Config):
    """Driver-side: model config, data, plan and DeepSpeed config. Raises ConfigError on bad input."""
    from model.config import PRESETS, preset
    from pipelines.scaling import resolve_budget  # --model auto; batch and lr from a budget when not given
    from pipelines.train.deepspeed_config import deepspeed_config
    from pipelines.train.loop import LoopSpec
    from pipelines.train.plan import make_plan, resolve_precision

    config = resolve_budget(config)
    if config.model not in PRESETS:
        raise ConfigError(f"config field 'model': unknown preset {config.model!r} (choose {', '.join(PRESETS)})")
    run = RunDir(config.run)
    data, data_uri = _read_data(run)
    seq = config.sequence_length or int(data["sequence_length"])
    if seq > int(data["sequence_length"]):
        raise ConfigError(f"config field 'sequence_length': {seq} exceeds the data's rows ({data['sequence_length']})")
    try:
        model_config = preset(config.model, **{"vocab_size": int(data["vocab_size"]), "max_seq_len": seq,
                                               **config.model_overrides})
    except (ValueError, TypeError) as err:
        raise ConfigError(f"config field 'model_overrides': {str(err).splitlines()[0]}") from None
    if model_config.vocab_size < int(data["vocab_size"]):
        raise ConfigError(f"config field 'model_overrides.vocab_size': smaller than the tokenizer's {data['vocab_size']}")

    from pipelines.train.trainer import decide_use_gpu

    has_gpu, gpu_bf16 = decide_use_gpu(config.train.use_gpu, config.num_cpus)
    precision = resolve_precision(config.train.precision.dtype, has_gpu, gpu_bf16)
    plan = make_plan(config.train, seq, model_config.flops_per_token(seq), model_config.num_parameters, precision)
    splits = data["splits"]
    train_shards = shards_from_manifest(data_uri, splits["train"], seq)
    validation_shards = shards_from_manifest(data_uri, splits["validation"], seq)
    try:
        order = BatchOrder(train_shards.num_rows, plan.global_batch_sequences, config.seed)
    except ValueError as err:
        raise ConfigError(f"config field 'train.batch.global_batch_tokens': {err}") from None
    eval_cfg = config.train.eval
    task = PretrainTask(model_fields=model_config.model_dump(), train_shards=train_shards,
                        validation_shards=validation_shards, order=order,
                        validation_tokens=int(splits["validation"]["tokens"]),
                        validation_bytes=int(splits["validation"]["bytes"]),
                        tokenizer_path=join(data_uri, data["tokenizer"]), eval_max_rows=eval_cfg.max_rows,
                        sample_count=eval_cfg.samples, sample_tokens=eval_cfg.sample_tokens, seed=config.seed)
    spec = LoopSpec(task=task, train=config.train, plan=plan, deepspeed=deepspeed_config(config.train, plan),
                    out_dir=str(run.working_path(STAGE)), seed=config.seed,
                    publish_uri=None if run.is_local else run.uri_of(STAGE))
    return spec, model_config, data, has_gpu


def run(config: Config) -> dict[str, Any]:
    from pipelines.train.stage import TrainingJob, check_resume, run_training

    started = time.time()
    from pipelines.scaling import resolve_budget  # --model auto; batch and lr from a budget when not given

    config = resolve_budget(config, warn=True)
    check_resume(config, STAGE)
    spec, model_config, data, use_gpu = prepare(config)
    plan, task = spec.plan, spec.task
    print(f"pretrain: model {config.model}: {model_config.describe()}", flush=True)
    print(f"pretrain: {plan.describe()}", flush=True)
    print(f"pretrain: {task.order.steps_per_epoch} steps per epoch of {task.train_shards.num_rows} rows "
          f"({plan.total_steps / task.order.steps_per_epoch:.2f} epochs)", flush=True)
    run_dir = RunDir(config.run)
    train_split = data["splits"]["train"]

    def unigram(records: list[dict[str, Any]]) -> dict[str, Any]:
        value = train_split.get("unigram_bits_per_byte")  # counted by the data stage since it packs the rows
        if value is None:  # data from before it did: count here (downloads object-store shards to this node)
            value = unigram_bits_per_byte(task.train_shards, int(train_split["bytes"]), int(data["vocab_size"]))
        return {"unigram_bits_per_byte": value}

    job = TrainingJob(
        stage=STAGE, config=config, spec=spec, use_gpu=use_gpu, title=f"pretrain {config.model} — {config.run}",
        inputs={"data_manifest": run_dir.uri_of("data", "manifest.json")},
        outputs={"model_config": model_config.model_dump()},
        counts={"parameters": model_config.num_parameters, "sequence_length": plan.sequence_length},
        figures=unigram, summary_figures=("final_train_loss", "val_loss", "val_bits_per_byte", "unigram_bits_per_byte"))
    return run_training(job, started)


if __name__ == "__main__":
    stage_main(STAGE)
