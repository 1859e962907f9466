"""What every training stage does around the loop: storage and resume, starting Ray, fitting, then the
end-of-run outputs (the final model copied out of the last checkpoint, curves, uploads for object-store
runs, the manifest and a summary line). A stage module builds a :class:`TrainingJob` and calls
:func:`run_training`; it never repeats this code.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipelines.rundir import RunDir, download, new_manifest, remove, upload
from pipelines.train.loop import LoopSpec
from pipelines.train.metrics import CURVES_FILE, METRICS_FILE, TENSORBOARD_DIR

RAY_RUN_NAME = "ray"  # <run>/<stage>/ray/: Ray Train's checkpoints and state


@dataclass
class TrainingJob:
    stage: str  # the run directory's sub-directory and the command's name
    config: Any  # the stage's config: .run, .resume, .num_cpus
    spec: LoopSpec
    use_gpu: bool
    title: str  # of the curves' PNG
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    # Extra figures for the manifest from the metrics records (the common ones come from training_figures).
    figures: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None
    summary_figures: tuple[str, ...] = ("final_train_loss", "val_loss")
    plots: dict[str, tuple[str, ...]] = field(default_factory=dict)  # extra PNG -> the metrics it plots per step


def check_resume(config: Any, stage: str) -> None:
    """``--resume`` with nothing to resume fails before Ray starts (deciding on GPUs may start it)."""
    from pipelines.train.trainer import prepare_storage

    if config.resume:
        prepare_storage(RunDir(config.run).uri_of(stage), RAY_RUN_NAME, resume=True)


def training_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The final training loss, the last evaluation's figures, mean tokens/s and MFU."""
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    last_eval = {k: v for k, v in (evals[-1] if evals else {}).items() if k not in ("kind", "step", "time")}
    first_eval = {f"start_{k}": v for k, v in evals[0].items() if k not in ("kind", "step", "time")} \
        if evals and evals[0]["step"] == 0 else {}
    measured = [r for r in train[1:] if r["step"] > 1] or train  # the first step pays for warm-up
    mfus = [r["mfu"] for r in measured if r.get("mfu") is not None]
    return {"final_train_loss": train[-1]["loss"] if train else None, **last_eval, **first_eval,
            "mean_tokens_per_s": sum(r["tokens_per_s"] for r in measured) / len(measured) if measured else None,
            "mean_mfu": sum(mfus) / len(mfus) if mfus else None}


def checkpoint_uri(checkpoint) -> str:
    """A Ray Train checkpoint's location as the user would write it (a path, or s3://... / gs://...)."""
    kind = checkpoint.filesystem.type_name
    return checkpoint.path if kind == "local" else f"{'gs' if kind == 'gcs' else kind}://{checkpoint.path}"


def _write_outputs(out: Path, checkpoint, title: str, plots: dict[str, tuple[str, ...]]
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Into ``out``: the final model (from the last checkpoint's export) and the curves PNG, from the
    metrics log already there. Returns the trainer state and the metrics records."""
    from model.checkpoint import copy_checkpoint
    from pipelines.train.checkpoint import EXPORT_DIR, read_trainer_state
    from pipelines.train.metrics import plot_curves, plot_series, read_metrics

    with checkpoint.as_directory() as directory:
        state = read_trainer_state(Path(directory))
        staging = out / "model.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        copy_checkpoint(Path(directory) / EXPORT_DIR, staging)
    final_model = out / "model"
    shutil.rmtree(final_model, ignore_errors=True)
    staging.rename(final_model)  # the stable path later stages and `groundup serve` use
    records = read_metrics(out / METRICS_FILE)
    plot_curves(records, out / CURVES_FILE, title)
    for name, metrics in plots.items():
        plot_series(records, metrics, out / name, title)
    return state, records


def run_training(job: TrainingJob, started: float) -> dict[str, Any]:
    """Fit ``job`` (surviving worker failures), write its outputs and manifest; returns the manifest."""
    from pipelines.ray_env import ensure_ray
    from pipelines.train.trainer import fit, prepare_storage

    run_dir = RunDir(job.config.run)
    storage = run_dir.uri_of(job.stage)  # Ray Train writes checkpoints here (local, shared or object store)
    resumed = prepare_storage(storage, RAY_RUN_NAME, job.config.resume)
    if not resumed:
        for stale in (METRICS_FILE, TENSORBOARD_DIR):
            remove(run_dir.uri_of(job.stage, stale))
    ensure_ray(job.config.num_cpus)
    mark = time.perf_counter()
    result = fit(job.spec, storage, RAY_RUN_NAME, job.use_gpu)
    train_seconds = time.perf_counter() - mark
    if result.checkpoint is None:
        raise RuntimeError("training ended without a checkpoint")

    if run_dir.is_local:
        state, records = _write_outputs(run_dir.local_path(job.stage), result.checkpoint, job.title, job.plots)
    else:  # build the outputs on this node, then upload them next to what the workers uploaded
        with tempfile.TemporaryDirectory(prefix=f"groundup-{job.stage}-") as scratch:
            out = Path(scratch)
            if run_dir.exists(job.stage, METRICS_FILE):
                download(run_dir.uri_of(job.stage, METRICS_FILE), out / METRICS_FILE)
            state, records = _write_outputs(out, result.checkpoint, job.title, job.plots)
            upload(out / "model", run_dir.uri_of(job.stage, "model"))
            for png in (CURVES_FILE, *job.plots):
                if (out / png).is_file():
                    upload(out / png, run_dir.uri_of(job.stage, png))
    plan = job.spec.plan
    steps_done = int(state["step"])
    figures = {**training_figures(records), **(job.figures(records) if job.figures else {})}
    manifest = new_manifest(
        job.stage, job.config, started, inputs=job.inputs,
        outputs={"model": "model", "metrics": METRICS_FILE, "tensorboard": TENSORBOARD_DIR, "curves_png": CURVES_FILE,
                 "checkpoint": checkpoint_uri(result.checkpoint), "plan": plan.to_dict(),
                 "deepspeed_config": job.spec.deepspeed, **{Path(p).stem + "_png": p for p in job.plots},
                 **job.outputs},
        counts={"steps": steps_done, "tokens": steps_done * plan.tokens_per_step,
                "flops": steps_done * plan.tokens_per_step * plan.flops_per_token, **job.counts},
        figures=figures, timings={"train_s": round(train_seconds, 3), "resumed": resumed},
    )
    run_dir.write_manifest(job.stage, manifest)
    shown = ", ".join(f"{k} {figures[k]:.4f}" for k in job.summary_figures
                      if isinstance(figures.get(k), (int, float)))
    print(f"{job.stage}: done — {steps_done} steps, {shown}; model at {run_dir.uri_of(job.stage, 'model')}", flush=True)
    return manifest
