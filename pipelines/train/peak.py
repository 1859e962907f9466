"""The device peak that MFU is measured against: the GPU's datasheet figure, or this CPU's measured
matmul rate (there is no reliable datasheet number for a shared, frequency-scaling CPU)."""
from __future__ import annotations

import functools
import json
import os
import platform
from pathlib import Path

import torch

from model.device import GPU_PEAK_BF16, datasheet_peak, measure_matmul_flops

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


PEAK_CACHE = Path(os.environ.get("GROUNDUP_PEAK_CACHE", Path.home() / ".cache" / "groundup" / "cpu_peak.json"))


def _cpu_key(precision: str, threads: int) -> str:
    return f"{platform.processor() or platform.machine()}|{os.cpu_count()}cpu|{threads}t|{precision}"


@functools.cache
def cpu_matmul_peak(precision: str = "bf16", threads: int | None = None) -> float:
    """Achieved FLOP/s of a large square matmul in ``precision`` with ``threads`` torch threads.

    A CPU shared with other work measures low now and then, so the best figure ever measured on
    this machine is kept in a small cache file and used when higher than today's (MFU then never
    reads above 100% because the peak was measured while busy).
    """
    previous = torch.get_num_threads()
    threads = threads or previous
    torch.set_num_threads(threads)
    try:
        measure_matmul_flops(PRECISION_DTYPES[precision], "cpu", size=1024, repeats=4)  # warm up
        measured = max(measure_matmul_flops(PRECISION_DTYPES[precision], "cpu", size=1024, repeats=8) for _ in range(2))
    finally:
        torch.set_num_threads(previous)
    key = _cpu_key(precision, threads)
    try:
        cache = json.loads(PEAK_CACHE.read_text()) if PEAK_CACHE.is_file() else {}
        best = max(measured, float(cache.get(key, 0.0)))
        if best > float(cache.get(key, 0.0)):
            PEAK_CACHE.parent.mkdir(parents=True, exist_ok=True)
            tmp = PEAK_CACHE.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({**cache, key: best}))
            os.replace(tmp, PEAK_CACHE)
        return best
    except (OSError, ValueError):  # an unwritable home or a corrupt cache: use today's figure
        return measured


def device_peak_flops(device: torch.device, precision: str = "bf16") -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    if device.type == "cuda":
        peak = datasheet_peak(device)
        if peak is not None:
            # Datasheet dense bf16/fp16 tensor-core peak; fp32 runs as TF32 at half that rate.
            return (peak / 2 if precision == "fp32" else peak), f"datasheet {torch.cuda.get_device_name(device)}"
        return measure_matmul_flops(PRECISION_DTYPES[precision], device), "measured matmul"
    return cpu_matmul_peak(precision, torch.get_num_threads()), f"measured CPU {precision} matmul, {torch.get_num_threads()} threads"


__all__ = ["GPU_PEAK_BF16", "cpu_matmul_peak", "device_peak_flops"]
