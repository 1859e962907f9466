"""Pretraining figures (issue 4), printed as ONE JSON line, side by side in one run:

- tokens/s of the full Ray Train + DeepSpeed path (1 worker using every core, and 2 workers) against a
  bare single-process PyTorch loop on the same model, data rows and batch (ratio target >= 0.9),
- achieved model FLOP/s against this CPU's measured bf16 matmul peak,
- with --quickstart: validation bits per byte reached by pipelines/recipes/quickstart_pretrain.yaml,
  the corpus's unigram entropy in bits per byte, and the wall time of data + pretrain,
- with --gpu-mfu: MFU of the 125m preset at sequence 1024 in bf16 with flash SDPA on one CUDA GPU
  (single process), against the GPU's datasheet peak.

Steady-state tokens/s skip the first steps (warm-up); start-up time is reported separately.
Run: python benchmarks/bench_pretrain.py [--steps 12] [--quickstart] [--gpu-mfu]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

RECIPE = Path(__file__).resolve().parent.parent / "pipelines" / "recipes" / "quickstart_pretrain.yaml"
WARMUP_STEPS = 2


def ensure_data(run: Path) -> dict:
    from pipelines.rundir import RunDir

    if not (run / "data" / "manifest.json").is_file():
        from pipelines.config import build_config
        from pipelines.data.stage import Config
        from pipelines.data.stage import run as data_run

        data_run(build_config(Config, overrides=[f"run={run}"]))
    return RunDir(str(run)).read_manifest("data")


def pretrain_config(run: Path, *overrides: str):
    from pipelines.config import build_config
    from pipelines.pretrain import Config

    return build_config(Config, yaml_path=RECIPE, overrides=[f"run={run}", *overrides])


def bare_loop(run: Path, steps: int, threads: int) -> dict:
    """The same model, rows, micro-batches and accumulation as the Ray path, in one plain process:
    fp32 master weights, bf16 autocast, torch AdamW, gradient clipping and the same LR schedule."""
    from pipelines.pretrain import prepare
    from pipelines.train.schedule import make_schedule
    from pipelines.train.task import StepContext

    torch.set_num_threads(threads)
    spec, _, _, _ = prepare(pretrain_config(run, "train.num_workers=1"))
    task, plan, cfg = spec.task, spec.plan, spec.train
    torch.manual_seed(spec.seed)
    model = task.build_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, betas=(cfg.optimizer.beta1, cfg.optimizer.beta2),
                                  weight_decay=cfg.optimizer.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, make_schedule(cfg.schedule, plan.total_steps))
    times, losses = [], []
    for step in range(steps):
        start = time.perf_counter()
        batches = task.train_micro_batches(step, 0, 1, plan.micro_batch_size)
        total = 0.0
        for batch in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = task.loss(StepContext(model, None, torch.device("cpu")), batch).total / task.count(batch)
            (loss / len(batches)).backward()
            total += float(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(total / len(batches))
    steady = times[WARMUP_STEPS:]
    return {"tokens_per_s": plan.tokens_per_step * len(steady) / sum(steady), "losses": losses,
            "flops_per_token": plan.flops_per_token, "tokens_per_step": plan.tokens_per_step}


def ray_path(run: Path, steps: int, workers: int, cpus_per_worker: float) -> dict:
    from pipelines.pretrain import run as pretrain
    from pipelines.train.metrics import read_metrics

    started = time.perf_counter()
    manifest = pretrain(pretrain_config(run, f"train.num_workers={workers}", f"train.cpus_per_worker={cpus_per_worker}",
                                        f"train.length.steps={steps}", "train.eval.every_steps=100000",
                                        "train.eval.samples=0", f"train.checkpoint.every_steps={steps}",
                                        "train.log_every=100000"))
    wall = time.perf_counter() - started
    train = [r for r in read_metrics(run / "pretrain" / "metrics.jsonl") if r["kind"] == "train"]
    steady = [r for r in train if r["step"] > WARMUP_STEPS]
    seconds = sum(manifest["outputs"]["plan"]["tokens_per_step"] / r["tokens_per_s"] for r in steady)
    return {"tokens_per_s": manifest["outputs"]["plan"]["tokens_per_step"] * len(steady) / seconds,
            "losses": [r["loss"] for r in train], "wall_s": wall, "train_s": manifest["timings"]["train_s"]}


def throughput(args) -> dict:
    from pipelines.ray_env import ensure_ray
    from pipelines.train.peak import cpu_matmul_peak

    run = Path(args.run)
    ensure_data(run)
    threads = os.cpu_count() or 1
    peak = cpu_matmul_peak("bf16", threads)
    bare = bare_loop(run, args.steps, threads)
    ensure_ray()
    one = ray_path(run / "one-worker", args.steps, 1, threads) if _link_data(run, "one-worker") else None
    two = ray_path(run / "two-workers", args.steps, 2, max(1, threads // 2)) if _link_data(run, "two-workers") else None
    flops_per_token = bare["flops_per_token"]
    return {
        "model": "10m", "sequence_length": 256, "tokens_per_step": bare["tokens_per_step"], "precision": "bf16",
        "cpu_threads": threads, "cpu_bf16_matmul_peak_flops": peak,
        "bare_tokens_per_s": round(bare["tokens_per_s"], 1),
        "ray_1worker_tokens_per_s": round(one["tokens_per_s"], 1),
        "ray_2workers_tokens_per_s": round(two["tokens_per_s"], 1),
        "ratio_1worker_vs_bare": round(one["tokens_per_s"] / bare["tokens_per_s"], 3),
        "ratio_2workers_vs_bare": round(two["tokens_per_s"] / bare["tokens_per_s"], 3),
        "ray_1worker_model_flops_per_s": one["tokens_per_s"] * flops_per_token,
        "ray_1worker_mfu_vs_measured_bf16_peak": round(one["tokens_per_s"] * flops_per_token / peak, 4),
        "bare_mfu_vs_measured_bf16_peak": round(bare["tokens_per_s"] * flops_per_token / peak, 4),
        "ray_1worker_wall_s_incl_startup": round(one["wall_s"], 1), "ray_2workers_wall_s_incl_startup": round(two["wall_s"], 1),
        "loss_after_steps": {"bare": round(bare["losses"][-1], 4), "ray_1worker": round(one["losses"][-1], 4),
                             "ray_2workers": round(two["losses"][-1], 4)},
        "steps": args.steps, "warmup_steps_excluded": WARMUP_STEPS,
    }


def _link_data(run: Path, name: str) -> bool:
    target = run / name
    target.mkdir(parents=True, exist_ok=True)
    if not (target / "data").exists():
        (target / "data").symlink_to((run / "data").resolve())
    return True


def quickstart(args) -> dict:
    from pipelines.pretrain import run as pretrain
    from pipelines.ray_env import ensure_ray

    run = Path(args.run) / "quickstart"
    started = time.perf_counter()
    ensure_ray()
    data = ensure_data(run)
    data_s = time.perf_counter() - started
    mark = time.perf_counter()
    manifest = pretrain(pretrain_config(run))
    pretrain_s = time.perf_counter() - mark
    figures = manifest["figures"]
    return {"quickstart_val_bits_per_byte": figures["val_bits_per_byte"], "quickstart_val_loss": figures["val_loss"],
            "unigram_bits_per_byte": figures["unigram_bits_per_byte"], "quickstart_data_s": round(data_s, 1),
            "quickstart_pretrain_s": round(pretrain_s, 1), "quickstart_total_s": round(data_s + pretrain_s, 1),
            "quickstart_steps": manifest["counts"]["steps"], "quickstart_tokens": manifest["counts"]["tokens"],
            "data_wall_s_reported": data["timings"]["wall_s"]}


def gpu_mfu(args) -> dict:
    """125m at sequence 1024, bf16 autocast, flash SDPA, fused AdamW, one CUDA GPU, one process."""
    from model.config import preset
    from model.llama import Transformer, language_model_loss
    from pipelines.train.peak import device_peak_flops

    if not torch.cuda.is_available():
        return {"gpu_mfu": None, "gpu_mfu_error": "no CUDA device"}
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    seq, micro = 1024, args.gpu_micro_batch
    config = preset("125m", max_seq_len=seq)
    torch.manual_seed(0)
    model = Transformer(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    data = torch.randint(0, config.vocab_size, (micro, seq + 1), device=device)
    step_fn = model
    if args.compile:
        step_fn = torch.compile(model)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.nn.attention.sdpa_kernel(
                torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            loss = language_model_loss(step_fn(data[:, :-1]), data[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.gpu_steps):
        step()
    torch.cuda.synchronize()
    tokens_per_s = micro * seq * args.gpu_steps / (time.perf_counter() - start)
    peak, source = device_peak_flops(device, "bf16")
    flops = tokens_per_s * config.flops_per_token(seq)
    return {"gpu": torch.cuda.get_device_name(device), "gpu_model": "125m", "gpu_seq": seq, "gpu_micro_batch": micro,
            "gpu_compiled": args.compile, "gpu_tokens_per_s": round(tokens_per_s), "gpu_model_flops_per_s": flops,
            "gpu_peak_flops": peak, "gpu_peak_source": source, "gpu_mfu": round(flops / peak, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="/tmp/groundup-bench-pretrain", help="scratch run directory")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per throughput measurement")
    parser.add_argument("--quickstart", action="store_true", help="also run the quickstart recipe end to end")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--gpu-mfu", action="store_true", help="only the 125m/seq-1024/bf16 MFU on one CUDA GPU")
    parser.add_argument("--gpu-micro-batch", type=int, default=16)
    parser.add_argument("--gpu-steps", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model in --gpu-mfu")
    args = parser.parse_args()
    if args.gpu_mfu:
        print(json.dumps(gpu_mfu(args)))
        return
    figures: dict = {}
    if not args.skip_throughput:
        figures.update(throughput(args))
    if args.quickstart:
        figures.update(quickstart(args))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
