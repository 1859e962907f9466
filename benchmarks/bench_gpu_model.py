"""GPU check and MFU of the model alone (issue 2 and 4's GPU figures), as one JSON line.

On a CUDA machine: the matmul peak measured next to the datasheet figure; whether flash attention
runs through scaled_dot_product_attention; greedy generation with and without the KV cache agreeing
on the GPU; and the training MFU of a preset (default 125m at sequence length 1024, bf16) with a
bare PyTorch loop (fused AdamW, bf16 autocast, eager and torch.compile).

Run: python benchmarks/bench_gpu_model.py [--preset 125m --seq 1024 --batch 16 --steps 20]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.config import preset
from model.device import datasheet_peak, measure_matmul_flops, pick_device
from model.generate import SamplingParams, generate
from model.llama import Transformer, language_model_loss


def flash_attention_runs(device: torch.device) -> bool:
    q = torch.randn(2, 8, 256, 64, device=device, dtype=torch.bfloat16)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        return True
    except RuntimeError:
        return False


def train_mfu(name: str, seq: int, batch: int, steps: int, device: torch.device, compile_model: bool,
              peak: float) -> dict:
    torch.manual_seed(0)
    config = preset(name, max_seq_len=seq)
    model = Transformer(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(model) if compile_model else model
    data = torch.randint(0, config.vocab_size, (batch, seq + 1), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            loss = language_model_loss(forward(data[:, :-1]), data[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        step()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    tokens_per_s = batch * seq * steps / elapsed
    achieved = tokens_per_s * config.flops_per_token(seq)
    return {"tokens_per_s": round(tokens_per_s), "tflops": round(achieved / 1e12, 1),
            "mfu": round(achieved / peak, 3), "loss": round(float(loss), 3),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    device = pick_device()
    if device.type != "cuda":
        print(json.dumps({"benchmark": "gpu_model", "error": "no CUDA device"}))
        return
    measured = measure_matmul_flops(torch.bfloat16, device)
    peak = datasheet_peak(device) or measured
    small = Transformer(preset("10m")).to(device).eval()
    params = SamplingParams(max_new_tokens=64, temperature=0, stop_token_ids=())
    prompts = [[5, 6, 7], list(range(10, 40)), [99]]
    cached = generate(small, prompts, params, use_cache=True)
    uncached = generate(small, prompts, params, use_cache=False)
    start = time.perf_counter()
    out = generate(small.to(torch.bfloat16), [[5, 6, 7]] * 16, SamplingParams(max_new_tokens=256, temperature=0,
                                                                                stop_token_ids=()))
    torch.cuda.synchronize(device)
    gen_tps = sum(len(o.token_ids) for o in out) / (time.perf_counter() - start)
    figures = {
        "benchmark": "gpu_model",
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "bf16_matmul_tflops_measured": round(measured / 1e12, 1),
        "bf16_peak_tflops_used_for_mfu": round(peak / 1e12, 1),
        "flash_attention_sdpa": flash_attention_runs(device),
        "greedy_cache_equals_no_cache_fp32": [c.token_ids for c in cached] == [u.token_ids for u in uncached],
        "generation_10m_bf16_batch16_tokens_per_s": round(gen_tps),
        f"train_{args.preset}_seq{args.seq}_bf16_eager": train_mfu(args.preset, args.seq, args.batch, args.steps,
                                                                   device, False, peak),
    }
    if not args.no_compile:
        figures[f"train_{args.preset}_seq{args.seq}_bf16_compiled"] = train_mfu(
            args.preset, args.seq, args.batch, args.steps, device, True, peak)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
