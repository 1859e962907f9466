"""The comparison logic behind the Compare tab: answer planning, rankings typed by raters, verdicts."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from ui.client import Sampling
from ui.compare import (
    Comparison,
    ShownAnswer,
    build_vote,
    parse_ranking,
    plan_round,
    rater_message,
    reveal,
    single_model_notice,
    verdict_ranking,
)
from ui.store import InvalidVoteError


def test_rounds_favour_under_compared_models_in_a_random_order():
    counts = {"a": 10, "b": 0, "c": 1, "d": 7}
    assert sorted(plan_round(["a", "b", "c", "d"], 2, counts, random.Random(0))) == ["b", "c"]
    assert Counter(plan_round(["a", "b"], 4, {}, random.Random(0))) == {"a": 2, "b": 2}
    assert plan_round(["a"], 2, {}, random.Random(0)) == ["a", "a"]  # two samples of one model
    orders = {tuple(plan_round(["a", "b"], 2, {}, random.Random(seed))) for seed in range(20)}
    assert orders == {("a", "b"), ("b", "a")}  # position says nothing about the model
    # over many rounds every model gets its share, whatever it started with
    counts, rng = {"a": 5, "b": 0, "c": 0}, random.Random(1)
    for _ in range(30):
        for model in set(plan_round(list(counts), 2, counts, rng)):
            counts[model] += 1
    assert max(counts.values()) - min(counts.values()) <= 1
    with pytest.raises(ValueError, match="no model"):
        plan_round([], 2, {}, random.Random(0))
    with pytest.raises(ValueError, match="between 2 and 4"):
        plan_round(["a"], 5, {}, random.Random(0))


def test_single_model_and_rater_worded_errors():
    from ui.client import ApiError

    assert single_model_notice(["a", "b"]) == ""
    assert "Only one model" in single_model_notice(["tiny", "tiny"]) and "`tiny`" in single_model_notice(["tiny"])
    with pytest.raises(InvalidVoteError) as err:
        build_vote(comparison(), "", "ranked", [[0], [1]], [])
    assert rater_message(err.value) == "enter a rater id (your name) in the box at the top before voting"
    assert "too long" in rater_message(ApiError("HTTP 400: ...", 400, "context_length_exceeded"))
    assert "Regenerate" in rater_message(ApiError("HTTP 500: ...", 500, "generation_failed"))
    assert "cannot be reached" in rater_message(ApiError("cannot reach http://x: ConnectError"))
    assert "wait a minute" in rater_message(ApiError("HTTP 429: ...", 429, "rate_limit_exceeded"))


def test_chat_drops_the_oldest_turns_first():
    from ui.chat import drop_oldest_turn

    system = {"role": "system", "content": "s"}
    turns = [system, {"role": "user", "content": "1"}, {"role": "assistant", "content": "r1"},
             {"role": "user", "content": "2"}, {"role": "assistant", "content": "r2"}, {"role": "user", "content": "3"}]
    once = drop_oldest_turn(turns)
    assert once == [system, *turns[3:]]
    assert drop_oldest_turn(once) == [system, turns[-1]]
    assert drop_oldest_turn([system, turns[-1]]) is None and drop_oldest_turn([turns[-1]]) is None


def test_prompt_sets_load_every_format_and_name_bad_lines(tmp_path):
    from ui.prompts import PromptDeck, load_prompt_set

    (tmp_path / "p.txt").write_text("What is a river?\n\nName a colour.\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "Hi"}\n{"question": "Why?"}\n'
                                      '{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", '
                                      '"content": "A"}]}\n')
    assert [p[-1]["content"] for p in load_prompt_set(tmp_path / "p.txt")] == ["What is a river?", "Name a colour."]
    loaded = load_prompt_set(tmp_path / "p.jsonl")
    assert [p[-1]["content"] for p in loaded] == ["Hi", "Why?", "Q"] and len(loaded[2]) == 1
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"nothing": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl line 2"):
        load_prompt_set(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="no such file"):
        load_prompt_set(tmp_path / "missing.txt")
    deck = PromptDeck(loaded, random.Random(0))
    drawn = [deck.draw()[-1]["content"] for _ in range(6)]
    assert sorted(drawn[:3]) == sorted(drawn[3:]) == ["Hi", "Q", "Why?"]  # all before any repeats


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


def test_scripted_rater_ranks_by_the_built_in_rule_as_a_person_types_it():
    from ui.compare import parse_ranking
    from ui.scripted_rater import rule_ranking

    follows = "Return the object."  # every part of the rule
    no_end, gibberish = "Return the object", "Rqzx the objectqz."  # three parts each
    one_word = "Return"  # real words and no repetition only: two parts
    assert rule_ranking([no_end, follows, one_word, gibberish]) == "B > A = D > C"
    assert parse_ranking(rule_ranking([no_end, follows, one_word, gibberish]), 4) == [[1], [0, 3], [2]]
    assert rule_ranking([follows, follows]) == "A = B"  # a tie, stored as one group
