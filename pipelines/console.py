"""Output for people: what every stage prints, and where Ray's own messages go.

A command run from the CLI (:func:`start`) shows only

- our progress lines: one per phase, with documents/s or steps/s, MB/s and an ETA, redrawn in place on
  a terminal and printed once per interval (``GROUNDUP_PROGRESS_INTERVAL_S``, default 10 s) when the
  output is redirected (:class:`Progress`), and the stages' own summaries;
- warnings that matter: WARNING and above from Python loggers (Ray's included, minus a short list of
  known noise that says nothing a user can act on).

Ray's INFO logs, Ray Data's progress dumps and everything its worker processes print go to
``<run>/logs/<command>.log`` (the path is printed once). A line a stage prints from inside a Ray worker
with :func:`say` still reaches the console. ``--verbose`` (or ``GROUNDUP_VERBOSE=1``) leaves Ray's
console output as Ray makes it.

Stages need nothing of their own for this: the CLI calls :func:`start`, and
:func:`pipelines.ray_env.ensure_ray` calls :func:`before_ray_init` / :func:`after_ray_init`. Without
:func:`start` (Python callers, tests) Ray's output is left alone.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

MARKER = "\u2063\u2063\u2063"  # invisible separators: a worker line meant for the console
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "ray.air", "ray.util")
# Warnings Ray logs that a user can do nothing about (printed to the log file only).
NOISE = ("Token authentication is enabled", "PlacementGroupCleaner", "Failed to query Ray Train Controller",
         "Progress will be logged", "Progress bars disabled", "Tip: to disable", "--include-dashboard",
         "dashboard")


class _State:
    command: str | None = None
    run: str | None = None
    log_path: Path | None = None
    verbose: bool = False
    file_handler: logging.Handler | None = None
    log_lock = threading.Lock()


_state = _State()


def _env_verbose() -> bool:
    return os.environ.get("GROUNDUP_VERBOSE", "") not in ("", "0", "false")


def verbose() -> bool:
    """True when Ray's console output should stay as Ray makes it (``--verbose``, or no :func:`start`)."""
    return _state.command is None or _state.verbose


def log_path() -> Path | None:
    return _state.log_path


def _log_location(command: str, run: str | None) -> Path:
    from pipelines.rundir import cache_root, is_local, resolve_filesystem

    name = command.replace(" ", "-") + ".log"
    if run and is_local(run):
        return Path(resolve_filesystem(run)[1]) / "logs" / name
    # An object-store run: the log stays on this machine.
    return cache_root() / "logs" / (run or "default").replace("://", "_").replace("/", "_") / name


def start(command: str, run: str | None, verbose: bool = False) -> None:
    """Set up the console for one CLI command (the log file opens when Ray starts)."""
    _state.command, _state.run, _state.verbose = command, run, verbose or _env_verbose()


def _open_log() -> None:
    """Open ``<run>/logs/<command>.log`` and say once where Ray's messages go."""
    if _state.file_handler is not None or verbose():
        return
    path = _log_location(_state.command, _state.run)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError:
        # The stage checks its run directory and says so in one line; Ray's messages stay here meanwhile.
        _state.verbose = True
        return
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG)
    _state.log_path, _state.file_handler = path, handler
    print(f"{_state.command}: Ray's own messages go to {path} (--verbose shows them here)", flush=True)


class _NoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in NOISE)


class _ConsoleHandler(logging.StreamHandler):
    """WARNING and above, one line, no Ray timestamp/file prefix."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setLevel(logging.WARNING)
        self.addFilter(_NoiseFilter())
        super().setFormatter(logging.Formatter("%(levelname)s: %(message)s"))

    def setFormatter(self, fmt: logging.Formatter | None) -> None:  # ray.init sets its own on every handler
        pass


def route_ray_loggers() -> None:
    """Ray's Python loggers: everything to the log file, warnings that matter to the console."""
    if verbose() or _state.file_handler is None:
        return
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if handler is _state.file_handler or isinstance(handler, _ConsoleHandler):
                continue
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)  # Ray's own console handlers
        if name in ("ray", "ray.data"):  # ray.data does not propagate to "ray"
            if _state.file_handler not in logger.handlers:
                logger.addHandler(_state.file_handler)
            if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
                logger.addHandler(_ConsoleHandler())
            logger.setLevel(logging.INFO)
            logger.propagate = False
    if "ray.data" in sys.modules:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False


