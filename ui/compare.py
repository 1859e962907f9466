"""The logic of one side-by-side comparison, kept apart from the Gradio layout so it can be tested.

A comparison is one prompt and N anonymous answers, shown as "Answer A", "Answer B", ... in a random
order. The rater's verdict becomes a :class:`~ui.store.VoteIn`: "A better" is the ranking
``[[0], [1]]``, a tie ``[[0, 1]]``, "all bad" the outcome ``not_rankable``; for N > 2 the rater types
a ranking such as ``B > A = C``. A queued comparison (:func:`queued_comparison`) shows two replies
generated elsewhere (``groundup evaluate --queue``) instead of generating them; its vote names the entry.
"""
from __future__ import annotations

import asyncio
import random
import re
import string
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ui.client import ApiError, OpenAIClient, Sampling
from ui.store import InvalidVoteError, QueueEntry, VoteIn, check_ranking

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
    presented_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    regenerations: int = 0
    vote_uid: str | None = None  # set once the rater has voted: a comparison takes one vote
    queue_entry: int | None = None  # a queued comparison: the replies came from the queue, not the models
    queue_batch: str = ""

    @property
    def complete(self) -> bool:
        return all(a.finish_reason is not None for a in self.answers)

    @property
    def failed(self) -> bool:
        return any(a.error for a in self.answers)


def queued_comparison(entry: QueueEntry) -> Comparison:
    """A comparison showing a queue entry's two replies as Answer A and B, as queued (nothing to generate)."""
    return Comparison(messages=[m.model_dump() for m in entry.messages], queue_entry=entry.id, queue_batch=entry.batch,
                      answers=[ShownAnswer(model=entry.model_a, version="", sampling=dict(entry.sampling),
                                           content=entry.reply_a, finish_reason="stop"),
                               ShownAnswer(model=entry.model_b, version="", sampling=dict(entry.sampling),
                                           content=entry.reply_b, finish_reason="stop")])


def plan_round(models: list[str], n_answers: int, comparisons: dict[str, int], rng: random.Random) -> list[str]:
    """Which model writes each answer of a round: different models while there are enough, those compared
    least so far first (ties at random), so under-compared models get more comparisons; in a random order.
    ``comparisons``: per model, the votes that compared it with another model."""
    if not models:
        raise ValueError("no model to compare: the server lists none")
    if not 2 <= n_answers <= MAX_ANSWERS:
        raise ValueError(f"number of answers must be between 2 and {MAX_ANSWERS}")
    pool = sorted(set(models), key=lambda m: (comparisons.get(m, 0), rng.random()))
    planned = [pool[i % len(pool)] for i in range(n_answers)]  # fewer models than answers: samples of one
    rng.shuffle(planned)
    return planned


def single_model_notice(models: list[str]) -> str:
    """What a rater should know when fewer than two models take part (empty when two or more do)."""
    distinct = sorted(set(models))
    if len(distinct) >= 2:
        return ""
    if not distinct:
        return "No model is available to compare."
    return (f"Only one model takes part (`{distinct[0]}`): each round compares two samples of it. Votes are "
            "stored, but rating models needs answers from two different models.")


def rater_message(err: Exception) -> str:
    """An error in the words of a rater, not a developer (one line)."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, InvalidVoteError):
        if "rater" in text:
            return "enter a rater id (your name) in the box at the top before voting"
        return "this vote could not be stored: " + text.removeprefix("invalid vote: ")
    if isinstance(err, ApiError):
        if err.status is None:
            return "the models' server cannot be reached right now: try again, or tell the operator"
        if err.code == "context_length_exceeded":
            return "the prompt is too long for this model: shorten it"
        if err.status == 429:
            return "too many requests right now: wait a minute and try again"
        if err.status == 401:
            return "the app's API key was refused: tell the operator"
        if err.status >= 500:
            return "the model failed to answer: press Regenerate to try again"
        return "the model could not answer this request: " + text.split(": ", 1)[-1]
    return text


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
        raise ValueError("this comparison already has your vote: press Next round for a new one")
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
        "queue_entry": comparison.queue_entry,
    })


def reveal(comparison: Comparison) -> str:
    """Markdown naming the model behind each answer (shown only after the vote)."""
    lines = [f"**Answer {LETTERS[i]}**: `{a.model}`" + (f" ({a.version})" if a.version else "")
             for i, a in enumerate(comparison.answers)]
    return "  \n".join(lines)


async def stream_answers(client: OpenAIClient, comparison: Comparison,
                          sampling: Sampling) -> AsyncIterator[None]:
    """Generate every answer of a comparison concurrently; yields after each streamed chunk."""
    updates: asyncio.Queue[bool] = asyncio.Queue()

    async def pump(answer: ShownAnswer) -> None:
        try:
            stream = client.stream_chat(answer.model, comparison.messages, sampling, answer.version)
            async for partial in stream:
                answer.content, answer.finish_reason = partial.text, partial.finish_reason
                await updates.put(False)
        except ApiError as err:
            answer.error, answer.finish_reason = rater_message(err), "error"
        finally:
            await updates.put(True)

    tasks = [asyncio.create_task(pump(a)) for a in comparison.answers]
    try:
        finished = 0
        while finished < len(tasks):
            finished += await updates.get()
            yield None
    finally:
        for task in tasks:
            task.cancel()
