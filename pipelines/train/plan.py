"""Turn the typed config into concrete numbers: batch shape, accumulation, steps, tokens, FLOPs."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from pipelines.config import ConfigError
from pipelines.train.config import TrainConfig


@dataclass(frozen=True)
class TrainPlan:
    world_size: int
    sequence_length: int
    micro_batch_size: int
    grad_accum_steps: int
    total_steps: int
    precision: str  # "bf16" | "fp16" | "fp32"
    flops_per_token: float
    num_parameters: int

    @property
    def global_batch_sequences(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_sequences * self.sequence_length

    @property
    def total_tokens(self) -> int:
        return self.total_steps * self.tokens_per_step

    @property
    def total_flops(self) -> float:
        return self.total_tokens * self.flops_per_token

    def to_dict(self) -> dict:
        return {**asdict(self), "global_batch_sequences": self.global_batch_sequences,
                "tokens_per_step": self.tokens_per_step, "total_tokens": self.total_tokens,
                "total_flops": self.total_flops}

    def describe(self) -> str:
        return (f"{self.total_steps:,} steps x {self.tokens_per_step:,} tokens/step "
                f"({self.global_batch_sequences} seqs of {self.sequence_length} = {self.micro_batch_size} micro x "
                f"{self.grad_accum_steps} accum x {self.world_size} workers) = {self.total_tokens:,} tokens, "
                f"{self.total_flops:.3g} FLOPs ({self.flops_per_token:.3g}/token, "
                f"{self.total_tokens / max(self.num_parameters, 1):.2f} tokens/parameter), {self.precision}")


def resolve_precision(requested: str, has_gpu: bool, gpu_bf16: bool) -> str:
    if requested != "auto":
        if requested == "fp16" and not has_gpu:
            raise ConfigError("config field 'train.precision.dtype': fp16 needs a GPU (use bf16 or fp32 on CPU)")
        return requested
    if not has_gpu or gpu_bf16:
        return "bf16"  # CPUs run bf16 autocast everywhere (fast with AVX512-BF16/AMX)
    return "fp16"


def make_plan(config: TrainConfig, sequence_length: int, flops_per_token: float, num_parameters: int,
              precision: str) -> TrainPlan:
    world, micro = config.num_workers, config.batch.micro_batch_size
    wanted_sequences = config.batch.global_batch_sequences or max(1, round(config.batch.global_batch_tokens / sequence_length))
    accum = max(1, round(wanted_sequences / (micro * world)))
    tokens_per_step = micro * accum * world * sequence_length
    length = config.length
    if length.steps is not None:
        steps = length.steps
    elif length.tokens is not None:
        steps = math.ceil(length.tokens / tokens_per_step)
    elif length.flops is not None:
        steps = math.ceil(length.flops / flops_per_token / tokens_per_step)
    else:
        steps = math.ceil(length.tokens_per_parameter * num_parameters / tokens_per_step)
    return TrainPlan(world_size=world, sequence_length=sequence_length, micro_batch_size=micro,
                     grad_accum_steps=accum, total_steps=max(1, steps), precision=precision,
                     flops_per_token=flops_per_token, num_parameters=num_parameters)
