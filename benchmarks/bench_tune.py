"""Ray Tune's overhead (issue 12), printed as ONE JSON line: the wall time of K pretraining trials run
through ``groundup tune`` (one at a time, then as many at once as the cluster holds) against the same K
configs run by ``groundup pretrain`` one after another, in one process, on one local Ray cluster.

Both sides train the same model, data, batch, steps and evaluations (samples off); a pretrain run also
copies out its final model, a Tune trial checkpoints at each evaluation without a weights export.
Target: tune (one at a time) / sequential pretrain <= 1.15.
Run: python benchmarks/bench_tune.py [--trials 3] [--steps 24]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

LRS = (3e-3, 1.5e-3, 6e-3, 1e-3, 2e-3, 4e-3)


def ensure_data(run: Path) -> None:
    if not (run / "data" / "manifest.json").is_file():
        from pipelines.config import build_config
        from pipelines.data.stage import Config
        from pipelines.data.stage import run as data_run

        data_run(build_config(Config, overrides=[f"run={run}", "tokenizer.vocab_size=1024", "pack.sequence_length=64",
                                                 "dedup.near=false"]))


def common(steps: int, evaluations: int) -> list[str]:
    every = max(1, steps // evaluations)
    return ["model=1m", "sequence_length=64", "seed=0", "train.num_workers=1", "train.precision.dtype=fp32",
            "train.batch.micro_batch_size=8", "train.batch.global_batch_tokens=512", "train.schedule.warmup_steps=2",
            f"train.length.steps={steps}", f"train.eval.every_steps={every}", "train.eval.max_rows=32",
            "train.eval.samples=0", f"train.checkpoint.every_steps={steps}", "train.log_every=1000"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="/tmp/groundup-bench-tune", help="scratch run directory")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--evaluations", type=int, default=4)
    args = parser.parse_args()
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_ADDRESS", "local")
    from pipelines.ray_env import ensure_ray

    ensure_ray()
    ensure_data(run)
    import ray

    from pipelines import pretrain, tune
    from pipelines.config import build_config

    lrs = LRS[:args.trials]
    space = run / "space.yaml"
    space.write_text(f"train.optimizer.lr: {{grid: {list(lrs)}}}\n")
    base = common(args.steps, args.evaluations)

    started = time.perf_counter()
    losses_seq = []
    for lr in lrs:
        manifest = pretrain.run(build_config(pretrain.Config, overrides=[f"run={run}", *base, f"train.optimizer.lr={lr}"]))
        losses_seq.append(manifest["figures"]["val_loss"])
    sequential_s = time.perf_counter() - started

    def tune_once(concurrent: int | None) -> tuple[float, dict]:
        extra = [f"max_concurrent_trials={concurrent}"] if concurrent else []
        mark = time.perf_counter()
        manifest = tune.run(build_config(tune.Config, overrides=[
            f"run={run}", f"space={space}", "search=grid", f"evaluations={args.evaluations}", "asha.enabled=false",
            f"budget.steps={args.steps}", *[o for o in base if not o.startswith(("train.length", "train.eval.every",
                                                                                   "train.checkpoint"))], *extra]))
        return time.perf_counter() - mark, manifest

    tune_serial_s, serial = tune_once(1)
    tune_parallel_s, parallel = tune_once(None)
    losses_tune = sorted(t["final_val_loss"] for t in serial["figures"]["trials"])
    print(json.dumps({
        "trials": args.trials, "steps": args.steps, "cluster_cpus": ray.cluster_resources().get("CPU"),
        "sequential_pretrain_s": round(sequential_s, 1), "tune_one_at_a_time_s": round(tune_serial_s, 1),
        "tune_concurrent_s": round(tune_parallel_s, 1),
        "ratio_tune_vs_sequential": round(tune_serial_s / sequential_s, 3),
        "ratio_concurrent_vs_sequential": round(tune_parallel_s / sequential_s, 3), "target_ratio": 1.15,
        "same_losses": all(abs(a - b) < 1e-3 for a, b in zip(sorted(losses_seq), losses_tune)),
        "cores": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
