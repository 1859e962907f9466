"""The preference store on a real SQLite file: round trips, WAL mode, rejected votes, durability."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipelines.config import ConfigError
from ui.store import InvalidVoteError, PreferenceStore

REPO = Path(__file__).resolve().parent.parent


def a_vote(**changes):
    vote = {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
        "candidates": [
            {"model": "base", "model_version": "step-100", "content": "Blue.", "finish_reason": "stop",
             "sampling": {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "max_tokens": 32}},
            {"model": "sft", "model_version": "step-200", "content": "Green is a colour.", "finish_reason": "length",
             "sampling": {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "max_tokens": 32}},
        ],
        "rater": "alice",
        "ranking": [[1], [0]],
        "flags": ["off topic"],
        "presented_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    }
    vote.update(changes)
    return vote


def test_votes_round_trip_with_every_field(tmp_path):
    with PreferenceStore(f"sqlite:///{tmp_path / 'prefs.db'}") as store:
        stored = store.add_vote(a_vote())
        store.add_vote(a_vote(rater="bob", outcome="not_rankable", ranking=[], flags=[]))
        store.add_vote(a_vote(rater="bob", ranking=[[0, 1]]))
        assert store.count() == 3
        votes = store.votes()
    first = votes[0]
    assert first.uid == stored.uid and first.id == stored.id
    assert [m.model_dump() for m in first.messages] == a_vote()["messages"]
    assert [c.model for c in first.candidates] == ["base", "sft"]
    assert first.candidates[1].model_version == "step-200"
    assert first.candidates[1].sampling == {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "max_tokens": 32}
    assert first.candidates[1].finish_reason == "length"
    assert first.ranking == [[1], [0]] and first.outcome == "ranked" and first.flags == ["off topic"]
    assert first.presented_at == a_vote()["presented_at"]
    assert first.created_at.tzinfo is not None and first.created_at >= first.presented_at
    assert [(v.rater, v.outcome, v.ranking) for v in votes[1:]] == [("bob", "not_rankable", []),
                                                                    ("bob", "ranked", [[0, 1]])]
    assert votes[2].is_tie and not votes[0].is_tie


def test_reads_filter_by_rater_and_get_by_uid(tmp_path):
    store = PreferenceStore(str(tmp_path / "prefs.db"))  # a plain path means a SQLite file
    ids = [store.add_vote(a_vote(rater=r)).uid for r in ["alice", "bob", "alice"]]
    assert [v.uid for v in store.votes(rater="alice")] == [ids[0], ids[2]]
    assert store.get(ids[1]).rater == "bob"
    assert store.get("nope") is None
    # Batched iteration returns every vote exactly once, in order.
    assert [v.uid for v in store.iter_votes(batch_size=2)] == ids


def test_comparison_counts_count_votes_between_different_models(tmp_path):
    with PreferenceStore(f"sqlite:///{tmp_path / 'prefs.db'}") as store:
        store.add_vote(a_vote())  # base vs sft
        store.add_vote(a_vote(candidates=[dict(a_vote()["candidates"][0], model="sft"), a_vote()["candidates"][1]]))
        store.add_vote(a_vote(candidates=[*a_vote()["candidates"], dict(a_vote()["candidates"][0], model="ppo")],
                              ranking=[[2], [0, 1]]))
        assert store.comparison_counts() == {"base": 2, "sft": 2, "ppo": 1}  # sft vs sft says nothing


def test_sqlite_runs_in_wal_mode_with_full_sync(tmp_path):
    path = tmp_path / "prefs.db"
    store = PreferenceStore(f"sqlite:///{path}")
    store.add_vote(a_vote())
    assert store.journal_mode() == "wal"
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    # WAL is a property of the file: a plain sqlite3 connection sees it too.
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("changes, field", [
    ({"ranking": [[0]]}, "candidate 1 is missing"),
    ({"ranking": [[0, 0], [1]]}, "candidate 0 appears more than once"),
    ({"ranking": [[0], [1], [2]]}, "position 2 is not a candidate"),
    ({"ranking": [[0], [], [1]]}, "empty group"),
    ({"ranking": []}, "not_rankable"),
    ({"outcome": "not_rankable"}, "must be empty when the outcome is not_rankable"),
    ({"rater": "  "}, "rater"),
    ({"candidates": a_vote()["candidates"][:1]}, "candidates"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
     "must end with a user message"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"outcome": "great"}, "outcome"),
    ({"color": "red"}, "color: unknown field"),
])
def test_invalid_votes_are_rejected_with_one_line(tmp_path, changes, field):
    store = PreferenceStore(f"sqlite:///{tmp_path / 'prefs.db'}")
    with pytest.raises(InvalidVoteError) as info:
        store.add_vote(a_vote(**changes))
    message = str(info.value)
    assert field in message and "\n" not in message
    assert store.count() == 0


def test_bad_database_urls_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        PreferenceStore(str(tmp_path / "missing.db"), create=False)
    with pytest.raises(ConfigError, match="nosuchdialect"):
        PreferenceStore("nosuchdialect://x/y")
    (tmp_path / "junk.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError, match="cannot open"):
        PreferenceStore(str(tmp_path / "junk.db"), create=False)
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).execute("create table other (x int)")
    with pytest.raises(ConfigError, match="no votes table"):
        PreferenceStore(str(empty), create=False)


def test_acknowledged_vote_survives_sigkill(tmp_path):
    """A writer process commits a vote, says so, and is killed at once: the vote must be on disk."""
    url = f"sqlite:///{tmp_path / 'prefs.db'}"
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from ui.store import PreferenceStore
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_ui_store import a_vote
        store = PreferenceStore({url!r})
        uid = store.add_vote(a_vote(rater="crash-test")).uid
        print(uid, flush=True)
        time.sleep(600)  # killed here, with the connection still open
    """)
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        uid = writer.stdout.readline().strip()
        assert uid, "the writer did not acknowledge a vote"
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    assert writer.returncode == -signal.SIGKILL
    reopened = PreferenceStore(url, create=False)
    vote = reopened.get(uid)
    assert vote is not None and vote.rater == "crash-test" and vote.ranking == [[1], [0]]
