"""`groundup prefs export`: known votes -> exactly the expected pairs, split by prompt, JSONL and Parquet."""
from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from pipelines.cli import main as cli_main
from pipelines.config import ConfigError, build_config
from ui.export import Config, prompt_id, run, split_of, vote_pairs
from ui.store import PreferenceStore


def vote(prompt, contents_models, ranking, rater="alice", outcome="ranked"):
    return {"messages": [{"role": "user", "content": prompt}],
            "candidates": [{"model": m, "content": c, "model_version": f"{m}-v1"} for c, m in contents_models],
            "rater": rater, "ranking": ranking, "outcome": outcome}


@pytest.fixture
def database(tmp_path):
    url = f"sqlite:///{tmp_path / 'prefs.db'}"
    store = PreferenceStore(url)
    store.add_vote(vote("p1", [("a1", "m1"), ("b1", "m2")], [[1], [0]]))               # b1 > a1
    store.add_vote(vote("p2", [("a2", "m1"), ("b2", "m2"), ("c2", "m3")], [[2], [0, 1]], rater="bob"))
    store.add_vote(vote("p3", [("a3", "m1"), ("b3", "m2")], [[0, 1]]))                  # tie: no pair
    store.add_vote(vote("p4", [("a4", "m1"), ("b4", "m2")], [], outcome="not_rankable"))  # all bad: none
    store.add_vote(vote("p5", [("a5", "m1"), ("b5", "m2"), ("c5", "m3")], [[0], [1], [2]]))
    store.close()
    return url


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_votes_give_exactly_the_implied_pairs(database, tmp_path):
    manifest = run(build_config(Config, values={"database": database, "run": str(tmp_path / "run"),
                                                "validation_fraction": 0.0}))
    pairs = read_jsonl(manifest["outputs"]["train"])
    assert read_jsonl(manifest["outputs"]["validation"]) == []
    got = sorted((p["prompt"][0]["content"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs)
    assert got == sorted([
        ("p1", "b1", "a1"),
        ("p2", "c2", "a2"), ("p2", "c2", "b2"),
        ("p5", "a5", "b5"), ("p5", "a5", "c5"), ("p5", "b5", "c5"),
    ])
    first = next(p for p in pairs if p["prompt"][0]["content"] == "p1")
    assert first["prompt"] == [{"role": "user", "content": "p1"}]
    assert first["chosen"] == [{"role": "assistant", "content": "b1"}]
    assert (first["chosen_model"], first["rejected_model"]) == ("m2", "m1")
    assert (first["chosen_model_version"], first["rejected_model_version"]) == ("m2-v1", "m1-v1")
    assert first["rater"] == "alice" and first["created_at"].startswith("20")
    assert next(p for p in pairs if p["rejected"][0]["content"] == "c5" and p["chosen"][0]["content"] == "a5")[
        "rank_gap"] == 2
    counts = manifest["counts"]
    assert counts["votes"] == 5 and counts["votes_tied"] == 1 and counts["votes_not_rankable"] == 1
    assert counts["pairs_train"] == 6 and counts["pairs_validation"] == 0
    on_disk = json.loads((tmp_path / "run" / "prefs" / "manifest.json").read_text())
    assert on_disk["counts"] == counts and on_disk["stage"] == "prefs"
    ratings = [r["rating"] for r in on_disk["ratings"]]
    assert {r["model"] for r in on_disk["ratings"]} == {"m1", "m2", "m3"} and ratings == sorted(ratings)[::-1]
    assert (tmp_path / "run" / "prefs" / "leaderboard.png").read_bytes()[:4] == b"\x89PNG"


def test_ties_and_all_bad_give_no_pairs(database):
    store = PreferenceStore(database, create=False)
    by_prompt = {v.messages[0].content: v for v in store.votes()}
    assert vote_pairs(by_prompt["p3"]) == [] and vote_pairs(by_prompt["p4"]) == []
    assert len(vote_pairs(by_prompt["p2"])) == 2  # the tie inside the worse group adds nothing


def test_no_prompt_is_in_both_splits(tmp_path):
    store = PreferenceStore(f"sqlite:///{tmp_path / 'prefs.db'}")
    for i in range(60):
        for rater in ("alice", "bob"):  # every prompt is rated twice: both votes must land together
            store.add_vote(vote(f"prompt {i}", [(f"x{i}", "m1"), (f"y{i}", "m2")], [[0], [1]], rater=rater))
    manifest = run(build_config(Config, values={"database": store.url, "run": str(tmp_path / "run"),
                                                "validation_fraction": 0.3, "seed": 7}))
    train = {p["prompt_id"] for p in read_jsonl(manifest["outputs"]["train"])}
    validation = {p["prompt_id"] for p in read_jsonl(manifest["outputs"]["validation"])}
    assert train and validation and not train & validation
    assert len(train) + len(validation) == 60
    assert manifest["counts"]["pairs_train"] + manifest["counts"]["pairs_validation"] == 120
    # The split is a function of the prompt and the seed only.
    pid = prompt_id([{"role": "user", "content": "prompt 3"}])
    assert split_of(pid, 7, 0.3) == split_of(pid, 7, 0.3)
    assert {split_of(prompt_id([{"role": "user", "content": f"prompt {i}"}]), 7, 0.3) for i in range(60)} == {
        "train", "validation"}


def test_parquet_matches_jsonl(database, tmp_path):
    common = {"database": database, "run": str(tmp_path / "run"), "validation_fraction": 0.5, "seed": 1}
    as_jsonl = run(build_config(Config, values={**common, "output": str(tmp_path / "jsonl")}))
    as_parquet = run(build_config(Config, values={**common, "output": str(tmp_path / "pq"), "format": "parquet"}))
    for split in ("train", "validation"):
        rows = pq.read_table(as_parquet["outputs"][split]).to_pylist()
        assert rows == read_jsonl(as_jsonl["outputs"][split])
        assert as_parquet["outputs"][split].endswith(f"{split}.parquet")
    assert as_parquet["counts"] == as_jsonl["counts"]


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="validation_fraction"):
        build_config(Config, values={"validation_fraction": 1.5})
    with pytest.raises(ConfigError, match="format"):
        build_config(Config, values={"format": "csv"})
    with pytest.raises(ConfigError, match="no such file"):
        run(build_config(Config, values={"database": str(tmp_path / "none.db"), "run": str(tmp_path)}))


def test_cli_exports_and_bad_input_exits_2_with_one_line(database, tmp_path, capsys):
    assert cli_main(["prefs", "export", "--database", database, "--format", "parquet",
                     f"run={tmp_path / 'run'}"]) == 0
    out = capsys.readouterr().out
    assert "5 votes" in out and (tmp_path / "run" / "prefs" / "train.parquet").is_file()

    for argv in (["--database", str(tmp_path / "missing.db")], ["--database", "nosuchdialect://x"],
                 ["--database", database, "validation_fraction=2"]):
        result = subprocess.run([sys.executable, "-m", "ui.export", *argv], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("groundup prefs export: error:"), result.stderr
