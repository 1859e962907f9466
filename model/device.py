"""Pick the device once (CUDA if present, else CPU) and the precision it supports."""
from __future__ import annotations

import torch


def pick_device(prefer: str | None = None) -> torch.device:
    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def supports_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"  # bf16 autocast works on every CPU (natively fast on AVX512-BF16/AMX)


def autocast_dtype(device: torch.device, precision: str = "bf16") -> torch.dtype | None:
    """The autocast dtype for ``precision`` ('bf16', 'fp16', 'fp32') on ``device``; None = no autocast."""
    if precision == "fp32":
        return None
    if precision == "bf16" and supports_bf16(device):
        return torch.bfloat16
    if device.type == "cuda":
        return torch.float16
    return None
