"""``groundup scaling``'s family, planning and outputs, ``scaling predict`` and ``pretrain --model auto``.

The fitted laws come from a scaling manifest written by the stage's own ``finish`` from IsoFLOP points
whose losses follow a known L(N, D) (the sweep itself, Tune trials of the training core, is the same trial
function ``groundup tune`` runs, tested in test_tune.py; benchmarks/bench_scaling.py runs a real sweep)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_with_data

VOCAB, SEQ = 1024, 64
BUDGETS = (1e10, 3e10, 1e11)
# A known L(N, D) whose compute-optimal N lies inside the family at these budgets.
E, A, B, ALPHA, BETA = 2.0, 60.0, 40.0, 0.3, 0.3


def _law(n, d):
    return E + A / n ** ALPHA + B / d ** BETA


def _config(run: Path, *extra: str):
    from pipelines.config import build_config
    from pipelines.scaling import Config

    return build_config(Config, overrides=[f"run={run}", "model=1m", f"sequence_length={SEQ}",
                                           "budgets=[1e10, 3e10, 1e11]", "sizes=5", "tokens_per_parameter=2",
                                           "family.max_size=8", "min_steps=8", "bootstrap=50",
                                           "train.eval.samples=0", "train.precision.dtype=fp32", *extra])


def write_synthetic_fit(run: Path) -> dict:
    """A scaling manifest in ``run`` fitted from points on the known law (as the stage writes it)."""
    from pipelines.scaling import finish, fit, plan_points

    config = _config(run)
    points, members = plan_points(config, {"vocab_size": VOCAB, "sequence_length": SEQ})
    for point in points:
        point.update(loss=_law(point["n"], point["tokens"]), steps=1, epochs=0.0, trial="synthetic", status="finished")
    fitted = fit(points, config, [4 * BUDGETS[-1]])
    return finish(config, points, fitted, None, members, time.time(), 0.0)


def test_family_is_one_dial_of_valid_models():
    from pipelines.scaling import FamilyConfig, batch_for, choose_sizes, family_members

    config = _config(Path("unused"))
    members = family_members(config, VOCAB, SEQ)
    ns = [m["n"] for m in members]
    assert ns == sorted(ns) and len(set(ns)) == len(ns)  # every step of the dial is a bigger model
    assert [m["lr"] for m in members] == sorted((m["lr"] for m in members), reverse=True)
    chosen = choose_sizes(members, 3e10, 5, 2.0, 4.0)
    assert len(chosen) == 5 and len({m["size"] for m in chosen}) == 5
    assert FamilyConfig().overrides(3) == {"dim": 96, "n_layers": 2, "n_heads": 6, "n_kv_heads": 3}
    batch, micro, why = batch_for(config, tokens=2048, seq=SEQ)
    assert batch * 8 <= 2048 and "at least 8 steps" in why and micro >= 1


def test_fit_writes_laws_plot_and_points(tmp_path):
    manifest = write_synthetic_fit(tmp_path)
    figures = manifest["figures"]
    assert len(figures["isoflops"]) == 3 and "laws" in figures and "approach3" in figures
    # The known law has α = β: N* and D* grow alike (exponents 0.5 each, read through a discrete family).
    assert figures["a"] == pytest.approx(0.5, abs=0.15) and figures["a"] + figures["b"] == pytest.approx(1.0)
    assert figures["approach3"]["alpha"] == pytest.approx(ALPHA, abs=0.05)
    low, high = figures["a_interval"]
    assert low <= high
    assert (tmp_path / "scaling" / "isoflop.png").read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "scaling" / "points.csv").read_text().splitlines()) == 1 + 3 * 5


def test_predict_returns_a_size_inside_the_family(tmp_path):
    from pipelines.scaling_predict import Config, run

    manifest = write_synthetic_fit(tmp_path)
    members = manifest["outputs"]["members"]
    for flops in (2e10, 4e11):
        out = run(Config(run=str(tmp_path), flops=flops))
        assert out["size"] in {m["size"] for m in members}
        assert members[0]["n"] <= out["n"] <= members[-1]["n"]
        assert out["steps"] >= 1 and out["tokens"] == pytest.approx(flops / (6 * out["n"]))
        assert out["loss"] == pytest.approx(_law(out["n"], out["tokens"]), rel=0.01)
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "scaling", "predict", "--run", str(tmp_path),
                             "--flops", "1e11"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "predicted validation loss" in result.stdout, result.stderr


def test_scaling_errors_are_one_line(tmp_path, capsys):
    from pipelines.cli import main

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(
        {"outputs": {"vocab_size": VOCAB, "sequence_length": SEQ, "splits": {"train": {"tokens": 1000}}}}))
    for args, expected in ((["--budgets", "1e10"], "budgets"), (["--budgets", "1e3,1e4"], "budgets"),
                           (["--budgets", "1e10,1e11", "--sizes", "2"], "sizes")):
        capsys.readouterr()
        assert main(["scaling", "--run", str(tmp_path), "model=1m", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
    assert main(["scaling", "predict", "--run", str(tmp_path), "--flops", "1e10"]) == 2
    assert "no scaling/manifest.json" in capsys.readouterr().err


@pytest.mark.ray
def test_pretrain_model_auto_trains_the_predicted_size(builtin_data_dir, tmp_path_factory):
    from pipelines.config import build_config
    from pipelines.pretrain import Config
    from pipelines.pretrain import run as pretrain
    from pipelines.scaling_predict import Config as PredictConfig
    from pipelines.scaling_predict import run as predict

    run = run_with_data(tmp_path_factory, builtin_data_dir, "auto")
    write_synthetic_fit(run)
    expected = predict(PredictConfig(run=str(run), flops=2e10))
    config = build_config(Config, overrides=[f"run={run}", "model=auto", "train.length.flops=2e10", "sequence_length=64",
                                             "train.precision.dtype=fp32", "train.eval.samples=0",
                                             "train.eval.max_rows=16", "train.checkpoint.every_steps=1000"])
    manifest = pretrain(config)
    model = manifest["outputs"]["model_config"]
    assert {k: model[k] for k in expected["model_overrides"]} == expected["model_overrides"]
    assert manifest["outputs"]["plan"]["tokens_per_step"] == expected["global_batch_tokens"]
    assert manifest["counts"]["flops"] == pytest.approx(2e10, rel=0.1)


def test_budget_gives_batch_and_lr_when_neither_is_set(tmp_path, capsys):
    from pipelines.config import build_config
    from pipelines.pretrain import Config
    from pipelines.scaling import budget_defaults

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(
        {"outputs": {"vocab_size": VOCAB, "sequence_length": SEQ, "splits": {"train": {"tokens": 10**6}}}}))

    def config(*extra):
        return build_config(Config, overrides=[f"run={tmp_path}", "model=1m", *extra])

    chosen = budget_defaults(config("train.length.tokens=400000"))
    assert chosen.train.batch.global_batch_tokens == 1024 and chosen.train.optimizer.lr == 2e-3
    assert "neither given" in capsys.readouterr().out
    for extra in (["train.length.tokens=400000", "train.batch.global_batch_tokens=4096"],
                  ["train.length.tokens=400000", "train.optimizer.lr=1e-3"], ["train.length.steps=50"], [],
                  ["train.length.tokens=100000000"]):  # a budget big enough for the default batch
        assert budget_defaults(config(*extra)) == config(*extra)
    write_synthetic_fit(tmp_path)  # with a scaling fit in the run, its batch rule decides
    assert budget_defaults(config("train.length.tokens=40000")).train.batch.global_batch_tokens == 4096  # >= 8 steps
    assert "the scaling run's rule" in capsys.readouterr().out


def test_pretrain_warns_when_tokens_exceed_the_corpus(tmp_path, capsys):
    from pipelines.config import build_config
    from pipelines.pretrain import Config
    from pipelines.scaling import resolve_budget

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(
        {"outputs": {"vocab_size": VOCAB, "sequence_length": SEQ, "splits": {"train": {"tokens": 10**5}}}}))
    resolve_budget(build_config(Config, overrides=[f"run={tmp_path}", "model=1m", "train.length.steps=100",
                                                   "train.batch.global_batch_tokens=4096"]), warn=True)
    assert "4.1 epochs" in capsys.readouterr().out
    resolve_budget(build_config(Config, overrides=[f"run={tmp_path}", "model=1m", "train.length.steps=10",
                                                   "train.batch.global_batch_tokens=4096"]), warn=True)
    assert "epochs" not in capsys.readouterr().out


def test_tune_given_only_a_budget_sizes_its_trials_from_the_fit(tmp_path, capsys):
    from pipelines.config import build_config
    from pipelines.scaling_predict import Config as PredictConfig
    from pipelines.scaling_predict import run as predict
    from pipelines.tune import Config, sized_from_budget

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(
        {"outputs": {"vocab_size": VOCAB, "sequence_length": SEQ, "splits": {"train": {"tokens": 10**6}}}}))
    write_synthetic_fit(tmp_path)
    expected = predict(PredictConfig(run=str(tmp_path), flops=3e10))
    config = sized_from_budget(build_config(Config, overrides=[f"run={tmp_path}", "space=unused.yaml", "model=auto",
                                                               f"sequence_length={SEQ}", "budget.flops=3e10"]))
    assert config.model == "1m" and {k: config.model_overrides[k] for k in expected["model_overrides"]} == \
        expected["model_overrides"]
    assert config.train.batch.global_batch_tokens == expected["global_batch_tokens"]
    assert config.train.optimizer.lr == pytest.approx(expected["lr"])
    assert "model auto" in capsys.readouterr().out
