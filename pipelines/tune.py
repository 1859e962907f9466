"""``groundup tune``: hyper-parameter search over pretraining with Ray Tune, at equal compute.

A ``Tuner`` runs one trial function per sampled config; each trial builds the pretraining stage's
loop spec for its config and fits a Ray Train ``TorchTrainer`` (the Train V2 pattern), whose evaluations
reach Tune through a ``TuneReportCallback``. Trials get the same budget — FLOPs (C = 6·N·D, so models of
different sizes compete at equal compute) or steps — and ASHA stops the ones whose validation loss lags
at 25 %, 50 % ... of it. Outputs in ``<run>/tune/``: ``trials.csv`` (one row per trial), ``curves.png``
(every trial's validation loss against compute), ``best.yaml`` (the best config as a recipe that
``groundup pretrain --config`` takes as is) and ``manifest.json``. ``--resume`` continues an interrupted
search (``Tuner.restore``) without repeating finished trials.
"""
from __future__ import annotations

import csv
import io
import math
import os
import time
from dataclasses import replace
from typing import Any, Literal

from pydantic import Field

from pipelines import pretrain
from pipelines.cli import Flag, stage_main
from pipelines.config import ConfigError, StrictModel, describe_validation_error
from pipelines.rundir import RunDir, new_manifest
from pipelines.tuning import space as search_space

STAGE = "tune"
TUNER_NAME = "tuner"  # <run>/tune/tuner/: Ray Tune's experiment state (what --resume restores)
TRIALS_DIR = "trials"  # <run>/tune/trials/<trial id>/: each trial's metrics log and Ray Train run
TABLE_FILE = "trials.csv"
CURVES_FILE = "curves.png"
RECIPE_FILE = "best.yaml"
METRIC = "val_loss"
TIME_ATTR = "budget_pct"  # percent of its budget a trial has spent: ASHA's clock


class BudgetConfig(StrictModel):
    flops: float | None = Field(None, gt=0, description="compute per trial, C = 6·N·D FLOPs (equal for every size)")
    steps: int | None = Field(None, ge=1, description="optimizer steps per trial (when flops is not given)")


class AshaConfig(StrictModel):
    enabled: bool = Field(True, description="stop trials whose validation loss lags (ASHA)")
    grace_percent: float = Field(25.0, gt=0, le=100, description="no trial is stopped before this share of its budget")
    reduction_factor: float = Field(2.0, gt=1, description="1/reduction_factor of trials go on at each rung")


class Config(pretrain.Config):
    """The pretraining config every trial starts from, plus the search."""

    space: str | None = Field(None, description="YAML search space over these config fields")
    search: Literal["random", "grid", "optuna"] = Field("random", description="random sampling, the full grid, "
                                                         "or Optuna's TPE")
    num_samples: int = Field(4, ge=1, description="trials (random/optuna); grid runs each combination once")
    budget: BudgetConfig = BudgetConfig()
    evaluations: int = Field(8, ge=1, description="validation evaluations per trial (ASHA decides at these)")
    asha: AshaConfig = AshaConfig()
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: what the cluster's CPUs/GPUs hold")
    trial_cpus: float = Field(0.5, gt=0, description="CPUs of each trial's driver (the workers have their own)")
    stop_after_trials: int | None = Field(None, ge=1, description="end the search as if interrupted (Ctrl+C) "
                                          "once this many trials ended; continue with --resume")


CLI_FLAGS = (
    Flag(("--run",), "run", "run directory holding data/ (outputs go to <run>/tune/)"),
    Flag(("--space",), "space", "YAML search space over pretraining config fields"),
    Flag(("--search",), "search", "random, grid or optuna"),
    Flag(("--samples",), "num_samples", "number of trials (random/optuna)", {"type": int}),
    Flag(("--flops",), "budget.flops", "compute budget per trial in FLOPs (6·N·D)", {"type": float}),
    Flag(("--steps",), "budget.steps", "optimizer steps per trial", {"type": int}),
    Flag(("--model",), "model", "model preset every trial starts from"),
    Flag(("--workers",), "train.num_workers", "Ray Train workers per trial", {"type": int}),
    Flag(("--max-concurrent",), "max_concurrent_trials", "trials at once (default: what the cluster holds)",
         {"type": int}),
    Flag(("--seed",), "seed", "seed of the search and of every trial", {"type": int}),
    Flag(("--resume",), "resume", "continue an interrupted search", {"action": "store_const", "const": True}),
)


