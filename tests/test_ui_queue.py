"""The comparison queue (human evaluation of evaluate's chat pairs): a real SQLite store, the rating app's own
event handlers over HTTP (gradio_client against the app served by uvicorn), and old stores that predate it."""
from __future__ import annotations

import socket
import sqlite3
import threading
import time

import pytest

from ui.store import InvalidVoteError, PreferenceStore


def pairs(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Question {i}?"}], "model_a": "dpo", "reply_a": f"dpo says {i}",
             "model_b": "sft", "reply_b": f"sft says {i}", "sampling": {"temperature": 0.0, "max_tokens": 8}}
            for i in range(n)]


# The tables as the store made them before the queue existed (no comparison_queue, no votes.queue_entry_id).
OLD_SCHEMA = """
CREATE TABLE votes (id INTEGER NOT NULL, uid VARCHAR(32) NOT NULL, created_at DATETIME NOT NULL, presented_at DATETIME,
    rater VARCHAR(200) NOT NULL, messages JSON NOT NULL, outcome VARCHAR(16) NOT NULL, ranking JSON NOT NULL,
    flags JSON NOT NULL, PRIMARY KEY (id));
CREATE UNIQUE INDEX ix_votes_uid ON votes (uid);
CREATE TABLE candidates (id INTEGER NOT NULL, vote_id INTEGER NOT NULL, position INTEGER NOT NULL,
    model VARCHAR(200) NOT NULL, model_version VARCHAR(200) NOT NULL, content TEXT NOT NULL, sampling JSON NOT NULL,
    finish_reason VARCHAR(32), PRIMARY KEY (id), FOREIGN KEY(vote_id) REFERENCES votes (id) ON DELETE CASCADE);
INSERT INTO votes VALUES (1, 'aaaa', '2026-01-02 03:04:05.000000', NULL, 'bob',
    '[{"role": "user", "content": "Hi"}]', 'ranked', '[[1], [0]]', '[]');
INSERT INTO candidates VALUES (1, 1, 0, 'base', '', 'Hello.', '{}', 'stop');
INSERT INTO candidates VALUES (2, 1, 1, 'sft', '', 'Hi there!', '{}', 'stop');
"""


