"""Bradley–Terry leaderboard from votes: the model that wins most ranks first; intervals are sane."""
from __future__ import annotations

import numpy as np
import pytest

from ui.ratings import compute_ratings, fit_strengths, leaderboard_png, leaderboard_rows, pairwise_outcomes
from ui.store import PreferenceStore


def add(store, models, ranking, outcome="ranked"):
    return store.add_vote({"messages": [{"role": "user", "content": "q"}],
                           "candidates": [{"model": m, "content": f"answer of {m}"} for m in models],
                           "rater": "r", "ranking": ranking, "outcome": outcome})


@pytest.fixture
def store(tmp_path):
    store = PreferenceStore(f"sqlite:///{tmp_path / 'prefs.db'}")
    rng = np.random.default_rng(0)
    strength = {"strong": 4.0, "middle": 1.0, "weak": 0.25}
    names = list(strength)
    for _ in range(150):
        a, b = rng.choice(3, size=2, replace=False)
        first, second = names[a], names[b]
        first_wins = rng.random() < strength[first] / (strength[first] + strength[second])
        add(store, [first, second], [[0], [1]] if first_wins else [[1], [0]])
    add(store, ["strong", "weak"], [[0, 1]])
    add(store, ["strong", "weak"], [], outcome="not_rankable")
    return store


def test_most_winning_model_ranks_first_and_intervals_contain_estimates(store):
    board = compute_ratings(store.votes(), bootstrap=100, seed=0)
    assert [r.model for r in board] == ["strong", "middle", "weak"]
    for r in board:
        assert r.ci_low <= r.rating <= r.ci_high
        assert r.ci_high - r.ci_low > 0
    assert np.isclose(np.mean([r.rating for r in board]), 1000.0)
    # True strengths 4:1 (about 240 Elo points apart): the fit should land near that.
    assert 120 < board[0].rating - board[1].rating < 400
    assert sum(r.votes for r in board) == 2 * 151  # all-bad votes count for no model
    # Seeded bootstrap: the same intervals every time.
    again = compute_ratings(store.votes(), bootstrap=100, seed=0)
    assert [(r.ci_low, r.ci_high) for r in again] == [(r.ci_low, r.ci_high) for r in board]


def test_rankings_count_as_all_implied_pairs_and_ties_as_halves(tmp_path):
    store = PreferenceStore(f"sqlite:///{tmp_path / 'p.db'}")
    ranked = add(store, ["a", "b", "c", "a"], [[0], [1, 2], [3]])
    outcomes = sorted((o.first, o.second, o.score) for o in pairwise_outcomes(ranked))
    # a(0) beats b and c; b ties c; b and c beat a(3); a vs a says nothing about models.
    assert outcomes == [("a", "b", 1.0), ("a", "c", 1.0), ("b", "a", 1.0), ("b", "c", 0.5), ("c", "a", 1.0)]
    assert pairwise_outcomes(add(store, ["a", "b"], [], outcome="not_rankable")) == []


def test_fit_recovers_known_strengths():
    true = np.array([3.0, 1.0, 1 / 3])
    games = np.full((3, 3), 3000.0)
    np.fill_diagonal(games, 0)
    wins = (games * true[:, None] / (true[:, None] + true[None, :])).sum(axis=1)
    fitted = fit_strengths(wins, games, prior_games=0.0)
    assert np.allclose(fitted / fitted[1], true, rtol=1e-6)


def test_a_model_that_never_loses_gets_a_finite_rating(tmp_path):
    store = PreferenceStore(f"sqlite:///{tmp_path / 'p.db'}")
    for _ in range(5):
        add(store, ["winner", "loser"], [[0], [1]])
    board = compute_ratings(store.votes(), bootstrap=20, seed=1)
    assert [r.model for r in board] == ["winner", "loser"]
    assert all(np.isfinite(r.rating) for r in board) and board[0].wins == 5 and board[1].wins == 0


def test_table_rows_and_plot(store):
    board = compute_ratings(store.votes(), bootstrap=20, seed=0)
    rows = leaderboard_rows(board)
    assert [row[:2] for row in rows] == [[1, "strong"], [2, "middle"], [3, "weak"]]
    png = leaderboard_png(board)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert compute_ratings([], bootstrap=10) == []


def test_ratings_command_prints_the_board_and_writes_the_plot(store, tmp_path, capsys):
    from ui.ratings import main

    assert main(["--database", store.url, "--bootstrap", "20", "--plot", str(tmp_path / "board.png")]) == 0
    out = capsys.readouterr().out
    assert out.index("strong") < out.index("middle") < out.index("weak")
    assert (tmp_path / "board.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["--database", str(tmp_path / "missing.db")]) == 2
    assert "no such file" in capsys.readouterr().err
