"""The generic training loop every Ray Train worker runs: a DeepSpeed engine driven by a Task.

A Task (``task.py``) supplies what differs between pretraining, SFT, reward modelling and DPO (the
model, a frozen second model, the batches, the loss as a sum with its count, the validation figures,
the export); this loop owns everything they share: engine set-up, gradient accumulation with losses
averaged by count across micro-batches and ranks, the schedule, evaluation with the same number of
forward passes on every rank (ZeRO-3 gathers weights collectively), checkpoints and restore, metrics
and fault drills.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.train.checkpoint import (
    EXPORT_DIR,
    gather_full_state_dict,
    load_training_state,
    save_training_state,
)
from pipelines.train.config import TrainConfig
from pipelines.train.metrics import METRICS_FILE, TENSORBOARD_DIR, MetricsLogger, say
from pipelines.train.plan import TrainPlan
from pipelines.train.schedule import make_schedule
from pipelines.train.task import Figures, StepContext, Task


@dataclass
class LoopSpec:
    """Everything a worker needs, built once on the driver."""

    task: Any  # a Task
    train: TrainConfig
    plan: TrainPlan
    deepspeed: dict[str, Any]
    out_dir: str  # rank 0 writes metrics.jsonl and TensorBoard events here (a path on its node)
    seed: int
    publish_uri: str | None = None  # object-store run: rank 0 uploads out_dir's logs here at each checkpoint
    report_evaluations: bool = False  # also report evaluations between checkpoints (a Tune trial: ASHA decides on them)


def _maybe_inject_fault(spec: LoopSpec, step: int, rank: int) -> None:
    fault = spec.train.fault
    if fault.crash_at_step is None or step != fault.crash_at_step or rank != fault.crash_rank:
        return
    marker = Path(spec.out_dir) / f"fault-injected-step{step}-rank{rank}"
    if marker.exists():  # crash once: the restarted worker goes through
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("injected\n")
    say(f"[fault] rank {rank} exits abruptly at step {step} (fault injection)")
    os._exit(1)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def _local_grad_norm(model: torch.nn.Module) -> float | None:
    grads = [p.grad.detach().float() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else None


def _all_reduce_max(value: int, device: torch.device) -> int:
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor[0])


def reduce_figures(figures: Figures, device: torch.device) -> dict[str, float]:
    """Sums and counts added over ranks (every rank must hold the same names), as means."""
    names = sorted(figures)
    if not names:
        return {}
    totals = torch.tensor([[figures[n][0], figures[n][1]] for n in names], dtype=torch.float64)
    totals = all_reduce_sum(totals.to(device)).cpu()
    return {n: float(totals[i, 0] / totals[i, 1]) if totals[i, 1] > 0 else float("nan") for i, n in enumerate(names)}


def _add_figures(into: Figures, figures: Figures) -> None:
    for name, (total, count) in figures.items():
        old = into.get(name, (0.0, 0.0))
        into[name] = (old[0] + float(total), old[1] + float(count))


def evaluate(ctx: StepContext, task: Task, rank: int, world: int, micro: int) -> dict[str, float]:
    """Every rank runs the same number of forward passes (ZeRO-3 gathers each layer's weights
    collectively, so a rank that stopped early would hang the others): ranks with fewer validation
    batches repeat one and discard its figures."""
    batches = list(task.eval_batches(rank, world, micro))
    rounds = _all_reduce_max(len(batches), ctx.device)
    spare = batches[0] if batches else next(iter(task.eval_batches(0, world, micro)), None)
    ctx.model.eval()
    totals: Figures = {}
    with torch.no_grad():
        for index in range(rounds):
            figures = task.eval_figures(ctx, batches[index] if index < len(batches) else spare)
            if index < len(batches):
                _add_figures(totals, figures)
            else:
                _add_figures(totals, {name: (0.0, 0.0) for name in figures})
    ctx.model.train()
    return task.eval_summary(reduce_figures(totals, ctx.device))


def _frozen_engine(model: Any, spec: LoopSpec, device: torch.device):
    """A model used without gradients (DPO's reference; a dict of them for PPO). Under ZeRO-3 it is an
    optimizer-less DeepSpeed engine, so its weights are sharded like the trained model's; otherwise a
    plain module on the device."""
    if model is None:
        return None
    if isinstance(model, dict):
        return {name: _frozen_engine(m, spec, device) for name, m in model.items()}
    for param in model.parameters():
        param.requires_grad_(False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.plan.precision, torch.float32)
    if spec.train.zero.stage == 3:
        import deepspeed

        config = {key: spec.deepspeed[key] for key in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                                          "gradient_accumulation_steps", "bf16", "fp16")
                  if key in spec.deepspeed}
        config["zero_optimization"] = {"stage": 3}
        engine, *_ = deepspeed.initialize(model=model, config=config, dist_init_required=False)
        engine.eval()  # DeepSpeedEngine.eval() returns None, unlike Module.eval()
        return engine
    return model.to(device=device, dtype=dtype).eval()


def check_precision(precision: str, device: torch.device) -> None:
    """The driver may have chosen bf16 without seeing the GPUs (see trainer.decide_use_gpu)."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RuntimeError(f"config field 'train.precision.dtype': bf16 is not supported by "
                           f"{torch.cuda.get_device_name(device)}; use fp16 or fp32")


