"""Learning-rate schedules as multipliers of the peak rate, one value per optimizer step."""
from __future__ import annotations

import math
from dataclasses import dataclass

from pipelines.train.config import ScheduleConfig


@dataclass(frozen=True)
class LRSchedule:
    """Picklable (so DeepSpeed's scheduler state and Ray can carry it) multiplier ``step -> factor``."""

    kind: str
    total_steps: int
    warmup_steps: int
    decay_steps: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        # wsd: hold the peak, then decay linearly to min_ratio over the last decay_steps.
        decay_start = self.total_steps - self.decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / max(1, self.decay_steps))
        return 1.0 - (1 - self.min_ratio) * progress


def make_schedule(config: ScheduleConfig, total_steps: int) -> LRSchedule:
    warmup = config.warmup_steps if config.warmup_steps is not None else int(config.warmup_fraction * total_steps)
    warmup = min(warmup, max(0, total_steps - 1))
    decay = max(1, round(config.decay_fraction * total_steps))
    decay = min(decay, max(1, total_steps - warmup))
    return LRSchedule(config.kind, total_steps, warmup, decay, config.min_lr_ratio)
