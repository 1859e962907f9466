"""Serving throughput and latency, side by side in one run; prints ONE JSON line.

Over HTTP against `groundup serve` (Ray Serve, continuous batching) at several concurrencies, versus
(a) the same requests one at a time in-process through ``model.generate`` — the batching gain — and
(b) Hugging Face transformers' ``generate`` on the exported model with the same settings.
Untrained "10m" weights; greedy; EOS ignored so every answer has exactly ``max_tokens`` tokens.

    python benchmarks/bench_serving.py [--max-tokens 32] [--concurrency 1 4 16] [--threads 1] [--dtype bfloat16] [--rounds 3]

Each level runs once per round and keeps its best round (a shared machine only ever slows a run down).
``where_time_goes_cpu_ms`` splits one decoding step into the model's forward, batched sampling and
detokenizing, alone and for a full batch, in CPU milliseconds.

The model replica gets ``--threads`` CPUs (Ray sets its thread count from them) and the in-process
baselines run with the same number of torch threads and the same ``--dtype``, so the comparison is like
for like. Decoding one sequence reads every weight per token (memory-bound); a batch reads them once for
all its rows, so bf16 weights (half the bytes) help batches most on CPUs with AVX512-BF16/AMX.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["The history of", "Once upon a time there was", "Rivers flow into", "Science is", "In the morning",
           "Numbers like 12 and", "A short note about", "The best way to learn"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(latencies: list[float], ttfts: list[float] | None, tokens: int, elapsed: float) -> dict:
    out = {"tokens_per_s": round(tokens / elapsed, 1), "p50_latency_s": round(percentile(latencies, 0.5), 4),
           "p95_latency_s": round(percentile(latencies, 0.95), 4), "requests": len(latencies)}
    if ttfts:
        out["p50_ttft_s"] = round(percentile(ttfts, 0.5), 4)
        out["p95_ttft_s"] = round(percentile(ttfts, 0.95), 4)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_checkpoints(workdir: Path, device) -> tuple[Path, Path, object]:
    import torch

    from model.checkpoint import save_checkpoint
    from model.config import preset
    from model.hf import export_hf
    from model.llama import Transformer
    from model.tokenizer import train_tokenizer
    from pipelines.data.builtin import iter_builtin_documents

    tokenizer = train_tokenizer([d["text"] for d in iter_builtin_documents()], workdir / "tokenizer",
                                vocab_size=4096)
    torch.manual_seed(0)
    model = Transformer(preset("10m", vocab_size=tokenizer.vocab_size))
    checkpoint = save_checkpoint(model, workdir / "checkpoint", tokenizer)
    hf_dir = export_hf(model, workdir / "hf", tokenizer)
    return checkpoint, hf_dir, tokenizer


async def http_level(api_url: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    import httpx

    latencies, ttfts, tokens = [], [], 0
    semaphore = asyncio.Semaphore(concurrency)

    async def one(client, index: int):
        nonlocal tokens
        body = {"model": "bench", "prompt": PROMPTS[index % len(PROMPTS)], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        async with semaphore:
            start = time.perf_counter()
            first = None
            async with client.stream("POST", f"{api_url}/completions", json=body) as response:
                assert response.status_code == 200, await response.aread()
                async for line in response.aiter_lines():
                    # Parse only the chunks the figures need (the first with text, the usage): the client
                    # shares the machine's CPUs with the server it measures.
                    if not line.startswith("data: {") or (first is not None and '"usage"' not in line):
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                        first = time.perf_counter() - start
                    if chunk.get("usage"):
                        tokens += chunk["usage"]["completion_tokens"]
            latencies.append(time.perf_counter() - start)
            ttfts.append(first if first is not None else latencies[-1])

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one(client, 0)  # warm-up (not counted)
        latencies, ttfts, tokens = [], [], 0
        start = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(requests)))
        elapsed = time.perf_counter() - start
    assert tokens == requests * max_tokens, (tokens, requests * max_tokens)
    return summary(latencies, ttfts, tokens, elapsed)


def process_cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of this process ("client": the HTTP client and Ray's driver) and of every process
    it started, by role: Serve's proxy, the model replica, its engine (a child process), the controller, and
    Ray's other processes."""
    import psutil

    def role(command: str) -> str:
        for marker, name in (("ProxyActor", "proxy"), ("ServeReplica", "replica"), ("spawn_main", "engine"),
                             ("ServeController", "controller")):
            if marker in command:
                return name
        return "ray_other"

    totals: dict[str, float] = {}
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
            name = "client" if process.pid == me.pid else role(" ".join(process.cmdline()))
        except psutil.Error:
            continue
        totals[name] = totals.get(name, 0.0) + times.user + times.system
    return totals


