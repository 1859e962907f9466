"""LoRA adapters on our decoder, with peft: low-rank updates ``W + (alpha / r)·B·A`` on chosen linear
layers, everything else frozen. The export merges them back, so a LoRA run writes an ordinary
checkpoint that serving and later stages load like any other.
"""
from __future__ import annotations

from typing import Sequence

import torch


def add_lora(model: torch.nn.Module, rank: int, alpha: float, dropout: float, targets: Sequence[str]):
    """``model`` with adapters on the linear layers named ``targets`` (e.g. "wq", "w1"); only the
    adapters train (B starts at zero, so the adapted model starts equal to ``model``)."""
    from peft import LoraConfig, LoraModel

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    return LoraModel(model, config, "default")


def merged(model) -> torch.nn.Module:
    """The base model with every adapter folded into its weights (adapters removed)."""
    return model.merge_and_unload()


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
