"""The contract between the training loop and a training stage (pretraining, SFT, reward modelling, DPO).

A Task supplies what differs between stages: the model(s), the batches, the loss of a micro-batch,
the validation figures, samples and the export. The loop (``loop.py``) owns everything they share.

Losses are **sums with counts**, never means: ``count(batch)`` says how many items (target tokens,
pairs) a micro-batch covers before it runs, ``loss`` returns the sum over them, and the loop divides
by the count of the whole optimizer step across micro-batches and ranks. Averaging micro-batch means
instead is biased whenever the count varies (assistant masks, padding, uneven pairs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

Figures = dict[str, tuple[float, float]]  # name -> (sum, count): the loop adds them over batches and ranks


@dataclass
class StepContext:
    """What a Task's loss and evaluation see: the trained engine, the frozen model(s) (None, a module, or
    a dict of them), the device; for Tasks that drive their own step (PPO), the other trained engines
    by name, this worker's rank, the world size and the ZeRO stage."""

    model: Any
    frozen: Any
    device: torch.device
    trained: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    world: int = 1
    zero_stage: int = 0


@dataclass
class StepResult:
    """What a Task that drives its own optimizer step (``train_step``) hands back to the loop."""

    loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    tokens: int | None = None


@dataclass
class TaskLoss:
    total: torch.Tensor  # differentiable sum of the per-item losses of the micro-batch
    tokens: int = 0  # tokens the forward pass processed (for tokens/s)
    metrics: Figures = field(default_factory=dict)  # averaged by the loop, logged beside the loss


class Task(Protocol):
    """The task-specific part of training. Must be picklable (it travels to every worker): ship paths, not arrays."""

    name: str
    progress_figures: tuple[str, ...]  # metrics shown on the progress line besides the loss

    def build_model(self) -> torch.nn.Module: ...

    def build_frozen(self) -> torch.nn.Module | None: ...  # a model used without gradients (DPO's reference)

    def param_groups(self, model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]: ...

    def train_micro_batches(self, step: int, rank: int, world: int, micro_batch_size: int) -> Sequence[Any]: ...

    def count(self, batch: Any) -> int: ...

    def loss(self, ctx: StepContext, batch: Any) -> TaskLoss: ...

    def eval_batches(self, rank: int, world: int, micro_batch_size: int) -> Sequence[Any]: ...

    def eval_figures(self, ctx: StepContext, batch: Any) -> Figures: ...

    def eval_summary(self, means: dict[str, float]) -> dict[str, float]: ...

    def samples(self, state_dict: dict[str, torch.Tensor]) -> list[str]: ...

    # ``figures``: the latest evaluation's (a reward model stores its validation mean and spread with it)
    def export(self, state_dict: dict[str, torch.Tensor], directory: Path, figures: dict[str, float]) -> None: ...

    def data_position(self, step: int) -> dict[str, int]: ...


class TaskDefaults:
    """Mixin with the defaults most Tasks keep. Optional hooks the loop looks for:

    - ``build_trained() -> dict[name, (module, lr_scale)]``: more trained models (PPO's critic), each a
      DeepSpeed engine with its own optimizer, checkpointed with the main one;
    - ``train_step(ctx, step) -> StepResult``: the Task runs a whole optimizer step itself (PPO: rollouts,
      then several epochs of mini-batches over actor and critic) instead of the loop's micro-batches;
    - ``state() -> dict`` / ``restore(state)``: Task state saved in checkpoints (PPO's KL controller).
    """

    progress_figures: tuple[str, ...] = ()

    def build_frozen(self) -> torch.nn.Module | None:
        return None

    def param_groups(self, model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        return decay_groups(model, weight_decay)

    def samples(self, state_dict: dict[str, torch.Tensor]) -> list[str]:
        return []


def decay_groups(model: torch.nn.Module, weight_decay: float, lr_scale: dict[str, float] | None = None,
                 ) -> list[dict[str, Any]]:
    """Weight decay on matrices only; norms' gains are left alone (as in GPT-2/Llama training).

    ``lr_scale`` maps a parameter-name prefix (e.g. ``"head."``) to a learning-rate multiplier: those
    parameters get groups of their own (the loop's schedule multiplies each group's ``lr``)."""
    lr_scale = lr_scale or {}
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        scale = next((s for prefix, s in lr_scale.items() if name.startswith(prefix)), 1.0)
        groups.setdefault((scale, param.dim() >= 2), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decays else 0.0, "lr_scale": scale}
            for (scale, decays), params in sorted(groups.items(), key=lambda item: (item[0][0], not item[0][1]))]
