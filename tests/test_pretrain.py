"""Pretraining on the session Ray cluster with real DeepSpeed: loss falls, ZeRO stages 0-3 agree, a
worker killed mid-run is survived from the last checkpoint, --resume reproduces the uninterrupted
run, and the exported weights load in model/ and generate.

Every run shares one data directory (the real data stage on the built-in corpus, 64-token rows) and
the same small config (preset 1m, 2 workers, 8 steps, fp32 so runs compare tightly)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PRETRAIN_OVERRIDES, run_with_data

STEPS = 8
LOSS_TOLERANCE = 2e-3
BASE_OVERRIDES = list(PRETRAIN_OVERRIDES)


def _run_dir(tmp_path_factory, data_dir: Path, name: str) -> Path:
    return run_with_data(tmp_path_factory, data_dir, name)


def _config(run: Path, *extra: str):
    from pipelines.config import build_config
    from pipelines.pretrain import Config

    return build_config(Config, overrides=[f"run={run}", *BASE_OVERRIDES, *extra])


def _train_losses(run: Path) -> dict[int, float]:
    from pipelines.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run / "pretrain" / "metrics.jsonl") if r["kind"] == "train"}


def _pretrain(run: Path, *extra: str) -> dict:
    from pipelines.pretrain import run as pretrain

    return pretrain(_config(run, *extra))


@pytest.fixture(scope="module")
def data_dir(builtin_data_dir) -> Path:
    return builtin_data_dir


@pytest.fixture(scope="module")
def reference_run(pretrained_run) -> tuple[Path, dict]:
    """An uninterrupted ZeRO-0 run: the baseline every other run is compared with."""
    return pretrained_run


def test_loss_falls_and_manifest_reports_validation(reference_run, data_dir):
    from pipelines.train.data import shards_from_manifest, unigram_bits_per_byte

    run, manifest = reference_run
    losses = _train_losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 0.3, losses
    figures = manifest["figures"]
    assert figures["val_loss"] > 0 and figures["val_perplexity"] == pytest.approx(2.718281828 ** figures["val_loss"], rel=1e-6)
    assert 0 < figures["val_bits_per_byte"] and figures["unigram_bits_per_byte"] > 0
    # The data stage counts the baseline while packing; counting the written shards gives the same figure.
    data = json.loads((data_dir / "manifest.json").read_text())["outputs"]
    shards = shards_from_manifest(str(data_dir), data["splits"]["train"], 64)
    assert figures["unigram_bits_per_byte"] == pytest.approx(
        unigram_bits_per_byte(shards, data["splits"]["train"]["bytes"], data["vocab_size"]), rel=1e-12)
    assert manifest["counts"]["steps"] == STEPS and manifest["counts"]["tokens"] == STEPS * 512
    written = json.loads((run / "pretrain" / "manifest.json").read_text())
    assert written["figures"]["val_bits_per_byte"] == figures["val_bits_per_byte"]
    out = run / "pretrain"
    assert (out / "curves.png").stat().st_size > 1000
    assert any((out / "tensorboard").iterdir())
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [e["step"] for e in evals] == [4, 8]
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["grad_norm"] > 0 for r in train)


def test_checkpoints_are_complete_and_retention_applies(reference_run):
    run, manifest = reference_run
    checkpoints = sorted(p.name for p in (run / "pretrain" / "ray").glob("checkpoint-step*"))
    assert checkpoints == ["checkpoint-step00000004", "checkpoint-step00000008"]
    last = run / "pretrain" / "ray" / checkpoints[-1]
    state = json.loads((last / "trainer_state-rank1.json").read_text())
    assert state["step"] == STEPS and state["data_position"]["step"] == STEPS and "torch" in state["rng"]
    assert (last / "model" / "model.safetensors").is_file() and (last / "ds" / "state").is_dir()


def test_exported_weights_load_and_generate(reference_run):
    from model.checkpoint import load_model, load_tokenizer
    from model.generate import SamplingParams, generate

    run, _ = reference_run
    model = load_model(run / "pretrain" / "model")
    tokenizer = load_tokenizer(run / "pretrain" / "model")
    assert model.config.max_seq_len == 64 and model.config.vocab_size == tokenizer.vocab_size
    out = generate(model, [tokenizer.encode("def main")], SamplingParams(max_new_tokens=8, temperature=0), tokenizer)
    assert len(out[0].token_ids) >= 1 and isinstance(out[0].text, str)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_match_stage_0(reference_run, data_dir, tmp_path_factory, stage):
    reference = _train_losses(reference_run[0])
    run = _run_dir(tmp_path_factory, data_dir, f"zero{stage}")
    manifest = _pretrain(run, f"train.zero.stage={stage}", "train.eval.samples=0")
    losses = _train_losses(run)
    assert sorted(losses) == sorted(reference)
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, abs=LOSS_TOLERANCE), (stage, step)
    assert manifest["figures"]["val_loss"] == pytest.approx(reference_run[1]["figures"]["val_loss"], abs=LOSS_TOLERANCE)


def test_killed_worker_resumes_from_last_checkpoint(reference_run, data_dir, tmp_path_factory):
    """Rank 1 exits abruptly at step 6; Ray Train restarts the workers from the step-4 checkpoint."""
    reference = _train_losses(reference_run[0])
    run = _run_dir(tmp_path_factory, data_dir, "fault")
    manifest = _pretrain(run, "train.zero.stage=0", "train.fault.crash_at_step=6", "train.fault.crash_rank=1",
                         "train.max_failures=1", "train.eval.samples=0")
    assert (run / "pretrain" / "fault-injected-step6-rank1").is_file()
    logged_steps = [json.loads(line)["step"] for line in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()
                    if '"train"' in line]
    assert logged_steps.count(5) == 2  # step 5 ran before the crash and again after the restore
    losses = _train_losses(run)
    for step in range(1, STEPS + 1):
        assert losses[step] == pytest.approx(reference[step], abs=LOSS_TOLERANCE), step
    assert manifest["counts"]["steps"] == STEPS
    assert manifest["figures"]["final_train_loss"] == pytest.approx(reference[STEPS], abs=LOSS_TOLERANCE)


def test_resume_in_a_new_job_reproduces_the_next_steps(reference_run, data_dir, tmp_path_factory):
    """Stop after step 4 (as if preempted), then a new TorchTrainer run with resume=True (`--resume`)."""
    reference = _train_losses(reference_run[0])
    run = _run_dir(tmp_path_factory, data_dir, "resume")
    stopped = _pretrain(run, "train.zero.stage=0", "train.stop_at_step=4", "train.eval.samples=0")
    assert stopped["counts"]["steps"] == 4
    manifest = _pretrain(run, "train.zero.stage=0", "train.eval.samples=0", "resume=true")
    losses = _train_losses(run)
    for step in range(5, STEPS + 1):
        assert losses[step] == pytest.approx(reference[step], abs=LOSS_TOLERANCE), step
    assert manifest["counts"]["steps"] == STEPS and manifest["timings"]["resumed"] is True


def test_cli_resume_without_a_previous_run_exits_2(data_dir, tmp_path_factory):
    run = _run_dir(tmp_path_factory, data_dir, "no-previous")
    proc = subprocess.run([sys.executable, "-m", "pipelines.pretrain", "--run", str(run), "--resume"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 2 and "--resume" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, needle", [
    (["--run", "{tmp}/missing"], "data/manifest.json"),
    (["--run", "{tmp}/missing", "--zero", "5"], "train.zero.stage"),
    (["--run", "{tmp}/missing", "--model", "7b"], "model"),
    (["--run", "{tmp}/missing", "train.batch.micro_batch_size=0"], "train.batch.micro_batch_size"),
])
def test_cli_bad_config_exits_2_with_one_line(tmp_path, args, needle):
    proc = subprocess.run([sys.executable, "-m", "pipelines.pretrain", *[a.format(tmp=tmp_path) for a in args]],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_gpu_use_is_decided_by_the_cluster_not_the_driver(ray_cluster):
    """The driver here has no CUDA; a node advertising a GPU makes training ask for GPUs (bf16 assumed,
    checked on the worker); an explicit setting always wins."""
    import ray

    from pipelines.train.trainer import decide_use_gpu

    assert decide_use_gpu(None) == (False, True)
    assert decide_use_gpu(True) == (True, True)
    node = ray_cluster.add_node(num_cpus=0, num_gpus=1)
    try:
        ray_cluster.wait_for_nodes()
        assert ray.cluster_resources().get("GPU") == 1
        assert decide_use_gpu(None) == (True, True)
        assert decide_use_gpu(False) == (False, True)
    finally:
        ray_cluster.remove_node(node)
        deadline = time.monotonic() + 60  # later tests must not see the GPU (their training would wait for it)
        while ray.cluster_resources().get("GPU", 0) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not ray.cluster_resources().get("GPU", 0)


def test_compiled_model_trains_like_eager_and_progress_shows_once(reference_run, data_dir, tmp_path_factory):
    """train.compile=true (nn.Module.compile in each worker) gives the eager run's losses and a checkpoint
    with the usual weight names; each progress line reaches the console once (Train's print patch doubled them)."""
    reference = _train_losses(reference_run[0])
    run = _run_dir(tmp_path_factory, data_dir, "compiled")
    overrides = [f"run={run}", *BASE_OVERRIDES, "train.zero.stage=0", "train.compile=true", "train.eval.samples=0"]
    proc = subprocess.run([sys.executable, "-m", "pipelines.pretrain", *overrides], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = _train_losses(run)
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, abs=LOSS_TOLERANCE), step
    progress = [line for line in proc.stdout.splitlines() if f"[pretrain] step {STEPS}/{STEPS}" in line]
    assert len(progress) == 1, progress

    from model.checkpoint import load_model

    load_model(run / "pretrain" / "model")  # strict load: no "_orig_mod." prefixes


def test_object_store_run_directory(object_store, reference_run, data_dir, tmp_path):
    """A run directory in an object store (the S3 API, served by moto): the data stage writes there the
    bytes it writes locally; pretraining reads its shards from there, stops, resumes in a new job (rank 0
    fetching its logs back) and ends on the reference run's losses with every output uploaded; serving
    loads the model straight from the URI."""
    import pyarrow.fs as pafs
    import torch

    from pipelines.config import build_config
    from pipelines.data.stage import Config as DataConfig
    from pipelines.data.stage import run as data_run
    from pipelines.rundir import RunDir, local_copy, scratch_dir
    from pipelines.train.metrics import read_metrics
    from serving.app import ModelEntry
    from serving.model_server import load_for_serving

    uri = f"s3://{object_store}/runs/pretrain-test"
    data_run(build_config(DataConfig, overrides=[f"run={uri}", "tokenizer.vocab_size=1024", "pack.sequence_length=64",
                                                 "dedup.near=false"]))
    run = RunDir(uri)
    fs = run.fs
    listing = fs.get_file_info(pafs.FileSelector(run.path("data"), recursive=True))
    written = [e.path.split("/data/", 1)[1] for e in listing if e.type == pafs.FileType.File]
    compared = [name for name in written if name.startswith("shards/") or name.endswith("tokenizer.model")]
    assert any(name.startswith("shards/train/") for name in compared)
    for name in compared:
        assert run.read_bytes(f"data/{name}") == (data_dir / name).read_bytes(), name

    reference = _train_losses(reference_run[0])
    stopped = _pretrain(uri, "train.zero.stage=0", "train.stop_at_step=4")
    assert stopped["counts"]["steps"] == 4 and stopped["outputs"]["checkpoint"].startswith(f"{uri}/pretrain/ray/")
    _pretrain(uri, "train.zero.stage=0", "resume=true")
    # The manifest, metrics, TensorBoard events, curves and model are in the bucket, nothing only on this node.
    shutil.rmtree(scratch_dir(run.uri_of("pretrain")), ignore_errors=True)
    manifest = run.read_manifest("pretrain")
    assert manifest["counts"]["steps"] == STEPS and manifest["timings"]["resumed"] is True
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(run.read_bytes("pretrain/metrics.jsonl"))
    losses = {r["step"]: r["loss"] for r in read_metrics(metrics) if r["kind"] == "train"}
    assert sorted(losses) == list(range(1, STEPS + 1))  # steps 1-4 survived the new job: fetched back from the bucket
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, abs=LOSS_TOLERANCE), step
    assert manifest["figures"]["unigram_bits_per_byte"] == pytest.approx(reference_run[1]["figures"]["unigram_bits_per_byte"])
    assert run.exists("pretrain", "curves.png") and run.exists("pretrain", "tensorboard")

    entry = ModelEntry(name="s3-model", path=f"{uri}/pretrain/model")
    assert entry.path == f"{uri}/pretrain/model" and entry.format == "groundup" and entry.max_context == 64
    model, tokenizer = load_for_serving(entry.path, torch.device("cpu"), "float32")
    from model.checkpoint import load_model

    local = load_model(local_copy(f"{uri}/pretrain/model"))
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), local.state_dict().values()))
    assert tokenizer.vocab_size == local.config.vocab_size

