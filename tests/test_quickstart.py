"""The README's first command, end to end through the CLI (shortened: the 1m preset, a few steps)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.ray


def test_quickstart_runs_every_stage_and_prints_samples(ray_cluster, tmp_path):
    run = tmp_path / "quickstart"
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "quickstart", "--run", str(run),
                             "--model", "1m", "--steps", "3"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "samples from the trained model" in result.stdout
    manifest = json.loads((run / "quickstart" / "manifest.json").read_text())
    assert manifest["figures"]["documents_kept"] > 300
    assert len(manifest["outputs"]["samples"]) == 4
    assert (run / "pretrain" / "model" / "model.safetensors").is_file()
    assert json.loads((run / "data" / "manifest.json").read_text())["counts"]["kept"] > 300
