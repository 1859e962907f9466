"""Scaling-law check on the built-in corpus (issue 12), printed as ONE JSON line: an IsoFLOP sweep on 3
budgets (``groundup scaling``, K sizes each, Tune trials of the training core), the fitted exponents a
(N* ∝ C^a) and b (D* ∝ C^b) with bootstrap intervals, then a held-out run at 4x the largest budget at
the predicted size: predicted against measured validation loss (target: within 3 %), and wall times.
Run: python benchmarks/bench_scaling.py [--budgets 3e10,1e11,3e11] [--sizes 4] [--holdout 4]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="/tmp/groundup-bench-scaling", help="scratch run directory")
    parser.add_argument("--budgets", default="3e10,1e11,3e11")
    parser.add_argument("--sizes", type=int, default=4)
    parser.add_argument("--holdout", type=float, default=4.0)
    parser.add_argument("--tokens-per-parameter", type=float, default=20.0, help="centre of the sizes (D/N)")
    parser.add_argument("--width-step", type=int, default=16, help="the family's width per size step")
    args = parser.parse_args()
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_ADDRESS", "local")
    from pipelines.ray_env import ensure_ray

    ensure_ray()
    from pipelines.config import build_config

    if not (run / "data" / "manifest.json").is_file():
        from pipelines.data.stage import Config as DataConfig
        from pipelines.data.stage import run as data_run

        data_run(build_config(DataConfig, overrides=[f"run={run}", "tokenizer.vocab_size=1024",
                                                     "pack.sequence_length=64", "dedup.near=false"]))
    from pipelines import scaling

    budgets = [float(b) for b in args.budgets.split(",")]
    started = time.perf_counter()
    manifest = scaling.run(build_config(scaling.Config, overrides=[
        f"run={run}", "model=1m", "sequence_length=64", "seed=0", "train.num_workers=1", "train.precision.dtype=fp32",
        "train.batch.global_batch_tokens=4096", "train.eval.max_rows=128", "train.eval.samples=0",
        f"budgets={budgets}", f"sizes={args.sizes}", f"holdout={args.holdout}", "min_steps=16",
        f"tokens_per_parameter={args.tokens_per_parameter}", f"family.width_step={args.width_step}",
        "family.max_size=16", "bootstrap=200"]))
    wall = time.perf_counter() - started
    figures, holdout = manifest["figures"], manifest["figures"].get("holdout", {})
    print(json.dumps({
        "budgets": budgets, "sizes_per_budget": args.sizes, "runs": manifest["counts"]["runs"],
        "a": figures.get("a"), "a_interval": figures.get("a_interval"),
        "b": figures.get("b"), "b_interval": figures.get("b_interval"),
        "approach3": {k: figures.get("approach3", {}).get(k) for k in ("alpha", "beta", "a", "b")},
        "isoflop_minima_at_edge": [f["at_edge"] for f in figures.get("isoflops", [])],
        "holdout_flops": holdout.get("flops"), "holdout_size_parameters_n": holdout.get("n"),
        "predicted_loss": holdout.get("predicted"), "predicted_loss_law": holdout.get("predicted_law"),
        "predicted_interval_law": holdout.get("predicted_interval_law"), "measured_loss": holdout.get("measured"),
        "relative_error": holdout.get("relative_error"), "target_relative_error": 0.03,
        "sweep_wall_s": manifest["timings"]["sweep_s"], "total_wall_s": round(wall, 1), "cores": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