def in_process_level(checkpoint: Path, tokenizer, requests: int, max_tokens: int, device, dtype) -> dict:
    import torch

    from model.checkpoint import load_model
    from model.generate import SamplingParams, generate_stream

    model = load_model(checkpoint, device, dtype)
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0, stop_token_ids=())
    prompts = [tokenizer.encode(PROMPTS[i % len(PROMPTS)], bos=True) for i in range(requests)]
    list(generate_stream(model, prompts[:1], params, tokenizer))  # warm-up
    latencies, ttfts, tokens = [], [], 0
    start = time.perf_counter()
    for prompt in prompts:  # one at a time, as a server without batching would
        began, first = time.perf_counter(), None
        for events in generate_stream(model, [prompt], params, tokenizer):
            if device.type == "cuda":
                torch.cuda.synchronize()
            first = first if first is not None else time.perf_counter() - began
            tokens += len(events)
        latencies.append(time.perf_counter() - began)
        ttfts.append(first)
    return summary(latencies, ttfts, tokens, time.perf_counter() - start)


def cpu_ms(fn, repeats: int) -> float:
    """CPU milliseconds per call (process time: steadier than wall time on a shared machine)."""
    for _ in range(3):
        fn()
    started = time.process_time()
    for _ in range(repeats):
        fn()
    return round((time.process_time() - started) / repeats * 1e3, 3)


def where_time_goes(checkpoint: Path, tokenizer, batch: int, device, dtype) -> dict:
    """CPU ms of each part of one decoding step, alone and for a batch: the model's forward, sampling
    (batched, on the device), detokenizing, the whole engine step; and what detokenizing cost when each
    token decoded the whole answer again (quadratic: here at the 256th token)."""
    import torch

    from model.checkpoint import load_model
    from model.generate import IncrementalDetokenizer, SamplingParams, sample
    from model.llama import KVCache
    from serving.engine import Engine

    model = load_model(checkpoint, device, dtype)
    parts: dict = {}
    text_ids = tokenizer.encode(" ".join(PROMPTS) * 8)[:256]
    with torch.inference_mode():
        for rows in (1, batch):
            cache = KVCache.allocate(model.config, rows, 128, device, dtype)
            tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
            positions = torch.full((rows, 1), 40, device=device)
            index = torch.arange(rows, device=device)
            logits = model(tokens, positions=positions, cache=cache, rows=index, span=41)[:, -1]
            params = [SamplingParams(temperature=0)] * rows
            parts[f"b{rows}"] = {
                "forward_ms": cpu_ms(lambda: model(tokens, positions=positions, cache=cache, rows=index, span=41), 40),
                "sampling_ms": cpu_ms(lambda: sample(logits, params, [0.5] * rows).to_host(), 200),
                "detokenize_ms": cpu_ms(lambda: [IncrementalDetokenizer(tokenizer, (), text_ids[:6]).add(t)
                                                 for t in text_ids[6:6 + rows]], 200),
            }
    parts["quadratic_detokenize_ms_at_token_256"] = cpu_ms(lambda: tokenizer.decode(text_ids), 200)
    engine = Engine(model, tokenizer, batch)
    for i in range(batch):
        engine.submit(text_ids[:8 + i], SamplingParams(max_new_tokens=10_000, temperature=0, stop_token_ids=()),
                      lambda event: None)
    engine.step()  # prefill
    parts[f"b{batch}"]["engine_step_ms"] = cpu_ms(engine.step, 40)
    return parts


def engine_level(checkpoint: Path, tokenizer, requests: int, max_tokens: int, device, max_batch_size: int,
                 dtype) -> dict:
    """The serving engine in-process, all requests submitted at once: batching without HTTP or Ray."""
    from model.checkpoint import load_model
    from model.generate import SamplingParams
    from serving.engine import Engine

    engine = Engine(load_model(checkpoint, device, dtype), tokenizer, max_batch_size)
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0, stop_token_ids=())
    prompts = [tokenizer.encode(PROMPTS[i % len(PROMPTS)], bos=True) for i in range(requests)]
    engine.submit(prompts[0], params, lambda event: None)
    engine.run_until_idle()  # warm-up
    start, tokens, latencies, ttfts = time.perf_counter(), 0, {}, {}

    def record(index: int):
        def on_event(event) -> None:
            nonlocal tokens
            tokens += event.token_id is not None
            ttfts.setdefault(index, time.perf_counter() - start)
            if event.finish_reason is not None:
                latencies[index] = time.perf_counter() - start
        return on_event

    for index, prompt in enumerate(prompts):
        engine.submit(prompt, params, record(index))
    engine.run_until_idle()
    return summary(list(latencies.values()), list(ttfts.values()), tokens, time.perf_counter() - start)


