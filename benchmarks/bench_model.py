"""Model-alone figures (issue 2), printed as one JSON line:

- forward+backward+AdamW tokens/s for the 1m, 10m and 125m presets, fp32 and bf16 autocast,
- this machine's fp32 and bf16 matmul FLOP/s measured in the same run, and achieved model FLOP/s
  (tokens/s × training FLOPs per token) as a fraction of that peak,
- Hugging Face logits parity (max abs difference, fp32),
- generation tokens/s with and without the KV cache (10m, 256 new tokens).

Run: python benchmarks/bench_model.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from model.config import preset
from model.device import measure_matmul_flops
from model.generate import SamplingParams, generate
from model.llama import Transformer, language_model_loss


def train_throughput(name: str, dtype: torch.dtype | None, batch: int, seq: int, steps: int) -> dict:
    torch.manual_seed(0)
    config = preset(name, max_seq_len=seq)
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=False)
    data = torch.randint(0, config.vocab_size, (batch, seq + 1))

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = language_model_loss(model(data[:, :-1]), data[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (allocations, autocast caches)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - start
    tokens_per_s = batch * seq * steps / elapsed
    return {"tokens_per_s": round(tokens_per_s, 1),
            "model_flops_per_s": tokens_per_s * config.flops_per_token(seq),
            "params": config.num_parameters}


def generation_speed(new_tokens: int) -> dict:
    torch.manual_seed(0)
    model = Transformer(preset("10m", max_seq_len=512)).eval()
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, stop_token_ids=())
    prompt = [[5, 6, 7, 8]]
    figures = {}
    for use_cache in (True, False):
        start = time.perf_counter()
        out = generate(model, prompt, params, use_cache=use_cache)
        elapsed = time.perf_counter() - start
        figures["with_cache" if use_cache else "without_cache"] = round(len(out[0].token_ids) / elapsed, 1)
    figures["cache_speedup"] = round(figures["with_cache"] / figures["without_cache"], 2)
    return figures


def hf_parity() -> float | None:
    try:
        import transformers
    except ImportError:
        return None
    from model.hf import export_hf

    torch.manual_seed(0)
    model = Transformer(preset("10m")).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 128))
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, tmp)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        with torch.no_grad():
            return float((model(tokens) - theirs(tokens).logits).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (noisier)")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    peaks = {"fp32": measure_matmul_flops(torch.float32), "bf16": measure_matmul_flops(torch.bfloat16)}
    shapes = {"1m": (8, 256, 10), "10m": (4, 256, 6), "125m": (1, 256, 2)}
    training = {}
    for name, (batch, seq, steps) in shapes.items():
        steps = max(1, steps // 2) if args.quick else steps
        for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            result = train_throughput(name, dtype, batch, seq, steps)
            result["fraction_of_matmul_peak"] = round(result["model_flops_per_s"] / peaks[label], 3)
            result["model_flops_per_s"] = round(result["model_flops_per_s"] / 1e9, 2)
            training[f"{name}_{label}"] = result
    figures = {
        "benchmark": "model",
        "threads": torch.get_num_threads(),
        "matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()},
        "train_step": training,  # model_flops_per_s in GFLOP/s
        "hf_logits_max_abs_diff": hf_parity(),
        "generation_10m_256_tokens_per_s": generation_speed(256),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