def train_worker(spec: LoopSpec) -> None:
    """Entry point of each Ray Train worker (``train_loop_per_worker``)."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    config, plan, task = spec.train, spec.plan, spec.task
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    check_precision(plan.precision, device)

    torch.manual_seed(spec.seed)  # identical initial weights on every rank
    model = task.build_model()
    if hasattr(model, "activation_checkpointing"):
        model.activation_checkpointing = config.activation_checkpointing
    if config.compile:
        model.compile()  # nn.Module.compile: compiled in place, state_dict keys unchanged (no "_orig_mod.")
    engine, scheduler = _trained_engine(model, task, spec, lr_scale=1.0)
    extra = {name: _trained_engine(module, task, spec, lr_scale)[0]
             for name, (module, lr_scale) in (task.build_trained() if hasattr(task, "build_trained") else {}).items()}
    ctx = StepContext(model=engine, frozen=_frozen_engine(task.build_frozen(), spec, device), device=device,
                      trained=extra, rank=rank, world=world, zero_stage=config.zero.stage)

    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_training_state(engine, Path(directory), rank, extra)
        start_step = state["step"]
        if hasattr(task, "restore") and "task" in state:
            task.restore(state["task"])
        if rank == 0:
            say(f"[{task.name}] restored step {start_step} from checkpoint {checkpoint.path}")

    from pipelines.train.peak import device_peak_flops

    peak, _ = device_peak_flops(device, plan.precision) if rank == 0 else (0.0, "")
    if rank == 0 and spec.publish_uri:
        _fetch_logs(spec, restored=start_step > 0)
    logger = MetricsLogger(Path(spec.out_dir), plan.total_steps, plan.tokens_per_step, plan.flops_per_token,
                           peak * world, config.log_every, start_step, enabled=rank == 0, prefix=task.name,
                           progress_figures=getattr(task, "progress_figures", ()))
    stop_at = min(plan.total_steps, config.stop_at_step or plan.total_steps)
    last_eval: dict[str, float] = {}
    last_train: dict[str, Any] = {}
    if start_step == 0 and config.eval.at_start:  # the starting point's figures (e.g. the base model's loss)
        last_eval = evaluate(ctx, task, rank, world, plan.micro_batch_size)
        logger.evaluation(0, last_eval)
    engine.train()
    step = start_step
    while step < stop_at:
        _maybe_inject_fault(spec, step + 1, rank)
        started = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        if hasattr(task, "train_step"):  # the Task drives its own step (PPO)
            result = task.train_step(ctx, step)
            step += 1
            norm = engine.get_global_grad_norm()
            last_train = logger.step(step, result.loss, lr, None if norm is None else float(norm),
                                     time.perf_counter() - started, tokens=result.tokens, metrics=result.metrics)
            last_eval = _after_step(ctx, task, spec, logger, step, stop_at, last_train, last_eval)
            continue
        batches = task.train_micro_batches(step, rank, world, plan.micro_batch_size)
        # Sum of the step's losses / the step's count over every micro-batch and rank. DeepSpeed divides
        # each backward by the accumulation steps and averages gradients over ranks: undo both.
        counts = all_reduce_sum(torch.tensor([float(sum(task.count(b) for b in batches))], dtype=torch.float64,
                                              device=device))
        scale = world * len(batches) / max(float(counts[0]), 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        step_figures: Figures = {}
        tokens = 0
        grad_norm = None
        for batch in batches:
            out = task.loss(ctx, batch)
            engine.backward(out.total * scale)
            if engine.is_gradient_accumulation_boundary() and config.zero.stage == 0:
                # Without a ZeRO optimizer DeepSpeed leaves the norm unset (fp32); the gradients are
                # already all-reduced here, so measure it before the step clears them.
                grad_norm = _local_grad_norm(engine.module)
            engine.step()
            loss_sum += out.total.detach().double()
            tokens += out.tokens
            _add_figures(step_figures, out.metrics)
        reduced = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(tokens), dtype=torch.float64,
                                                                       device=device)]))
        loss_mean = float(reduced[0] / max(float(counts[0]), 1.0))
        metrics = reduce_figures(step_figures, device)
        ds_norm = engine.get_global_grad_norm()
        grad_norm = float(ds_norm) if ds_norm is not None else grad_norm
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step += 1
        last_train = logger.step(step, loss_mean, lr, grad_norm, time.perf_counter() - started,
                                 tokens=int(reduced[1]) or None, metrics=metrics)
        last_eval = _after_step(ctx, task, spec, logger, step, stop_at, last_train, last_eval)
    logger.close()  # the last step's checkpoint already published the logs


def _trained_engine(model: torch.nn.Module, task: Task, spec: LoopSpec, lr_scale: float):
    """A DeepSpeed engine with its own AdamW and schedule over the Task's parameter groups."""
    import deepspeed

    opt = spec.train.optimizer
    groups = task.param_groups(model, opt.weight_decay)
    for group in groups:  # a group's own learning rate (e.g. a new head's) is a multiple of the peak
        group["lr"] = opt.lr * lr_scale * group.pop("lr_scale", 1.0)
    optimizer = torch.optim.AdamW(groups, lr=opt.lr * lr_scale, betas=(opt.beta1, opt.beta2), eps=opt.eps)
    schedule = make_schedule(spec.train.schedule, spec.plan.total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=spec.deepspeed, dist_init_required=False,
        lr_scheduler=lambda wrapped: torch.optim.lr_scheduler.LambdaLR(wrapped, schedule))
    return engine, scheduler


