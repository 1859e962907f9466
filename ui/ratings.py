"""Bradley–Terry ratings of models from stored votes, on an Elo-like scale, with bootstrap intervals.

A vote ranking N answers counts as every pairwise outcome it implies: each answer in a better group
beats each answer in a worse group, answers in one group tie (half a win each). Pairs of answers from
the same model say nothing about models and are skipped, as are "all bad" votes.

The strengths ``p`` maximise the Bradley–Terry likelihood ``P(i beats j) = p_i / (p_i + p_j)``, fitted
by Newton's method on log p (the likelihood is concave). A weak prior (``prior_games`` drawn games
against a fixed reference player of strength 1) keeps every strength finite when a model never wins
or never loses. Ratings are
``1000 + 400 log10(p / geometric mean of p)`` so that 400 points mean 10:1 odds, as in Elo.
Confidence intervals come from resampling whole votes with replacement (seeded).
"""
from __future__ import annotations

import io
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ui.store import VoteRecord

ELO_BASE, ELO_SCALE = 1000.0, 400.0


@dataclass(frozen=True)
class PairOutcome:
    """One implied comparison: ``score`` is 1 if ``first`` won, 0.5 for a tie."""

    first: str
    second: str
    score: float


@dataclass(frozen=True)
class ModelRating:
    model: str
    rating: float
    ci_low: float
    ci_high: float
    votes: int  # votes in which the model had at least one answer compared with another model's
    wins: float  # pairwise wins, ties counting one half
    comparisons: int  # pairwise comparisons with other models

    @property
    def win_rate(self) -> float:
        return self.wins / self.comparisons if self.comparisons else 0.0


def pairwise_outcomes(vote: VoteRecord) -> list[PairOutcome]:
    """Every model-vs-model outcome a vote implies (none for "all bad")."""
    if vote.outcome != "ranked":
        return []
    models = [c.model for c in vote.candidates]
    outcomes: list[PairOutcome] = []
    for rank, group in enumerate(vote.ranking):
        for a, b in itertools.combinations(group, 2):  # a tie inside the group
            if models[a] != models[b]:
                outcomes.append(PairOutcome(models[a], models[b], 0.5))
        for worse in vote.ranking[rank + 1:]:
            for a in group:
                for b in worse:
                    if models[a] != models[b]:
                        outcomes.append(PairOutcome(models[a], models[b], 1.0))
    return outcomes


