"""Build and run the Ray Train ``TorchTrainer`` whose workers run ``loop.train_worker``.

Checkpoints live under ``<storage_path>/<name>/``. Ray Train restores its checkpoint bookkeeping from
there when a run with the same storage path and name starts again, so ``--resume`` is "start the same
run again"; a fresh start first moves the old directory out of the way.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from pipelines.config import ConfigError
from pipelines.train.loop import LoopSpec, train_worker


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def decide_use_gpu(requested: bool | None, num_cpus: int | None = None) -> tuple[bool, bool]:
    """(use GPUs, GPUs do bf16) for the workers, decided where they will run, not on the driver.

    A submitted job's driver sits on the head node, which usually has no GPU: unless the config says,
    look at the cluster's GPUs (joining or starting Ray). An autoscaling cluster with no GPU node up
    yet shows none, so there ``train.use_gpu=true`` must be said. When only the cluster has GPUs the
    driver cannot ask them about bf16: assume it (every data-centre GPU since the A100) and let the
    worker check (``loop.check_precision``).
    """
    import torch

    if torch.cuda.is_available():
        return (True if requested is None else requested), torch.cuda.is_bf16_supported()
    if requested is None:
        from pipelines.ray_env import ensure_ray

        ensure_ray(num_cpus)
        requested = cluster_has_gpus()
    return requested, True


def build_trainer(spec: LoopSpec, storage_path: str, name: str, use_gpu: bool, callbacks: list | None = None):
    """``callbacks``: Ray Train ``UserCallback``s (a Tune trial passes one that forwards reports to Tune)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    config = spec.train
    resources = {"CPU": config.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    scaling = ScalingConfig(num_workers=config.num_workers, use_gpu=use_gpu, resources_per_worker=resources)
    run_config = RunConfig(
        name=name,
        storage_path=storage_path,
        failure_config=FailureConfig(max_failures=config.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.keep),
        callbacks=callbacks,
    )
    return TorchTrainer(
        train_worker,
        train_loop_config=spec,
        scaling_config=scaling,
        run_config=run_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )


def prepare_storage(storage_path: str, name: str, resume: bool) -> bool:
    """True when a previous run exists to resume. Without ``resume`` an old run is set aside, not reused.

    ``storage_path`` is a local or shared path or an object-store URI (Ray Train writes to either)."""
    import pyarrow.fs as pafs

    from pipelines.rundir import join, resolve_filesystem

    run_uri = join(storage_path, name)
    fs, run_path = resolve_filesystem(run_uri)
    exists = (fs.get_file_info(run_path).type == pafs.FileType.Directory
              and bool(fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))))
    if resume:
        if not exists:
            raise ConfigError(f"--resume: no previous training run under {run_uri}")
        return True
    if exists:
        if isinstance(fs, pafs.LocalFileSystem):  # rename first: a crash mid-delete leaves nothing half-gone
            stale = Path(run_path).with_name(f"{name}.replaced-{int(time.time())}")
            Path(run_path).rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            fs.delete_dir(run_path)
    return False


def fit(spec: LoopSpec, storage_path: str, name: str, use_gpu: bool):
    """Run training to the end (surviving up to ``max_failures`` worker failures); returns the Result."""
    from ray.train import TrainingFailedError

    trainer = build_trainer(spec, storage_path, name, use_gpu)
    try:
        return trainer.fit()
    except TrainingFailedError as err:
        raise RuntimeError(f"training failed after {spec.train.max_failures} restarts: {err}") from err