def ray_init_logging() -> dict[str, Any]:
    """The logging arguments of ``ray.init``: Ray sets up its console logger only in verbose mode."""
    _open_log()
    if verbose():
        return {"configure_logging": True, "logging_level": logging.WARNING}
    route_ray_loggers()
    # ray.init then keeps the handlers routed here (configure_logging=False would clear them) and only
    # sets the level: INFO reaches the log file, the console handler still shows WARNING and above.
    return {"configure_logging": True, "logging_level": logging.INFO}


def after_ray_init() -> None:
    """Once Ray runs: its loggers (ray.data configures its own) and its workers' output, routed."""
    if verbose():
        return
    route_ray_loggers()
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
    global_worker_stdstream_dispatcher.remove_handler("groundup_console")
    global_worker_stdstream_dispatcher.add_handler("groundup_console", _worker_lines)


def _worker_lines(data: dict[str, Any]) -> None:
    """Lines from Ray workers: ours (marked by :func:`say`) to the console, the rest to the log file."""
    shown: list[str] = []
    logged: list[str] = []
    who = data.get("actor_name") or data.get("task_name") or ""
    prefix = f"({who} pid={data.get('pid')}, ip={data.get('ip')}) "
    for line in data.get("lines", []):
        at = line.find(MARKER)
        if at >= 0:
            shown.append(line[at + len(MARKER):])
        else:
            logged.append(prefix + line)
    if shown:
        sys.stdout.write("".join(f"{line}\n" for line in shown))
        sys.stdout.flush()
    if logged and _state.file_handler is not None:
        with _state.log_lock:
            stream = getattr(_state.file_handler, "stream", None)
            if stream is not None:
                stream.write("".join(f"{line}\n" for line in logged))
                stream.flush()


def _in_ray_worker() -> bool:
    if "ray" not in sys.modules:
        return False
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:
        return False


def say(line: str, stream: TextIO | None = None) -> None:
    """One line for people. From inside a Ray worker it is marked so the driver shows it (once)."""
    out = stream or sys.stdout
    out.write((MARKER + line if _in_ray_worker() else line) + "\n")
    out.flush()


# ---------------------------------------------------------------- progress lines

def _duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """One phase's progress line: items/s, MB/s, ETA.

    On a terminal the line is redrawn in place (at most 5 times a second); redirected, a line is printed
    every ``interval_s``. :meth:`close` prints the phase's final line either way. ``total`` (items) or
    ``fraction`` (given to :meth:`update`) makes the ETA.
    """

    def __init__(self, label: str, unit: str = "docs", total: int | None = None, stream: TextIO | None = None,
                 interval_s: float | None = None):
        self.label, self.unit, self.total = label, unit, total
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = (0.2 if self.tty else float(os.environ.get("GROUNDUP_PROGRESS_INTERVAL_S", "10"))) \
            if interval_s is None else interval_s
        self.started = self._last = time.perf_counter()
        self.items, self.bytes, self.fraction = 0, 0, None
        self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(failed=exc[0] is not None)

    def update(self, items: int = 0, nbytes: int = 0, fraction: float | None = None) -> None:
        """Add ``items`` and ``nbytes`` done; ``fraction`` of the phase done when the total is not in items."""
        self.items += items
        self.bytes += nbytes
        if fraction is not None:
            self.fraction = fraction
        now = time.perf_counter()
        if now - self._last >= self.interval_s:
            self._last = now
            self._emit(self.line())

    def line(self, done: bool = False) -> str:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        parts = []
        if self.total:
            parts.append(f"{self.items:,}/{self.total:,} {self.unit}")
        else:
            parts.append(f"{self.items:,} {self.unit}")
        parts.append(f"{self.items / elapsed:,.1f} {self.unit}/s")
        if self.bytes:
            parts.append(f"{self.bytes / 1e6:,.2f} MB {self.bytes / 1e6 / elapsed:,.2f} MB/s")
        if done:
            parts.append(f"done in {_duration(elapsed)}")
        else:
            fraction = self.items / self.total if self.total else self.fraction
            eta = elapsed * (1 - fraction) / fraction if fraction else None
            parts.append(f"elapsed {_duration(elapsed)} ETA {_duration(eta)}")
        return f"{self.label}: " + "  ".join(parts)

    def _emit(self, line: str, final: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._drawn = True

    def close(self, failed: bool = False) -> None:
        if failed:
            if self.tty and self._drawn:
                self.stream.write("\n")
            return
        self._emit(self.line(done=True), final=True)
