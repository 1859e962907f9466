"""``groundup tune`` on the session's Ray cluster: a grid of three learning rates for the 1m preset, one
trial at a time, interrupted after the first trial (as Ctrl+C would) and resumed. ASHA stops the bad
trial early and its Train workers end; the table, curves and best recipe are written; the recipe run by
``groundup pretrain`` reproduces the best trial's loss; the resumed search does not repeat the finished
trial. Plus the search-space file's checks, without Ray."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_with_data

STEPS = 8
GOOD_LR, GOOD2_LR, BAD_LR = 3e-3, 2e-3, 1e-6
TRIAL_OVERRIDES = (
    "model=1m", "sequence_length=64", "seed=0", "train.num_workers=1", "train.precision.dtype=fp32",
    "train.batch.micro_batch_size=4", "train.batch.global_batch_tokens=256", "train.schedule.warmup_steps=1",
    "train.eval.max_rows=16", "train.eval.samples=0", "train.log_every=4",
)
SPACE = f"train.optimizer.lr: {{grid: [{GOOD_LR}, {GOOD2_LR}, {BAD_LR}]}}\n"


def _tune_config(run: Path, space: Path, *extra: str):
    from pipelines.config import build_config
    from pipelines.tune import Config

    return build_config(Config, overrides=[f"run={run}", f"space={space}", *TRIAL_OVERRIDES, "search=grid",
                                           f"budget.steps={STEPS}", "evaluations=4", "max_concurrent_trials=1",
                                           *extra])


@pytest.fixture(scope="session")
def tune_run(builtin_data_dir, tmp_path_factory):
    """(run, first manifest (interrupted after one trial), final manifest, placement groups before)."""
    import ray

    from pipelines.tune import run

    directory = run_with_data(tmp_path_factory, builtin_data_dir, "tuned")
    space = directory / "space.yaml"
    space.write_text(SPACE)
    groups_before = set(ray.util.placement_group_table())
    first = run(_tune_config(directory, space, "stop_after_trials=1"))
    final = run(_tune_config(directory, space, "resume=true"))
    return directory, first, final, groups_before


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "tune" / "trials.csv").open() as fh:
        return list(csv.DictReader(fh))


def _by_lr(rows, lr: float):
    return next(r for r in rows if abs(float(r["train.optimizer.lr"]) - lr) < lr * 1e-6)


@pytest.mark.ray
def test_table_curves_and_recipe_are_complete(tune_run):
    run, _, manifest, _ = tune_run
    rows = _rows(run)
    assert len(rows) == 3 and manifest["counts"]["trials"] == 3
    for row in rows:
        assert row["status"] in ("finished", "stopped")
        for column in ("parameters", "flops_budget", "flops", "tokens", "steps", "total_steps", "epochs",
                       "final_val_loss", "best_val_loss"):
            assert row[column] != "", (column, row)
        assert int(row["total_steps"]) == STEPS
        assert float(row["best_val_loss"]) <= float(row["final_val_loss"]) + 1e-9
    assert (run / "tune" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = min((r for r in rows if r["status"] == "finished"), key=lambda r: float(r["final_val_loss"]))
    assert manifest["figures"]["best_trial"] == best["trial"]
    assert (run / "tune" / "best.yaml").is_file() and (run / "tune" / "manifest.json").is_file()


@pytest.mark.ray
def test_asha_stops_the_bad_trial_and_its_workers_end(tune_run):
    import ray
    from ray.util.state import list_actors

    run, _, _, groups_before = tune_run
    rows = _rows(run)
    bad = _by_lr(rows, BAD_LR)
    assert bad["status"] == "stopped" and int(bad["steps"]) < STEPS, bad
    assert _by_lr(rows, GOOD_LR)["status"] == "finished"
    # Ray Train's PlacementGroupCleaner frees the killed trial's workers once the State API answers.
    deadline = time.monotonic() + 60
    while True:
        table = ray.util.placement_group_table()
        leaked = [pg for pg, info in table.items() if pg not in groups_before and info["state"] != "REMOVED"]
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        if not leaked and not workers:
            break
        assert time.monotonic() < deadline, f"placement groups {leaked} / workers {workers} still held"
        time.sleep(1)


@pytest.mark.ray
def test_resume_does_not_repeat_finished_trials(tune_run):
    run, first, final, _ = tune_run
    assert first["timings"]["interrupted"] and first["counts"]["finished"] == 1
    assert not final["timings"]["interrupted"] and final["timings"]["resumed"]
    finished_first = next(t["trial"] for t in first["figures"]["trials"] if t["status"] == "finished")
    log = run / "tune" / "trials" / finished_first / "metrics.jsonl"
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1)), "the finished trial ran again after --resume"
    assert {t["trial"] for t in final["figures"]["trials"]} >= {t["trial"] for t in first["figures"]["trials"]}


@pytest.mark.ray
def test_best_recipe_reproduces_the_best_loss_with_pretrain(tune_run):
    from pipelines.config import build_config
    from pipelines.pretrain import Config
    from pipelines.pretrain import run as pretrain

    run, _, manifest, _ = tune_run
    config = build_config(Config, yaml_path=run / "tune" / "best.yaml")
    assert Path(config.run) == run
    result = pretrain(config)
    assert result["figures"]["val_loss"] == pytest.approx(manifest["figures"]["best_val_loss"], rel=1e-3)


# ---- one-line errors, exit 2, before any work ----------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.tune", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.ray
def test_bad_space_unknown_field_and_impossible_budget_fail_in_one_line(builtin_data_dir, tmp_path, capsys):
    from pipelines.cli import main

    run = run_with_data_path(builtin_data_dir, tmp_path)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train.optimizer.lr: {loguniform: [1e-4\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train.optimizer.lrr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    good = tmp_path / "good.yaml"
    good.write_text("train.optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}\nmodel_overrides.n_layers: {choice: [2, 8]}\n")

    result = _cli("--run", str(run), "--space", str(broken), "model=1m")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "space file" in result.stderr and "broken.yaml" in result.stderr

    for args, expected in (
        (["--space", str(unknown)], "train.optimizer.lrr"),
        (["--space", str(good), "--flops", "1e3"], "budget.flops"),
        (["--space", str(good), "--search", "grid"], "search=grid"),
    ):
        capsys.readouterr()
        assert main(["tune", "--run", str(run), "model=1m", "sequence_length=64", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err


def run_with_data_path(data_dir: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "data").symlink_to(data_dir)
    return run


# ---- the space file, without Ray -------------------------------------------------------------------
def test_space_file_spellings_and_mistakes(tmp_path):
    from pipelines.config import ConfigError
    from pipelines.tuning.space import corners, read_space

    space = tmp_path / "space.yaml"
    space.write_text("train:\n  optimizer:\n    lr: {loguniform: [1e-4, 1.0e-2]}\n    weight_decay: 0.05\n"
                     "train.batch.global_batch_tokens: {choice: [256, 512]}\nmodel_overrides.n_layers: {grid: [2, 4]}\n"
                     "train.schedule.warmup_fraction: {uniform: [0.0, 0.1]}\n")
    dims = {d.key: d for d in read_space(space)}
    assert dims["train.optimizer.lr"].kind == "loguniform" and dims["train.optimizer.weight_decay"].kind == "constant"
    assert dims["model_overrides.n_layers"].args == (2, 4)
    assert len(corners(list(dims.values()))) == 2 * 2 * 2 * 2
    shipped = Path(__file__).resolve().parent.parent / "pipelines" / "recipes" / "tune_space.yaml"
    from pipelines.tune import Config, base_tree, trial_config

    for dim in read_space(shipped):  # the example in the README names real fields
        trial_config(base_tree(Config()), {dim.key: dim.representatives()[-1]})
    for text, expected in (("lr: {normal: [0, 1]}", "unknown distribution"),
                           ("lr: {loguniform: [0, 1]}", "low > 0"), ("lr: {uniform: [2, 1]}", "low < high"),
                           ("lr: {choice: []}", "non-empty list"), ("lr: 0.1", "no field to search"),
                           ("- a\n- b", "mapping")):
        space.write_text(text + "\n")
        with pytest.raises(ConfigError, match=expected):
            read_space(space)
