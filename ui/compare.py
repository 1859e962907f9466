"""The logic of one side-by-side comparison, kept apart from the Gradio layout so it can be tested.

A comparison is one prompt and N anonymous answers, shown as "Answer A", "Answer B", ... in a random
order. The rater's verdict becomes a :class:`~ui.store.VoteIn`: "A better" is the ranking
``[[0], [1]]``, a tie ``[[0, 1]]``, "all bad" the outcome ``not_rankable``; for N > 2 the rater types
a ranking such as ``B > A = C``.
"""
from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ui.store import VoteIn, check_ranking

MAX_ANSWERS = 4
LETTERS = string.ascii_uppercase[:MAX_ANSWERS]


@dataclass
class ShownAnswer:
    model: str
    version: str
    sampling: dict[str, Any]
    content: str = ""
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Comparison:
    messages: list[dict[str, str]]
    answers: list[ShownAnswer]
    presented_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    regenerations: int = 0
    vote_uid: str | None = None  # set once the rater has voted: a comparison takes one vote

    @property
    def complete(self) -> bool:
        return all(a.finish_reason is not None for a in self.answers)

    @property
    def failed(self) -> bool:
        return any(a.error for a in self.answers)


def plan_models(models: list[str], n_answers: int, rng: random.Random) -> list[str]:
    """Which model writes each shown answer: the chosen models in turn (one model twice gives two
    samples of it), then shuffled so the position says nothing about the model."""
    if not models:
        raise ValueError("choose at least one model to compare")
    if not 2 <= n_answers <= MAX_ANSWERS:
        raise ValueError(f"number of answers must be between 2 and {MAX_ANSWERS}")
    planned = [models[i % len(models)] for i in range(n_answers)]
    rng.shuffle(planned)
    return planned


def parse_ranking(text: str, n_answers: int) -> list[list[int]]:
    """``"B > A = C"`` -> ``[[1], [0, 2]]``: groups best first split by '>', ties joined by '=' or ','."""
    letters = LETTERS[:n_answers]
    if not text.strip():
        raise ValueError(f"ranking: type one like {' > '.join(letters)} (ties: A = B)")
    ranking: list[list[int]] = []
    for part in text.upper().split(">"):
        names = [n for n in re.split(r"[=,\s]+", part) if n]
        unknown = [n for n in names if n not in letters]
        if unknown:
            raise ValueError(f"ranking: {unknown[0]!r} is not one of the answers {', '.join(letters)}")
        ranking.append([letters.index(n) for n in names])
    check_ranking(ranking, n_answers)
    return ranking


def verdict_ranking(verdict: str, n_answers: int) -> tuple[str, list[list[int]]]:
    """(outcome, ranking) for a button: 'a', 'b' (two answers only), 'tie' or 'bad'."""
    if verdict == "bad":
        return "not_rankable", []
    if verdict == "tie":
        return "ranked", [list(range(n_answers))]
    if n_answers != 2:
        raise ValueError("with more than two answers, type a ranking such as B > A = C")
    return "ranked", [[0], [1]] if verdict == "a" else [[1], [0]]


def build_vote(comparison: Comparison, rater: str, outcome: str, ranking: list[list[int]],
               flags: list[str]) -> VoteIn:
    if comparison.vote_uid is not None:
        raise ValueError("this comparison already has your vote; generate a new one")
    if not comparison.complete:
        raise ValueError("wait until every answer has finished")
    if comparison.failed:
        raise ValueError("an answer failed to generate; regenerate before voting")
    extra_flags = ["regenerated"] if comparison.regenerations else []
    return VoteIn.parse({
        "messages": comparison.messages,
        "candidates": [{"model": a.model, "model_version": a.version, "content": a.content,
                        "sampling": a.sampling, "finish_reason": a.finish_reason}
                       for a in comparison.answers],
        "rater": rater or "",
        "outcome": outcome,
        "ranking": ranking,
        "flags": sorted(set(flags) | set(extra_flags)),
        "presented_at": comparison.presented_at,
    })


def reveal(comparison: Comparison) -> str:
    """Markdown naming the model behind each answer (shown only after the vote)."""
    lines = [f"**Answer {LETTERS[i]}**: `{a.model}`" + (f" ({a.version})" if a.version else "")
             for i, a in enumerate(comparison.answers)]
    return "  \n".join(lines)

