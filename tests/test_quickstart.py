"""The README's first command, end to end through the CLI (shortened: the 1m preset, a few steps), and
its console: our progress lines and summaries only, Ray's own messages in the run's log file."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.ray

# Lines only Ray's internals print: log records with Ray's "file.py:123 --" prefix, worker-prefixed
# output, Ray Data's execution plans and progress dumps, Ray Train's cleaner.
RAY_INTERNAL = re.compile(r"\.py:\d+ -- |\((?:pid=|\w+ pid=)|logging_progress|streaming_executor|MapBatches\(|"
                          r"PlacementGroupCleaner|Token authentication|Running Dataset|RayTrainWorker|"
                          r"TrainController|object store|DataContext|Progress bars")


def test_quickstart_runs_every_stage_prints_samples_and_replies_quietly(ray_cluster, tmp_path):
    run = tmp_path / "quickstart"
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "quickstart", "--run", str(run),
                             "--model", "1m", "--steps", "3", "--sft-steps", "3", "--ppo-steps", "2"], capture_output=True, text=True,
                            timeout=900, env={**os.environ, "GROUNDUP_PROGRESS_INTERVAL_S": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "samples from the trained model" in result.stdout
    manifest = json.loads((run / "quickstart" / "manifest.json").read_text())
    assert manifest["figures"]["documents_kept"] > 300
    assert len(manifest["outputs"]["samples"]) == 4
    assert (run / "pretrain" / "model" / "model.safetensors").is_file()
    assert (run / "sft" / "model" / "model.safetensors").is_file()
    replies = manifest["outputs"]["replies"]
    assert len(replies) == 5 and all({"question", "base", "sft", "ppo"} <= set(r) for r in replies)
    assert (run / "ppo" / "model" / "model.safetensors").is_file()
    assert replies[0]["question"] in result.stdout
    assert json.loads((run / "data" / "manifest.json").read_text())["counts"]["kept"] > 300
    # The console: ours only.
    lines = (result.stdout + result.stderr).splitlines()
    noise = [line for line in lines if RAY_INTERNAL.search(line)]
    assert noise == [], "\n".join(noise[:20])
    assert sum(1 for line in lines if not line.strip()) <= 3
    assert any(line.startswith("data: read, clean, filter") for line in lines)
    assert any("[pretrain] step" in line for line in lines) and any("[sft] step" in line for line in lines)
    assert any("[ppo] step" in line for line in lines)
    log = run / "logs" / "quickstart.log"
    assert f"Ray's own messages go to {log}" in result.stdout and log.stat().st_size > 0
