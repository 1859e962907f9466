"""The console convention (pipelines/console.py): progress lines and where Ray's messages go."""
from __future__ import annotations

import io
import logging

from pipelines import console


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redirected_prints_one_line_per_interval_and_a_final_line():
    out = io.StringIO()
    progress = console.Progress("data: read", total=100, stream=out, interval_s=0.0)
    progress.update(50, 5_000_000)
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()
    assert lines[0].startswith("data: read: 50/100 docs") and "MB/s" in lines[0] and "ETA" in lines[0]
    assert "done in" in lines[1]
    quiet = io.StringIO()
    with console.Progress("x", stream=quiet, interval_s=3600) as slow:
        for _ in range(1000):
            slow.update(1)
    assert len(quiet.getvalue().splitlines()) == 1  # only the final line within one interval


def test_progress_on_a_terminal_redraws_in_place():
    out = _Tty()
    with console.Progress("pack", total=10, stream=out, interval_s=0.0) as progress:
        for _ in range(3):
            progress.update(1)
    text = out.getvalue()
    assert text.count("\r\x1b[2K") == 4 and text.count("\n") == 1 and text.endswith("\n")


def test_worker_lines_ours_to_the_console_the_rest_to_the_log(tmp_path, capsys, monkeypatch):
    handler = logging.FileHandler(tmp_path / "x.log")
    monkeypatch.setattr(console._state, "file_handler", handler)
    console._worker_lines({"pid": 7, "ip": "1.2.3.4", "actor_name": "RayTrainWorker",
                           "lines": [console.MARKER + "[pretrain] step 1/2", "PlacementGroupCleaner: failed"]})
    handler.close()
    assert capsys.readouterr().out == "[pretrain] step 1/2\n"
    assert "(RayTrainWorker pid=7, ip=1.2.3.4) PlacementGroupCleaner: failed" in (tmp_path / "x.log").read_text()


def test_ray_loggers_go_to_the_file_and_warnings_that_matter_stay_visible(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(console._state, "command", "data")
    monkeypatch.setattr(console._state, "run", str(tmp_path / "run"))
    monkeypatch.setattr(console._state, "verbose", False)
    monkeypatch.setattr(console._state, "file_handler", None)
    logger = logging.getLogger("ray.data")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    try:
        console.ray_init_logging()
        assert f"Ray's own messages go to {tmp_path / 'run' / 'logs' / 'data.log'}" in capsys.readouterr().out
        logging.getLogger("ray.data._internal.execution").info("Execution plan of Dataset: MapBatches(f)")
        logging.getLogger("ray").warning("Token authentication is enabled for this Ray cluster.")
        logging.getLogger("ray.data").warning("a warning that matters")
        err = capsys.readouterr().err
        assert "a warning that matters" in err and "Execution plan" not in err and "Token" not in err
        console._state.file_handler.flush()
        log = (tmp_path / "run" / "logs" / "data.log").read_text()
        assert "Execution plan" in log and "Token authentication" in log
    finally:
        for name in console.RAY_LOGGERS:
            for h in list(logging.getLogger(name).handlers):
                if h is console._state.file_handler or isinstance(h, console._ConsoleHandler):
                    logging.getLogger(name).removeHandler(h)
        logger.handlers[:] = saved[0]
        logger.propagate, logger.level = saved[1], saved[2]
        if console._state.file_handler is not None:
            console._state.file_handler.close()
