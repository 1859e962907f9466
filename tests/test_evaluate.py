"""Evaluation (issue 13): `groundup export`, `groundup evaluate` and its parts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def groundup(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """The CLI of this checkout, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def one_error_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---- export ---------------------------------------------------------------------------------------
def test_export_to_hugging_face_and_back_from_the_cli(serving_checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    from model.checkpoint import load_model

    hf_dir, back = tmp_path / "hf", tmp_path / "back"
    result = groundup("export", str(serving_checkpoint), "--format", "hf", str(hf_dir))
    assert result.returncode == 0, result.stderr
    assert "export:" in result.stdout
    ours = load_model(serving_checkpoint)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = torch.randint(8, ours.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), atol=1e-4, rtol=1e-4)

    result = groundup("export", str(hf_dir), str(back), "--from-hf")
    assert result.returncode == 0, result.stderr
    again = load_model(back)
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert (back / "tokenizer.model").read_bytes() == (serving_checkpoint / "tokenizer.model").read_bytes()

    # One line, exit 2, before any work: an existing output, a path that is not a model, the wrong direction.
    one_error_line(groundup("export", str(serving_checkpoint), "--format", "hf", str(hf_dir)), "exists", "--overwrite")
    one_error_line(groundup("export", str(tmp_path), "--format", "hf", str(tmp_path / "x")), str(tmp_path), "not a model")
    one_error_line(groundup("export", str(tmp_path / "missing"), str(tmp_path / "y")), "no such directory")
    one_error_line(groundup("export", str(serving_checkpoint), "--format", "gguf", str(tmp_path / "z")), "'format'")
    one_error_line(groundup("export", str(hf_dir), str(tmp_path / "w")), "--from-hf")
    one_error_line(groundup("export", str(serving_checkpoint)), "'output'")
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()