def _per_vote_tables(per_vote: Sequence[list[PairOutcome]],
                     index: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """(wins[v, i], games[v, i, j]) for each vote v; ties add half a win to each side."""
    n = len(index)
    wins = np.zeros((len(per_vote), n))
    games = np.zeros((len(per_vote), n, n))
    for v, outcomes in enumerate(per_vote):
        for o in outcomes:
            i, j = index[o.first], index[o.second]
            wins[v, i] += o.score
            wins[v, j] += 1.0 - o.score
            games[v, i, j] += 1.0
            games[v, j, i] += 1.0
    return wins, games


def _log_likelihood(theta: np.ndarray, wins: np.ndarray, games: np.ndarray, prior_games: float) -> float:
    # sum_i (w_i + prior/2) theta_i - sum_{i<j} g_ij log(e^theta_i + e^theta_j)
    #   - prior sum_i log(e^theta_i + 1)
    pair = np.logaddexp(theta[:, None], theta[None, :])
    return float((wins + prior_games / 2) @ theta - 0.5 * (games * pair).sum()
                 - prior_games * np.logaddexp(theta, 0.0).sum())


def fit_strengths(wins: np.ndarray, games: np.ndarray, prior_games: float = 1.0, max_iter: int = 100,
                  tol: float = 1e-10, start: np.ndarray | None = None) -> np.ndarray:
    """Bradley–Terry strengths ``p`` by Newton's method on ``log p`` (the likelihood is concave), with
    ``prior_games`` drawn games per model against a reference player of strength 1."""
    theta = np.zeros(len(wins)) if start is None else np.log(start)
    current = _log_likelihood(theta, wins, games, prior_games)
    for _ in range(max_iter):
        beats = 1.0 / (1.0 + np.exp(theta[None, :] - theta[:, None]))  # P(i beats j)
        beats_anchor = 1.0 / (1.0 + np.exp(-theta))
        gradient = wins + prior_games / 2 - (games * beats).sum(axis=1) - prior_games * beats_anchor
        curvature = games * beats * beats.T
        hessian = curvature - np.diag(curvature.sum(axis=1) + prior_games * beats_anchor * (1 - beats_anchor))
        # Without a prior the likelihood ignores a common shift: pinv steps orthogonally to it.
        step = -np.linalg.pinv(hessian) @ gradient
        size = 1.0
        while size > 1e-6:  # backtrack so that every step improves the likelihood
            candidate = _log_likelihood(theta + size * step, wins, games, prior_games)
            if candidate >= current - 1e-12:
                break
            size /= 2
        theta, current = theta + size * step, candidate
        if np.max(np.abs(size * step)) < tol:
            break
    return np.exp(theta)


def to_elo(strengths: np.ndarray) -> np.ndarray:
    log_p = np.log10(strengths)
    return ELO_BASE + ELO_SCALE * (log_p - log_p.mean())


def compute_ratings(votes: Iterable[VoteRecord], bootstrap: int = 200, seed: int = 0,
                    confidence: float = 0.95, prior_games: float = 1.0) -> list[ModelRating]:
    """The leaderboard, best first. Models that were never compared with another model are left out."""
    per_vote = [outcomes for outcomes in (pairwise_outcomes(v) for v in votes) if outcomes]
    models = sorted({name for outcomes in per_vote for o in outcomes for name in (o.first, o.second)})
    if not models:
        return []
    index = {m: i for i, m in enumerate(models)}
    vote_wins, vote_games = _per_vote_tables(per_vote, index)
    wins, games = vote_wins.sum(axis=0), vote_games.sum(axis=0)
    strengths = fit_strengths(wins, games, prior_games)
    rating = to_elo(strengths)

    low, high = rating.copy(), rating.copy()
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        samples = np.empty((bootstrap, len(models)))
        for b in range(bootstrap):
            # Resample whole votes: a vote's implied pairs are not independent of each other.
            times = np.bincount(rng.integers(0, len(per_vote), size=len(per_vote)), minlength=len(per_vote))
            b_wins = times @ vote_wins
            b_games = np.tensordot(times, vote_games, axes=1)
            samples[b] = to_elo(fit_strengths(b_wins, b_games, prior_games, start=strengths))
        tail = (1.0 - confidence) / 2.0 * 100.0
        low, high = np.percentile(samples, [tail, 100.0 - tail], axis=0)

    appearances = {m: 0 for m in models}
    for outcomes in per_vote:
        for name in {n for o in outcomes for n in (o.first, o.second)}:
            appearances[name] += 1
    board = [ModelRating(model=m, rating=float(rating[i]), ci_low=float(low[i]), ci_high=float(high[i]),
                         votes=appearances[m], wins=float(wins[i]), comparisons=int(games[i].sum()))
             for m, i in index.items()]
    return sorted(board, key=lambda r: (-r.rating, r.model))


def leaderboard_rows(board: Sequence[ModelRating]) -> list[list[object]]:
    """Rows for a table: rank, model, rating, 95% interval, votes, win rate."""
    return [[rank, r.model, round(r.rating), f"{r.ci_low:.0f} – {r.ci_high:.0f}", r.votes, r.comparisons,
             f"{100 * r.win_rate:.0f}%"] for rank, r in enumerate(board, start=1)]


LEADERBOARD_HEADERS = ["rank", "model", "rating", "95% CI", "votes", "comparisons", "win rate"]


def leaderboard_png(board: Sequence[ModelRating], title: str = "Leaderboard (Bradley–Terry)") -> bytes:
    """A horizontal interval plot of the ratings, best on top, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.6 * max(len(board), 1) + 1.4))
    ordered = list(reversed(board))
    y = np.arange(len(ordered))
    ratings = np.array([r.rating for r in ordered])
    errors = np.array([[r.rating - r.ci_low for r in ordered], [r.ci_high - r.rating for r in ordered]])
    ax.errorbar(ratings, y, xerr=np.clip(errors, 0, None), fmt="o", capsize=4, color="tab:blue")
    ax.set_yticks(y, [f"{r.model} ({r.votes} votes)" for r in ordered])
    ax.axvline(ELO_BASE, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("rating (Elo scale, 95% bootstrap interval)")
    ax.set_title(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    """``python -m ui.ratings --database URL [--plot leaderboard.png]``: print the leaderboard."""
    import argparse
    import sys
    from pathlib import Path

    from pipelines.config import ConfigError
    from ui.store import PreferenceStore

    parser = argparse.ArgumentParser(prog="python -m ui.ratings", description="Bradley–Terry leaderboard")
    parser.add_argument("--database", required=True, help="SQLAlchemy URL or SQLite file of the store")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", help="write the leaderboard as a PNG here")
    args = parser.parse_args(argv)
    try:
        with PreferenceStore(args.database, create=False) as store:
            votes = store.votes()
    except ConfigError as err:
        print(f"python -m ui.ratings: error: {err}", file=sys.stderr)
        return 2
    board = compute_ratings(votes, bootstrap=args.bootstrap, seed=args.seed)
    print(f"{len(votes)} votes, {len(board)} models")
    print("  ".join(f"{h:>12s}" for h in LEADERBOARD_HEADERS))
    for row in leaderboard_rows(board):
        print("  ".join(f"{v!s:>12s}" for v in row))
    if args.plot and board:
        Path(args.plot).write_bytes(leaderboard_png(board))
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