def _after_step(ctx: StepContext, task: Task, spec: LoopSpec, logger: MetricsLogger, step: int, stop_at: int,
                last_train: dict[str, Any], last_eval: dict[str, float]) -> dict[str, float]:
    """Evaluation and checkpoint when they are due; returns the latest evaluation's figures."""
    config, plan = spec.train, spec.plan
    if step % config.eval.every_steps == 0 or step == plan.total_steps:
        last_eval = evaluate(ctx, task, ctx.rank, ctx.world, plan.micro_batch_size)
        samples: list[str] = []
        if config.eval.samples:
            weights = gather_full_state_dict(ctx.model, config.zero.stage)
            samples = task.samples(weights) if weights is not None else []
        logger.evaluation(step, last_eval, samples)
    if step % config.checkpoint.every_steps == 0 or step == stop_at:
        logger.flush()
        _report_checkpoint(ctx, task, spec, step, {**_scalars(last_train), **last_eval}, last_eval)
    elif spec.report_evaluations and step % config.eval.every_steps == 0:
        import ray.train

        ray.train.report({**_scalars(last_train), **last_eval, "step": step})  # every rank: no checkpoint
    return last_eval


def _fetch_logs(spec: LoopSpec, restored: bool) -> None:
    """Object-store run, rank 0: start from a clean local log directory; when restoring, continue the
    logs the previous attempt uploaded (it may have run on another node)."""
    from pipelines.rundir import RunDir, download

    out = Path(spec.out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    published = RunDir(spec.publish_uri)
    for name in (METRICS_FILE, TENSORBOARD_DIR):
        if restored and published.exists(name):
            download(published.uri_of(name), out / name)


def _publish_logs(spec: LoopSpec) -> None:
    """Object-store run, rank 0: upload the metrics log and TensorBoard events (no-op for local runs)."""
    if not spec.publish_uri:
        return
    from pipelines.rundir import join, upload

    out = Path(spec.out_dir)
    for name in (METRICS_FILE, TENSORBOARD_DIR):
        if (out / name).exists():
            upload(out / name, join(spec.publish_uri, name))


def _scalars(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("kind", "time") and v is not None}


def _report_checkpoint(ctx: StepContext, task: Task, spec: LoopSpec, step: int, metrics: dict[str, Any],
                       figures: dict[str, float]) -> None:
    """Collective: every rank saves its part and reports; Ray registers the checkpoint once all uploaded."""
    import ray.train

    rank = ctx.rank
    directory = Path(tempfile.mkdtemp(prefix=f"{task.name}-ckpt-{step}-rank{rank}-"))
    if rank == 0:  # logs first: a run restored from this checkpoint finds them at least this far
        _publish_logs(spec)
    try:
        state = {"step": step, "data_position": task.data_position(step), "world_size": spec.plan.world_size}
        if hasattr(task, "state"):
            state["task"] = task.state()
        save_training_state(ctx.model, directory, rank, state, ctx.trained)
        if spec.train.checkpoint.export_weights:
            weights = gather_full_state_dict(ctx.model, spec.train.zero.stage)
            if weights is not None:
                task.export(weights, directory / EXPORT_DIR, figures)
        ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                         checkpoint_dir_name=f"checkpoint-step{step:08d}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
