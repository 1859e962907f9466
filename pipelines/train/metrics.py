"""What the user sees while training: a progress line with ETA, a JSONL log, TensorBoard events,
MFU against the device peak, and PNG curves at the end. Only rank 0 logs."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CURVES_FILE = "curves.png"


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def format_rate(value: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.1f} {unit}"


def say(line: str) -> None:
    """One line to the console, once.

    Inside a Ray Train worker ``print`` is patched to tee into Train's logger as well as the stream, and
    both reach the driver: every progress line showed twice. Writing to the stream directly shows it
    once (and it still lands in the worker's log file).
    """
    from pipelines.console import say as console_say

    console_say(line)


class MetricsLogger:
    """Rank 0's sink for step and evaluation metrics."""

    def __init__(self, out_dir: Path, total_steps: int, tokens_per_step: int, flops_per_token: float,
                 peak_flops: float, log_every: int, start_step: int, enabled: bool = True, prefix: str = "train",
                 progress_figures: tuple[str, ...] = ()):
        self.enabled = enabled
        self.progress_figures = progress_figures
        self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.log_every, self.prefix = log_every, prefix
        self.start_step, self.started = start_step, time.perf_counter()
        self.step_seconds: list[float] = []
        self.tokens_seen = 0  # tokens processed since this (re)start, for Tasks that count their own
        self.writer = None
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = (out_dir / METRICS_FILE).open("a")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / TENSORBOARD_DIR), purge_step=start_step + 1)
            except ImportError:  # tensorboard is optional for the loop itself
                self.writer = None

    def _write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "kind", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def step(self, step: int, loss: float, lr: float, grad_norm: float | None, seconds: float,
             tokens: int | None = None, metrics: dict[str, float] | None = None) -> dict[str, Any]:
        """Record optimizer step ``step`` (1-based) that took ``seconds``. ``tokens``: the tokens the step
        really processed, when a Task knows it (padded batches); else the plan's tokens per step."""
        self.step_seconds.append(seconds)
        step_tokens = tokens if tokens is not None else self.tokens_per_step
        self.tokens_seen += step_tokens
        tokens_per_s = step_tokens / seconds
        model_flops = tokens_per_s * self.flops_per_token
        record = {"kind": "train", "step": step, "time": time.time(), "loss": loss, "lr": lr,
                  "grad_norm": grad_norm, "tokens": step * self.tokens_per_step if tokens is None else self.tokens_seen,
                  "tokens_per_s": tokens_per_s, "model_flops_per_s": model_flops,
                  "mfu": model_flops / self.peak_flops if self.peak_flops else None, **(metrics or {})}
        self._write(record)
        if self.enabled and (step % self.log_every == 0 or step == self.total_steps or step == self.start_step + 1):
            say(self.progress_line(record))
        return record

    def recent_step_seconds(self) -> float:
        # Skip the first step after a (re)start: it pays for warm-up and allocation.
        recent = self.step_seconds[1:][-50:] or self.step_seconds
        return sum(recent) / len(recent)

    def progress_line(self, record: dict[str, Any]) -> str:
        step = record["step"]
        eta = (self.total_steps - step) * self.recent_step_seconds()
        pct = 100.0 * step / self.total_steps
        gnorm = f"{record['grad_norm']:.3f}" if record["grad_norm"] is not None else "-"
        mfu = f"{100 * record['mfu']:.1f}%" if record["mfu"] is not None else "-"
        extra = "".join(f"{name} {record[name]:.4f} | " for name in self.progress_figures if name in record)
        return (f"[{self.prefix}] step {step}/{self.total_steps} ({pct:.0f}%) | loss {record['loss']:.4f} | {extra}"
                f"lr {record['lr']:.2e} | gnorm {gnorm} | {format_rate(record['tokens_per_s'], 'tok/s')} | "
                f"{format_rate(record['model_flops_per_s'], 'FLOP/s')} MFU {mfu} | "
                f"elapsed {format_duration(time.perf_counter() - self.started)} ETA {format_duration(eta)}")

    def evaluation(self, step: int, metrics: dict[str, float], samples: list[str] = ()) -> None:
        self._write({"kind": "eval", "step": step, "time": time.time(), **metrics})
        if not self.enabled:
            return
        shown = " | ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        say(f"[{self.prefix}] eval @ step {step}: {shown}")
        for index, text in enumerate(samples):
            say(f"[{self.prefix}]   sample {index}: {text!r}")
            if self.writer is not None:
                self.writer.add_text(f"samples/{index}", text, step)

    def flush(self) -> None:
        if self.enabled:
            self.jsonl.flush()
            if self.writer is not None:
                self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics log; for a step logged twice (recomputed after a restore) the last wins."""
    if not path.is_file():
        return []
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            latest[(record["kind"], record["step"])] = record
    return sorted(latest.values(), key=lambda r: (r["step"], r["kind"]))


def plot_curves(records: list[dict[str, Any]], target: Path, title: str) -> Path | None:
    """Training loss (and learning rate) with validation loss on one PNG."""
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval" and "val_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_loss.set_title(title)
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def plot_series(records: list[dict[str, Any]], names: tuple[str, ...], target: Path, title: str) -> Path | None:
    """One panel per training metric (e.g. PPO's reward and KL per iteration), with the validation
    figure of the same name where evaluations logged one."""
    train = [r for r in records if r["kind"] == "train"]
    names = tuple(n for n in names if any(n in r for r in train))
    if not names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(names), 1, figsize=(8, 2.2 * len(names)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        points = [(r["step"], r[name]) for r in train if r.get(name) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", ms=3, lw=1, label=name)
        ax.set_ylabel(name.split("/")[-1])
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    axes[0, 0].set_title(title)
    axes[-1, 0].set_xlabel("iteration")
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target
