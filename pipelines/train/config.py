"""Typed training settings shared by every training stage (pretrain, SFT, reward)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipelines.config import StrictModel


class OptimizerConfig(StrictModel):
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm to this (0 = off)")


class ScheduleConfig(StrictModel):
    kind: Literal["cosine", "wsd", "constant"] = Field("cosine", description="warmup then cosine decay, "
                                                       "warmup-stable-decay, or warmup then constant")
    warmup_steps: int | None = Field(None, ge=0, description="linear warmup steps (default: warmup_fraction)")
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of the steps spent decaying")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate / peak")


class PrecisionConfig(StrictModel):
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 where the device supports it, else fp16 on GPUs, else fp32")


class ZeroConfig(StrictModel):
    stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage 0-3")
    offload_optimizer: bool = Field(False, description="stage 1-3: keep optimizer states in host memory")


class BatchConfig(StrictModel):
    micro_batch_size: int = Field(8, ge=1, description="sequences per worker per forward pass")
    global_batch_tokens: int = Field(16384, ge=1, description="tokens per optimizer step across all workers; "
                                     "reached with gradient accumulation")
    global_batch_sequences: int | None = Field(None, ge=1, description="sequences (or pairs) per optimizer step "
                                               "across all workers; when set, wins over global_batch_tokens")


class LengthConfig(StrictModel):
    """How long to train: exactly one of these (steps wins when several are given)."""

    steps: int | None = Field(None, ge=1)
    tokens: int | None = Field(None, ge=1)
    flops: float | None = Field(None, gt=0, description="compute budget C = 6·N·D (via flops_per_token)")
    tokens_per_parameter: float | None = Field(None, gt=0, description="e.g. 20 for Chinchilla-optimal")

    @model_validator(mode="after")
    def _one_given(self) -> "LengthConfig":
        if not any(v is not None for v in (self.steps, self.tokens, self.flops, self.tokens_per_parameter)):
            raise ValueError("give one of steps, tokens, flops, tokens_per_parameter")
        return self


class CheckpointConfig(StrictModel):
    every_steps: int = Field(100, ge=1, description="report a Ray Train checkpoint every this many steps")
    keep: int | None = Field(2, ge=1, description="checkpoints kept (CheckpointConfig.num_to_keep); null keeps all")
    export_weights: bool = Field(True, description="include a safetensors export of the weights in each checkpoint")


class EvalConfig(StrictModel):
    every_steps: int = Field(50, ge=1)
    max_rows: int = Field(256, ge=1, description="validation rows evaluated each time (split among workers)")
    samples: int = Field(2, ge=0, description="continuations sampled from the model at each evaluation")
    sample_tokens: int = Field(32, ge=1)
    at_start: bool = Field(False, description="also evaluate before the first step (the starting model's figures)")


class FaultConfig(StrictModel):
    """Fault injection for tests and drills: rank ``crash_rank`` exits abruptly at ``crash_at_step`` once."""

    crash_at_step: int | None = Field(None, ge=1)
    crash_rank: int = Field(0, ge=0)


class TrainConfig(StrictModel):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (one DeepSpeed rank each)")
    cpus_per_worker: float = Field(1, gt=0)
    use_gpu: bool | None = Field(None, description="one GPU per worker; default: when the cluster has GPUs")
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    precision: PrecisionConfig = PrecisionConfig()
    zero: ZeroConfig = ZeroConfig()
    batch: BatchConfig = BatchConfig()
    length: LengthConfig = LengthConfig(steps=100)
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    activation_checkpointing: bool = False
    compile: bool = Field(False, description="torch.compile the model in each worker (in place, so checkpoint "
                          "names stay the same): fused kernels, about 2x tokens/s on GPUs after a minute of "
                          "compiling; first steps are slow")
    log_every: int = Field(10, ge=1, description="progress line every this many steps")
    max_failures: int = Field(2, ge=-1, description="worker failures survived by restoring the last checkpoint")
    stop_at_step: int | None = Field(None, ge=1, description="stop (as if preempted) after this step, "
                                     "without changing the schedule; continue later with --resume")
    fault: FaultConfig = FaultConfig()
