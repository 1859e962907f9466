"""The comparison logic behind the Compare tab: answer planning, rankings typed by raters, verdicts."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from ui.client import Sampling
from ui.compare import (Comparison, ShownAnswer, build_vote, parse_ranking, plan_models, reveal,
                        verdict_ranking)
from ui.store import InvalidVoteError


def test_plan_uses_each_model_in_turn_in_a_random_order():
    assert Counter(plan_models(["a", "b"], 4, random.Random(0))) == {"a": 2, "b": 2}
    assert plan_models(["a"], 2, random.Random(0)) == ["a", "a"]  # two samples of one model
    orders = {tuple(plan_models(["a", "b"], 2, random.Random(seed))) for seed in range(20)}
    assert orders == {("a", "b"), ("b", "a")}  # position says nothing about the model
    with pytest.raises(ValueError, match="at least one model"):
        plan_models([], 2, random.Random(0))
    with pytest.raises(ValueError, match="between 2 and 4"):
        plan_models(["a"], 5, random.Random(0))


@pytest.mark.parametrize("text, n, expected", [
    ("B > A", 2, [[1], [0]]),
    ("a=b", 2, [[0, 1]]),
    ("C > A = B", 3, [[2], [0, 1]]),
    ("b, d > a > c", 4, [[1, 3], [0], [2]]),
])
def test_typed_rankings(text, n, expected):
    assert parse_ranking(text, n) == expected


@pytest.mark.parametrize("text, n, message", [
    ("", 3, "type one like A > B > C"),
    ("A > B", 3, "candidate 2 is missing"),
    ("A > A > B", 2, "appears more than once"),
    ("A > E > B", 3, "'E' is not one of the answers"),
    ("A > > B", 2, "empty group"),
])
def test_bad_typed_rankings_say_what_is_wrong(text, n, message):
    with pytest.raises(ValueError, match=message):
        parse_ranking(text, n)


def test_buttons_map_to_outcomes():
    assert verdict_ranking("a", 2) == ("ranked", [[0], [1]])
    assert verdict_ranking("b", 2) == ("ranked", [[1], [0]])
    assert verdict_ranking("tie", 3) == ("ranked", [[0, 1, 2]])
    assert verdict_ranking("bad", 3) == ("not_rankable", [])
    with pytest.raises(ValueError, match="type a ranking"):
        verdict_ranking("a", 3)


def comparison(done=True):
    sampling = Sampling(temperature=0.5, max_tokens=16).record()
    answers = [ShownAnswer(model=m, version="v1", sampling=sampling, content=f"from {m}",
                           finish_reason="stop" if done else None) for m in ("x", "y")]
    return Comparison(messages=[{"role": "user", "content": "hi"}], answers=answers)


def test_build_vote_carries_everything_and_refuses_bad_states():
    vote = build_vote(comparison(), " carol ", "ranked", [[1], [0]], ["off topic"])
    assert vote.rater == "carol" and vote.ranking == [[1], [0]] and vote.flags == ["off topic"]
    assert [(c.model, c.content, c.model_version) for c in vote.candidates] == [("x", "from x", "v1"),
                                                                                ("y", "from y", "v1")]
    assert vote.candidates[0].sampling == {"temperature": 0.5, "top_p": 1.0, "top_k": 0, "max_tokens": 16}
    regenerated = comparison()
    regenerated.regenerations = 1
    assert "regenerated" in build_vote(regenerated, "carol", "not_rankable", [], []).flags
    with pytest.raises(ValueError, match="wait until"):
        build_vote(comparison(done=False), "carol", "ranked", [[0], [1]], [])
    with pytest.raises(InvalidVoteError, match="rater"):
        build_vote(comparison(), "", "ranked", [[0], [1]], [])
    voted = comparison()
    voted.vote_uid = "abc"
    with pytest.raises(ValueError, match="already has your vote"):
        build_vote(voted, "carol", "ranked", [[0], [1]], [])
    assert reveal(comparison()) == "**Answer A**: `x` (v1)  \n**Answer B**: `y` (v1)"
