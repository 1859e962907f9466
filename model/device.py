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


# Dense bf16 tensor-core peaks from the datasheets (FLOP/s, half the "with sparsity" figure), used for
# MFU on GPUs. Matched against torch.cuda.get_device_name in this order, so the PCIe / NVL parts (lower
# clocks and power) are found before the SXM part that shares their family name.
GPU_PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12, "H200": 989e12,
                 "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12}


def datasheet_peak_for(name: str) -> float | None:
    """The datasheet peak for a CUDA device name such as "NVIDIA H100 80GB HBM3"; None when unknown."""
    return next((peak for key, peak in GPU_PEAK_BF16.items() if key in name), None)


def datasheet_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return datasheet_peak_for(torch.cuda.get_device_name(device))


def measure_matmul_flops(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                         size: int | None = None, repeats: int | None = None) -> float:
    """Achieved FLOP/s of a square matmul on this device: the practical peak for MFU on CPUs."""
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 1024)
    repeats = repeats or (10 if device.type == "cuda" else 8)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    import time

    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)