# ---- driver-side checks ---------------------------------------------------------------------------
def base_tree(config: Config) -> dict[str, Any]:
    """The pretraining config (as a dict) every trial starts from, with the budget as its length."""
    dumped = config.model_dump(mode="json")
    tree = {key: dumped[key] for key in pretrain.Config.model_fields if key != "resume"}
    if config.budget.flops is not None:
        tree["train"]["length"] = {"flops": config.budget.flops}
    elif config.budget.steps is not None:
        tree["train"]["length"] = {"steps": config.budget.steps}
    return tree


def trial_config(base: dict[str, Any], params: dict[str, Any], source: str = "config") -> pretrain.Config:
    from pydantic import ValidationError

    try:
        return pretrain.Config.model_validate(search_space.apply(base, params))
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, source)) from None


def check_space(config: Config, dims: list[search_space.Dimension]) -> list[dict[str, Any]]:
    """Every corner of the space is a valid pretraining config whose budget holds at least one step.
    Returns, for each corner checked, its size and plan (printed before the search starts)."""
    base = base_tree(config)
    source = f"space file {config.space}"
    if config.search == "grid" and (bad := [d.key for d in dims if d.kind in search_space.CONTINUOUS]):
        raise ConfigError(f"{source} field '{bad[0]}': search=grid needs grid or choice values, not a range")
    if config.search == "optuna":
        if bad := [d.key for d in dims if d.kind == "grid"]:
            raise ConfigError(f"{source} field '{bad[0]}': search=optuna samples; use choice instead of grid")
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("config field 'search': optuna is not installed (pip install -e \".[tune]\")") from None
    checked = []
    for params in search_space.corners(dims):
        # Checked without GPUs or Ray: only the shapes, the data and the budget matter here.
        probe = search_space.apply(base, {**params, "train.use_gpu": False, "train.precision.dtype": "fp32"})
        cfg = trial_config(probe, {}, source)
        try:
            spec = pretrain.prepare(cfg)[0]
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        plan = spec.plan
        step_flops = plan.tokens_per_step * plan.flops_per_token
        if config.budget.flops is not None and config.budget.flops < step_flops:
            shown = ", ".join(f"{k}={v}" for k, v in params.items())
            raise ConfigError(f"config field 'budget.flops': {config.budget.flops:.3g} FLOPs is less than one "
                              f"optimizer step ({step_flops:.3g} FLOPs = {plan.tokens_per_step} tokens x "
                              f"{plan.flops_per_token:.3g} FLOPs/token) of the trial with {shown}")
        checked.append({"params": params, "parameters": plan.num_parameters, "steps": plan.total_steps,
                        "tokens": plan.total_tokens, "flops": plan.total_flops,
                        "epochs": plan.total_steps / spec.task.order.steps_per_epoch})
    return checked