def test_an_old_store_without_the_queue_opens_and_keeps_its_votes(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as connection:
        connection.executescript(OLD_SCHEMA)
    with PreferenceStore(str(path), create=False) as store:  # export and ratings open stores read-only
        [old] = store.votes()
        assert old.rater == "bob" and old.queue_entry is None and [c.model for c in old.candidates] == ["base", "sft"]
    with PreferenceStore(str(path)) as store:  # the app and evaluate: the queue table appears
        assert store.queue_waiting() == 0
        [entry] = store.enqueue(pairs(1), batch="b", seed=0)
        store.add_vote({"messages": [{"role": "user", "content": "Question 0?"}], "rater": "carol",
                        "candidates": [{"model": "dpo", "content": "x"}, {"model": "sft", "content": "y"}],
                        "ranking": [[0], [1]], "queue_entry": entry.id})
        assert [v.queue_entry for v in store.votes()] == [None, entry.id]


def test_sides_are_drawn_with_the_seed_and_recorded(tmp_path):
    with PreferenceStore(str(tmp_path / "a.db")) as first, PreferenceStore(str(tmp_path / "b.db")) as second:
        one = first.enqueue(pairs(20), batch="b", seed=7)
        two = second.enqueue(pairs(20), batch="b", seed=7)
        assert [e.swapped for e in one] == [e.swapped for e in two]  # the same seed, the same sides
        assert 0 < sum(e.swapped for e in one) < 20  # each model shown first in some pairs
        for entry in one:
            shown = {entry.model_a: entry.reply_a, entry.model_b: entry.reply_b}
            assert shown == {"dpo": f"dpo says {entry.messages[0].content[9:-1]}",
                             "sft": f"sft says {entry.messages[0].content[9:-1]}"}
            assert (entry.model_a == "sft") == entry.swapped and entry.seed == 7
        assert [e.id for e in one] == sorted(e.id for e in one)
        with pytest.raises(InvalidVoteError, match="invalid queued pair 0: model_a"):
            first.enqueue([{**pairs(1)[0], "model_a": ""}], batch="b", seed=0)
        with pytest.raises(InvalidVoteError, match="queue_entry: no queued comparison 999"):
            first.add_vote({"messages": [{"role": "user", "content": "q"}], "rater": "r", "queue_entry": 999,
                            "candidates": [{"model": "a", "content": "x"}, {"model": "b", "content": "y"}],
                            "ranking": [[0], [1]]})


@pytest.fixture
def served_app(tmp_path):
    """The rating app (ui.app.build_app, as `python -m ui.app` runs it) on uvicorn, with a store holding one
    ordinary vote and three queued pairs; its model API is unreachable: queued pairs need no model."""
    import uvicorn

    from ui.app import build_app

    database = f"sqlite:///{tmp_path / 'prefs.db'}"
    with PreferenceStore(database) as store:
        store.add_vote({"messages": [{"role": "user", "content": "Hi"}], "rater": "bob", "ranking": [[0], [1]],
                        "candidates": [{"model": "sft", "content": "Hello."}, {"model": "dpo", "content": "Hm."}]})
        entries = store.enqueue(pairs(3), batch="evaluate test", seed=0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app("http://127.0.0.1:9/v1", database), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}/ui/", database, entries
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_queued_pairs_come_first_and_their_votes_count_with_the_others(served_app):
    from gradio_client import Client

    from ui.export import vote_pairs
    from ui.ratings import compute_ratings

    url, database, entries = served_app
    client = Client(url, verbose=False)
    round_args = ("alice", "", "", [], 2, 1.0, 1.0, 0, 0)  # rater, prompt, system, models, answers, sampling

    status, prompt, answer_a, answer_b, *_ = client.predict(*round_args, api_name="/next_round")
    assert "Queued comparison (3 waiting" in status and prompt["value"] == "Question 0?"
    assert (answer_a["value"], answer_b["value"]) == (entries[0].reply_a, entries[0].reply_b)
    saved, *_ = client.predict("alice", [], api_name="/vote_a")
    assert "vote saved" in saved and f"`{entries[0].model_a}`" in saved

    status, prompt, *_ = client.predict(*round_args, api_name="/next_round")
    assert prompt["value"] == "Question 1?" and "2 waiting" in status
    status, prompt, *_ = client.predict(*round_args, api_name="/next_round")  # not voted: skipped
    assert prompt["value"] == "Question 2?" and "1 waiting" in status
    refused = client.predict(1.0, 1.0, 0, 0, api_name="/regenerate")[0]
    assert "answers are fixed" in refused
    saved, *_ = client.predict("alice", [], api_name="/vote_tie")
    assert "vote saved" in saved
    status, *_ = client.predict(*round_args, api_name="/next_round")  # the queue is done: an ordinary round
    assert "Queued" not in status and "type a prompt" in status

    with PreferenceStore(database, create=False) as store:
        votes = store.votes()
        assert [v.queue_entry for v in votes] == [None, entries[0].id, entries[2].id]
        first = votes[1]
        assert [c.model for c in first.candidates] == [entries[0].model_a, entries[0].model_b]
        assert [c.content for c in first.candidates] == [entries[0].reply_a, entries[0].reply_b]
        assert first.ranking == [[0], [1]] and first.rater == "alice" and votes[2].ranking == [[0, 1]]
        assert store.queue_waiting() == 0 and store.next_queued() is None
        [pair] = vote_pairs(first)  # prefs export: the same pairs as any vote, naming the entry
        assert pair["chosen_model"] == entries[0].model_a and pair["queue_entry"] == entries[0].id
        board = compute_ratings(votes, bootstrap=0, seed=0)  # the leaderboard counts every vote
        assert {row.model: row.votes for row in board} == {"sft": 3, "dpo": 3}
    with sqlite3.connect(database.removeprefix("sqlite:///")) as connection:
        assert connection.execute("SELECT skipped_by FROM comparison_queue WHERE id = ?",
                                  (entries[1].id,)).fetchone() == ("alice",)
