"""A scripted rater: votes in the rating app's Compare flow by the built-in rule, standing in for people.

It plays rounds exactly as the app does (:func:`ui.compare.plan_round` picks the models, under-compared
first; :func:`ui.compare.stream_answers` streams the anonymous answers from the OpenAI-compatible API;
:func:`ui.compare.build_vote` turns the verdict into a vote; the store keeps it), and only the judgement is
scripted: the answer that follows the built-in rule (:func:`pipelines.data.instructions.rule_checks`)
ranks first; among answers that all follow it or all break it, those meeting more of its parts rank
higher; equal answers are tied (typed as ``B > A = C``, as a person ranks more than two answers).
That is the rule the built-in preference pairs are labelled by, so the human-feedback loop (serve → rate
→ ``groundup prefs export`` → ``groundup reward`` → ``groundup ppo`` → serve → rate) runs offline.

    python -m ui.scripted_rater --api http://127.0.0.1:8000/v1 --database runs/x/ui/preferences.db \\
        --rounds 64 [--answers 4] [--split train|validation] [--model NAME ...]
"""
from __future__ import annotations

import argparse
import asyncio
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from ui.client import OpenAIClient, Sampling
from ui.compare import (
    LETTERS,
    MAX_ANSWERS,
    Comparison,
    ShownAnswer,
    build_vote,
    parse_ranking,
    plan_round,
    stream_answers,
)
from ui.store import PreferenceStore

RATER = "scripted-rule-rater"
SAMPLING = Sampling(temperature=1.0, max_tokens=24)  # as PPO samples its rollouts


def rule_key(text: str) -> tuple[float, int]:
    """How well an answer follows the built-in rule: passing it first, then the number of parts met."""
    from pipelines.data.instructions import rule_checks, rule_score

    return rule_score(text.strip()), sum(rule_checks(text.strip()).values())


def rule_ranking(answers: Sequence[str]) -> str:
    """The ranking a rater types in the app (``"B > A = C"``): best first, equal answers tied."""
    keys = [rule_key(a) for a in answers]
    groups = [[LETTERS[i] for i, k in enumerate(keys) if k == key] for key in sorted(set(keys), reverse=True)]
    return " > ".join(" = ".join(group) for group in groups)


@dataclass
class RatingSummary:
    votes: int
    ties: int
    failed: int  # rounds whose answers failed to generate (not voted, as a person could not either)


async def _one_round(client: OpenAIClient, store: PreferenceStore, question: str, models: list[str],
                     n_answers: int, rng: random.Random, sampling: Sampling, rater: str) -> str | None:
    planned = plan_round(models, n_answers, store.comparison_counts(), rng)
    comparison = Comparison(messages=[{"role": "user", "content": question}],
                            answers=[ShownAnswer(model=m, version="", sampling=sampling.record()) for m in planned])
    async for _ in stream_answers(client, comparison, sampling):
        pass
    if comparison.failed:
        return None
    typed = rule_ranking([a.content for a in comparison.answers])
    store.add_vote(build_vote(comparison, rater, "ranked", parse_ranking(typed, n_answers), []))
    return typed


async def rate_rounds(api_url: str, store: PreferenceStore, questions: Sequence[str], models: Sequence[str] = (),
                      sampling: Sampling = SAMPLING, seed: int = 0,
                      n_answers: int = 2, concurrency: int = 8, rater: str = RATER) -> RatingSummary:
    """One Compare round of ``n_answers`` anonymous answers per question, ``concurrency`` rounds at a time
    (the server batches them); ``models`` defaults to every model the endpoint lists."""
    client = OpenAIClient(api_url)
    listed = [m.id for m in await client.list_models()]
    unknown = sorted(set(models) - set(listed))
    if unknown:
        raise ValueError(f"model {unknown[0]!r} is not served at {api_url} (it lists {', '.join(listed) or 'none'})")
    names = list(models) or listed
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)

    async def guarded(question: str) -> str | None:
        async with gate:
            return await _one_round(client, store, question, names, n_answers, rng, sampling, rater)

    verdicts = await asyncio.gather(*(guarded(q) for q in questions))
    return RatingSummary(votes=sum(v is not None for v in verdicts), ties=sum(v is not None and ">" not in v for v in verdicts),
                         failed=sum(v is None for v in verdicts))


def builtin_questions(split: str, rounds: int) -> list[str]:
    """``rounds`` questions of the built-in instruction set's split, cycled when there are fewer."""
    from pipelines.data.instructions import builtin_prompts

    questions = [p["prompt"][-1]["content"] for p in builtin_prompts(split)]
    return [questions[i % len(questions)] for i in range(rounds)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ui.scripted_rater", description=__doc__.split("\n\n")[0])
    parser.add_argument("--api", required=True, help="the OpenAI-compatible API base, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--database", required=True, help="the preference store (SQLite file or URL)")
    parser.add_argument("--rounds", type=int, default=64)
    parser.add_argument("--split", choices=("train", "validation"), default="train",
                        help="which built-in questions to ask (validation: modules never seen in training)")
    parser.add_argument("--answers", type=int, default=2, help="answers per round (2-4), ranked by the rule")
    parser.add_argument("--model", action="append", default=[], help="models to compare (default: all listed)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if not 2 <= args.answers <= MAX_ANSWERS:
        parser.error(f"--answers must be between 2 and {MAX_ANSWERS}")
    from ui.client import ApiError

    with PreferenceStore(args.database) as store:
        try:
            summary = asyncio.run(rate_rounds(args.api, store, builtin_questions(args.split, args.rounds),
                                              args.model, Sampling(temperature=args.temperature,
                                                                   max_tokens=args.max_tokens), args.seed,
                                              args.answers))
        except (ApiError, ValueError) as err:
            print(f"scripted rater: {str(err).splitlines()[0]}", file=sys.stderr)
            return 2
    print(f"scripted rater: {summary.votes} votes ({summary.ties} ties), {summary.failed} rounds failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