def concurrency(config: Config, use_gpu: bool) -> tuple[int, str]:
    """How many trials the cluster holds at once (Tune does not count the Train workers' resources)."""
    import ray

    resources = ray.cluster_resources()
    workers = config.train.num_workers
    if use_gpu:
        fits = int(resources.get("GPU", 0) // workers)
        why = f"{resources.get('GPU', 0):g} GPUs / {workers} per trial"
    else:
        per_trial = workers * config.train.cpus_per_worker + config.trial_cpus
        fits = int(resources.get("CPU", 0) // per_trial)
        why = f"{resources.get('CPU', 0):g} CPUs / {per_trial:g} per trial ({workers} workers + driver)"
    fits = max(1, fits)
    if config.max_concurrent_trials is not None:
        return config.max_concurrent_trials, f"max_concurrent_trials (the cluster holds {fits}: {why})"
    return fits, why


# ---- inside each trial ------------------------------------------------------------------------------
def _reporter(plan_fields: dict[str, float]):
    """A ``TuneReportCallback`` that adds what ASHA and the table need to each report: the share of the
    budget spent (ASHA's clock), tokens, FLOPs and epochs so far, and the trial's size and plan."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class BudgetReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            first = dict(metrics[0])
            step = int(first.get("step", 0))
            total = plan_fields["total_steps"]
            first.update(plan_fields)
            first.update({TIME_ATTR: 100.0 * step / total, "tokens_seen": step * plan_fields["tokens_per_step"],
                          "flops_used": step * plan_fields["tokens_per_step"] * plan_fields["flops_per_token"],
                          "epochs": step / plan_fields["steps_per_epoch"]})
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return BudgetReport()


def run_trial(params: dict[str, Any], base: dict[str, Any] = None, run_uri: str = "", evaluations: int = 8,
              stage: str = STAGE) -> None:
    """The Tune trial function: one pretraining run of ``base`` with ``params`` (dotted config fields; a
    ``point`` entry holds several that go together, as an IsoFLOP sweep's size and budget), driven from this
    actor. Its metrics log and Ray Train run go to ``<run>/<stage>/trials/<trial id>/``."""
    from ray import tune

    from pipelines.train.trainer import build_trainer

    trial_id = tune.get_context().get_trial_id()
    params = {**{k: v for k, v in params.items() if k != "point"}, **params.get("point", {})}
    config = trial_config(base, params)
    spec, _, _, use_gpu = pretrain.prepare(config)
    plan = spec.plan
    every = max(1, math.ceil(plan.total_steps / evaluations))
    train = spec.train
    train = train.model_copy(update={
        "eval": train.eval.model_copy(update={"every_steps": every, "samples": 0}),
        # Checkpoints as the config says (the last step's always), without a weights export: the best
        # trial's recipe re-runs it. Evaluations in between reach Tune without one (report_evaluations).
        "checkpoint": train.checkpoint.model_copy(update={
            "every_steps": every * max(1, round(train.checkpoint.every_steps / every)),  # on evaluation steps
            "keep": 1, "export_weights": False}),
        "log_every": plan.total_steps,
    })
    run = RunDir(run_uri)
    spec = replace(spec, train=train, task=replace(spec.task, name=f"trial {trial_id}"), report_evaluations=True,
                   out_dir=str(run.working_path(stage, TRIALS_DIR, trial_id)),
                   publish_uri=None if run.is_local else run.uri_of(stage, TRIALS_DIR, trial_id))
    plan_fields = {"parameters": plan.num_parameters, "total_steps": plan.total_steps,
                   "tokens_per_step": plan.tokens_per_step, "flops_per_token": plan.flops_per_token,
                   "flops_budget": plan.total_flops, "steps_per_epoch": spec.task.order.steps_per_epoch}
    trainer = build_trainer(spec, run.uri_of(stage, TRIALS_DIR, trial_id), "ray", use_gpu,
                            callbacks=[_reporter(plan_fields)])
    trainer.fit()


# ---- progress on the driver ---------------------------------------------------------------------
def _progress_callback(prefix: str = STAGE):
    from ray import tune

    class Progress(tune.Callback):
        """One line per trial event: what is running, stopped, finished, and the best loss so far."""

        def __init__(self):
            self.pct: dict[str, float] = {}
            self.best: tuple[float, str] | None = None
            self.ended: dict[str, str] = {}

        def _counts(self, trials) -> str:
            running = sum(t.status == "RUNNING" and t.trial_id not in self.ended for t in trials)
            pending = sum(t.status in ("PENDING", "PAUSED") for t in trials)
            stopped = sum(v == "stopped" for v in self.ended.values())
            finished = sum(v == "finished" for v in self.ended.values())
            errors = sum(v == "error" for v in self.ended.values())
            best = f" | best {METRIC} {self.best[0]:.4f} ({self.best[1]})" if self.best else ""
            return (f"{running} running, {pending} pending, {stopped} stopped, {finished} finished"
                    f"{f', {errors} failed' if errors else ''}{best}")

        def _say(self, line: str) -> None:
            print(f"{prefix}: {line}", flush=True)

        def on_trial_start(self, iteration, trials, trial, **info):
            shown = ", ".join(f"{k}={_fmt(v)}" for k, v in _flat(trial.config).items())
            self._say(f"trial {trial.trial_id} started ({shown}) | {self._counts(trials)}")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.pct[trial.trial_id] = float(result.get(TIME_ATTR, 0.0))
            value = result.get(METRIC)
            if value is not None and (self.best is None or value < self.best[0]):
                self.best = (float(value), trial.trial_id)

        def on_trial_complete(self, iteration, trials, trial, **info):
            pct = self.pct.get(trial.trial_id, 0.0)
            self.ended[trial.trial_id] = "finished" if pct >= 100.0 - 1e-9 else "stopped"
            loss = (trial.last_result or {}).get(METRIC)
            what = "finished" if pct >= 100.0 - 1e-9 else f"stopped by ASHA at {pct:.0f}% of its budget"
            shown = f" ({METRIC} {loss:.4f})" if loss is not None else ""
            self._say(f"trial {trial.trial_id} {what}{shown} | {self._counts(trials)}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.ended[trial.trial_id] = "error"
            self._say(f"trial {trial.trial_id} failed (see {trial.path}) | {self._counts(trials)}")

    return Progress()


def _interrupt_after(count: int):
    """Ends the search the way Ctrl+C does (Tune saves its state and stops; ``--resume`` continues)."""
    import signal

    from ray import tune

    class InterruptAfter(tune.Callback):
        def __init__(self):
            self.ended = 0

        def _end(self):
            self.ended += 1
            if self.ended == count:
                os.kill(os.getpid(), signal.SIGUSR1)  # Tune's own interrupt handler (tune.py)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._end()

        def on_trial_error(self, iteration, trials, trial, **info):
            self._end()

    return InterruptAfter()


def _flat(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's params for people: a ``point``'s fields inline, model overrides as dim/n_layers."""
    flat = {k: v for k, v in params.items() if k != "point"}
    for key, value in params.get("point", {}).items():
        if key == "model_overrides":
            flat.update({k: v for k, v in value.items() if k in ("dim", "n_layers")})
        elif key == "train.length":
            flat.update(value)
        elif not key.startswith("train.batch.micro"):
            flat[key.rsplit(".", 1)[-1]] = value
    return flat


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# ---- results ----------------------------------------------------------------------------------------
def collect(grid) -> list[dict[str, Any]]:
    """One row per trial from the ResultGrid: its config, size, budget, losses, status, where it stopped."""
    statuses = {t.trial_id: t.status for t in grid._experiment_analysis.trials}
    rows = []
    for result in grid:
        frame = result.metrics_dataframe
        records = [] if frame is None else frame.to_dict("records")
        records = [r for r in records if r.get(METRIC) is not None and not _isnan(r.get(METRIC))]
        last = records[-1] if records else (result.metrics or {})
        trial_id = (result.metrics or {}).get("trial_id") or last.get("trial_id") or os.path.basename(result.path)
        status = statuses.get(trial_id, "")
        pct = float(last.get(TIME_ATTR, 0.0) or 0.0)
        if result.error is not None or status == "ERROR":
            state = "error"
        elif status == "TERMINATED":
            state = "finished" if pct >= 100.0 - 1e-9 else "stopped"
        else:
            state = "unfinished"
        losses = [float(r[METRIC]) for r in records]
        rows.append({
            "trial": trial_id, "status": state, "params": dict(result.config or {}),
            "parameters": _int(last.get("parameters")), "flops_budget": last.get("flops_budget"),
            "flops": last.get("flops_used"), "tokens": _int(last.get("tokens_seen")),
            "steps": _int(last.get("step")), "total_steps": _int(last.get("total_steps")),
            "epochs": last.get("epochs"), "final_val_loss": losses[-1] if losses else None,
            "best_val_loss": min(losses) if losses else None,
            "final_val_bits_per_byte": last.get("val_bits_per_byte"),
            "curve": [(float(r.get("flops_used", 0.0)), float(r[METRIC])) for r in records],
        })
    return sorted(rows, key=lambda r: r["trial"])


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _int(value: Any) -> int | None:
    return None if value is None or _isnan(value) else int(value)


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Lowest final validation loss among trials that spent their whole budget (a stopped trial's loss
    is at a smaller budget, so it does not compete); among all trials when none finished."""
    for pool in ([r for r in rows if r["status"] == "finished"], rows):
        scored = [r for r in pool if r["final_val_loss"] is not None]
        if scored:
            return min(scored, key=lambda r: r["final_val_loss"])
    return None


def table_csv(rows: list[dict[str, Any]]) -> str:
    keys = sorted({k for r in rows for k in r["params"]})
    columns = ["trial", "status", *keys, "parameters", "flops_budget", "flops", "tokens", "steps", "total_steps",
               "epochs", "final_val_loss", "best_val_loss", "final_val_bits_per_byte"]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([row["params"].get(c, "") if c in keys else ("" if row.get(c) is None else row[c])
                         for c in columns])
    return out.getvalue()


def plot(rows: list[dict[str, Any]], best: dict[str, Any] | None, title: str) -> bytes:
    """Every trial's validation loss against the FLOPs it had spent (PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        if not row["curve"]:
            continue
        xs, ys = zip(*row["curve"])
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in row["params"].items())
        is_best = best is not None and row["trial"] == best["trial"]
        ax.plot(xs, ys, "o-" if row["status"] == "finished" else "x--", lw=2.5 if is_best else 1,
                label=f"{label} ({row['status']}{', best' if is_best else ''})")
    ax.set_xlabel("training FLOPs (6·N·D + attention)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def recipe_yaml(config: Config, best: dict[str, Any]) -> str:
    import yaml

    tree = search_space.apply(base_tree(config), best["params"])
    pretrain.Config.model_validate(tree)  # the recipe is a valid pretraining config as written
    header = (f"# The best trial of `groundup tune` on {config.run}: trial {best['trial']}, final validation loss "
              f"{best['final_val_loss']:.4f}\n# after {best['steps']} steps. Reproduce it with\n"
              f"#   groundup pretrain --config {RunDir(config.run).uri_of(STAGE, RECIPE_FILE)}\n")
    return header + yaml.safe_dump(tree, sort_keys=False)


def _print_table(rows: list[dict[str, Any]]) -> None:
    keys = sorted({k for r in rows for k in r["params"]})
    print("tune: trials (" + ", ".join(keys) + " | status | steps | val_loss final/best)", flush=True)
    for row in rows:
        params = ", ".join(_fmt(row["params"].get(k)) for k in keys)
        final = f"{row['final_val_loss']:.4f}" if row["final_val_loss"] is not None else "-"
        best = f"{row['best_val_loss']:.4f}" if row["best_val_loss"] is not None else "-"
        print(f"tune:   {row['trial']}: {params} | {row['status']} | {row['steps']}/{row['total_steps']} | "
              f"{final}/{best}", flush=True)


# ---- the stage ------------------------------------------------------------------------------------
def build_tuner(config: Config, dims, use_gpu: bool, max_concurrent: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    run = RunDir(config.run)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base_tree(config), run_uri=config.run, evaluations=config.evaluations),
        {"cpu": config.trial_cpus})
    if config.search == "grid":
        dims = [replace(d, kind="grid") if d.kind == "choice" else d for d in dims]
    if config.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=config.seed)  # Tune wraps it in a ConcurrencyLimiter
    else:  # a generator is not limited by Tune's max_concurrent_trials: it limits itself
        searcher = BasicVariantGenerator(random_state=config.seed, max_concurrent=max_concurrent)
    scheduler = (ASHAScheduler(time_attr=TIME_ATTR, max_t=100.0, grace_period=config.asha.grace_percent,
                               reduction_factor=config.asha.reduction_factor)
                 if config.asha.enabled else FIFOScheduler())
    callbacks = [_progress_callback()]
    if config.stop_after_trials:
        callbacks.append(_interrupt_after(config.stop_after_trials))
    tune_config = tune.TuneConfig(metric=METRIC, mode="min", scheduler=scheduler, search_alg=searcher,
                                  num_samples=1 if config.search == "grid" else config.num_samples,
                                  max_concurrent_trials=max_concurrent)
    run_config = tune.RunConfig(name=TUNER_NAME, storage_path=run.uri_of(STAGE), verbose=0, callbacks=callbacks)
    return tune.Tuner(trainable, param_space=search_space.param_space(dims), tune_config=tune_config,
                      run_config=run_config), trainable, callbacks


def sized_from_budget(config: Config) -> Config:
    """With a FLOPs budget, what ``groundup pretrain --flops C`` would choose for the fields the user left
    out: ``model=auto`` sizes the trials from the run's fitted scaling laws; batch and lr from the budget
    (``pipelines.scaling.resolve_budget``, which prints each choice and why)."""
    if config.budget.flops is None:
        if config.model == "auto":
            raise ConfigError("config field 'model': auto sizes the trials from a compute budget: give --flops C")
        return config
    from pipelines.scaling import resolve_budget

    given = config.model_dump(exclude_unset=True)
    fields = {k: v for k, v in given.items() if k in pretrain.Config.model_fields and k != "resume"}
    fields["run"] = config.run
    fields.setdefault("train", {})["length"] = {"flops": config.budget.flops}
    resolved = resolve_budget(pretrain.Config.model_validate(fields))
    return config.model_copy(update={"model": resolved.model, "model_overrides": resolved.model_overrides,
                                     "train": resolved.train})


def run(config: Config) -> dict[str, Any]:
    started = time.time()
    if not config.space:
        raise ConfigError("config field 'space': give --space FILE (a YAML search space)")
    dims = search_space.read_space(config.space)
    config = sized_from_budget(config)
    for dim in dims:  # an unknown or ill-typed field fails here, naming the space file
        trial_config(base_tree(config), {dim.key: dim.representatives()[0]}, f"space file {config.space}")
    from pipelines.train.trainer import prepare_storage

    run_dir = RunDir(config.run)
    tuner_uri = run_dir.uri_of(STAGE, TUNER_NAME)
    if config.resume:
        prepare_storage(run_dir.uri_of(STAGE), TUNER_NAME, resume=True)
    checked = check_space(config, dims)
    print(f"tune: search {config.search} over " + "; ".join(d.describe() for d in dims if d.kind != "constant"),
          flush=True)
    budget = (f"{config.budget.flops:.3g} FLOPs" if config.budget.flops is not None else
              f"{config.budget.steps} steps" if config.budget.steps is not None else "the base config's length")
    sizes = sorted({c["parameters"] for c in checked})
    print(f"tune: each trial gets {budget}: " + ", ".join(
        f"{c['parameters'] / 1e6:.2f}M params -> {c['steps']} steps, {c['tokens']:,} tokens, {c['epochs']:.2f} epochs"
        for c in _one_per_size(checked, sizes)), flush=True)
    for c in checked:
        if c["epochs"] > 1.0:
            print(f"tune: warning: trials like {c['params']} see the corpus {c['epochs']:.1f} times (tokens exceed "
                  "the training split): repeated data bends the loss curves", flush=True)
            break

    from pipelines.ray_env import ensure_ray
    from pipelines.train.trainer import decide_use_gpu

    ensure_ray(config.num_cpus)
    use_gpu, _ = decide_use_gpu(config.train.use_gpu, config.num_cpus)
    max_concurrent, why = concurrency(config, use_gpu)
    print(f"tune: up to {max_concurrent} trials at once ({why})", flush=True)

    from ray import tune

    tuner, trainable, callbacks = build_tuner(config, dims, use_gpu, max_concurrent)
    resumed = False
    if config.resume:
        if not tune.Tuner.can_restore(tuner_uri):
            raise ConfigError(f"--resume: no tune run to continue under {tuner_uri}")
        tuner = tune.Tuner.restore(tuner_uri, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=None)
        resumed = True
        print(f"tune: continuing the search in {tuner_uri}", flush=True)
    else:
        prepare_storage(run_dir.uri_of(STAGE), TUNER_NAME, resume=False)
        prepare_storage(run_dir.uri_of(STAGE), TRIALS_DIR, resume=False)
    mark = time.perf_counter()
    grid = tuner.fit()
    search_seconds = time.perf_counter() - mark
    return finish(config, grid, started, search_seconds, resumed, expected_trials(config, dims))


def expected_trials(config: Config, dims: list[search_space.Dimension]) -> int:
    if config.search == "grid":
        return search_space.grid_size([replace(d, kind="grid") if d.kind == "choice" else d for d in dims])
    return search_space.grid_size(dims) * config.num_samples


def _one_per_size(checked: list[dict[str, Any]], sizes: list[int]) -> list[dict[str, Any]]:
    return [next(c for c in checked if c["parameters"] == size) for size in sizes]


def finish(config: Config, grid, started: float, search_seconds: float, resumed: bool,
           expected: int) -> dict[str, Any]:
    run_dir = RunDir(config.run)
    rows = collect(grid)
    best = best_row(rows)
    ended = sum(r["status"] in ("finished", "stopped", "error") for r in rows)
    interrupted = ended < expected  # trials unfinished or never started: the search was cut short
    run_dir.write_text(f"{STAGE}/{TABLE_FILE}", table_csv(rows))
    png = plot(rows, best, f"tune — {config.run}")
    run_dir.write_bytes(f"{STAGE}/{CURVES_FILE}", png)
    outputs = {"trials_csv": TABLE_FILE, "curves_png": CURVES_FILE, "tuner": TUNER_NAME, "trials": TRIALS_DIR}
    if best is not None:
        run_dir.write_text(f"{STAGE}/{RECIPE_FILE}", recipe_yaml(config, best))
        outputs["best_recipe"] = RECIPE_FILE
    counts = {state: sum(r["status"] == state for r in rows) for state in ("finished", "stopped", "error", "unfinished")}
    manifest = new_manifest(
        STAGE, config, started,
        inputs={"data_manifest": run_dir.uri_of("data", "manifest.json"), "space": config.space},
        outputs=outputs,
        counts={"trials": len(rows), "planned": expected, **counts},
        figures={"best_trial": best["trial"] if best else None,
                 "best_val_loss": best["final_val_loss"] if best else None,
                 "best_params": best["params"] if best else None,
                 "trials": [{k: v for k, v in r.items() if k != "curve"} for r in rows]},
        timings={"search_s": round(search_seconds, 3), "resumed": resumed, "interrupted": interrupted},
    )
    run_dir.write_manifest(STAGE, manifest)
    _print_table(rows)
    if interrupted:
        print(f"tune: interrupted after {ended} of {expected} trials; continue with "
              f"`groundup tune --run {config.run} --space {config.space} --resume`", flush=True)
    if best is not None:
        print(f"tune: done — best trial {best['trial']} {METRIC} {best['final_val_loss']:.4f} "
              f"({', '.join(f'{k}={_fmt(v)}' for k, v in best['params'].items())}); recipe "
              f"{run_dir.uri_of(STAGE, RECIPE_FILE)}", flush=True)
    return manifest


if __name__ == "__main__":
    stage_main(STAGE)