def hf_level(hf_dir: Path, tokenizer, requests: int, max_tokens: int, device, dtype) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).to(device).eval()
    prompts = [tokenizer.encode(PROMPTS[i % len(PROMPTS)], bos=True) for i in range(requests)]
    settings = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0]], device=device), **settings)  # warm-up
        latencies, tokens = [], 0
        start = time.perf_counter()
        for prompt in prompts:
            began = time.perf_counter()
            out = model.generate(torch.tensor([prompt], device=device), **settings)
            tokens += out.shape[1] - len(prompt)
            latencies.append(time.perf_counter() - began)
    return summary(latencies, None, tokens, time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-level", type=int, default=0, help="default: 2 x concurrency (min 8)")
    parser.add_argument("--baseline-requests", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="CPUs for the model replica and the baselines")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="each level runs once per round; the best counts")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="weights and KV cache of the server AND of both baselines (like for like)")
    args = parser.parse_args()

    import torch

    from model.device import pick_device

    torch.set_num_threads(args.threads)
    load_at_start = round(os.getloadavg()[0], 2)  # other work on the machine skews every figure
    from serving.model_server import serving_dtype

    device = pick_device()
    dtype = serving_dtype(args.dtype, device)
    result: dict = {"benchmark": "serving", "preset": "10m", "device": str(device), "max_tokens": args.max_tokens,
                    "threads": args.threads, "max_batch_size": args.max_batch_size,
                    "dtype": str(dtype).removeprefix("torch.")}
    top = max(args.concurrency)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, hf_dir, tokenizer = build_checkpoints(Path(tmp), device)
        result["where_time_goes_cpu_ms"] = where_time_goes(checkpoint, tokenizer, args.max_batch_size, device, dtype)
        try:
            result["hf_transformers_sequential"] = hf_level(hf_dir, tokenizer, args.baseline_requests,
                                                            args.max_tokens, device, dtype)
        except ImportError as err:
            result["hf_transformers_sequential"] = f"missing: {err}"

        from ray import serve

        from pipelines.ray_env import ensure_ray
        from serving.app import Config, apply_serve_throughput_env, deploy

        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        apply_serve_throughput_env()  # as `groundup serve` does, before this process starts Ray
        os.environ.setdefault("RAY_ADDRESS", "local")  # a cluster of its own, never one found on the machine
        ensure_ray(num_cpus=max(4, args.threads + 2))
        port = free_port()
        config = Config(models=[f"bench={checkpoint}"], port=port, ui=False, block=False, dtype=args.dtype,
                        num_cpus=args.threads, num_gpus=1 if device.type == "cuda" else 0,
                        max_batch_size=args.max_batch_size, max_ongoing_requests=256)
        deploy(config)
        api_url = f"http://127.0.0.1:{port}/v1"
        import httpx

        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        # Every level runs once per round, the rounds one after another, and each level keeps its best
        # round: other work on a shared machine only ever slows a run down, so the best run of each level
        # is the one least disturbed, and the levels are compared at the same moments.
        runs: dict[str, list[dict]] = {}
        for _ in range(args.rounds):
            runs.setdefault("in_process_sequential", []).append(in_process_level(
                checkpoint, tokenizer, args.baseline_requests, args.max_tokens, device, dtype))
            runs.setdefault(f"engine_in_process_c{top}", []).append(engine_level(
                checkpoint, tokenizer, args.requests_per_level or max(8, 2 * top), args.max_tokens, device,
                args.max_batch_size, dtype))
            for concurrency in args.concurrency:
                requests = args.requests_per_level or max(8, 2 * concurrency)
                before = process_cpu_seconds()
                level = asyncio.run(http_level(api_url, concurrency, requests, args.max_tokens))
                after, tokens = process_cpu_seconds(), requests * args.max_tokens
                # Where the time goes over HTTP: CPU ms per generated token in each process
                level["cpu_ms_per_token"] = {name: round((after[name] - before.get(name, 0.0)) * 1e3 / tokens, 3)
                                             for name in sorted(after)}
                runs.setdefault(f"c{concurrency}", []).append(level)
        serve.shutdown()

    best = {name: max(levels, key=lambda level: level["tokens_per_s"]) for name, levels in runs.items()}
    result["tokens_per_s_each_round"] = {name: [level["tokens_per_s"] for level in levels]
                                         for name, levels in runs.items()}
    result["in_process_sequential"] = best["in_process_sequential"]
    result[f"engine_in_process_c{top}"] = best[f"engine_in_process_c{top}"]
    served = result["served_http"] = {f"c{c}": best[f"c{c}"] for c in args.concurrency}
    base = result["in_process_sequential"]["tokens_per_s"]
    result["batching_gain_vs_in_process"] = {k: round(v["tokens_per_s"] / base, 2) for k, v in served.items()}
    result[f"engine_gain_vs_in_process_c{top}"] = round(
        result[f"engine_in_process_c{top}"]["tokens_per_s"] / base, 2)
    hf = result["hf_transformers_sequential"]
    if isinstance(hf, dict):
        result["gain_vs_hf_transformers"] = {k: round(v["tokens_per_s"] / hf["tokens_per_s"], 2)
                                             for k, v in served.items()}
    top_gain = result["batching_gain_vs_in_process"].get(f"c{top}")
    result["target"] = {"http_gain_at_c16_vs_sequential": 6.0, "met": top_gain is not None and top_gain >= 6.0}
    result["load_average_start_end"] = [load_at_start, round(os.getloadavg()[0], 2)]
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
