"""Streaming pieces without Ray: coalescing a choice's tokens into chunks, and the SSE chunk writer."""
from __future__ import annotations

import json

import pytest

from serving.api import ChunkWriter, _sse, chat_logprobs, completion_logprobs
from serving.model_server import ChoiceDelta, Coalescer, TokenLogprob
from serving.schemas import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionResponse,
    Delta,
    Usage,
)


def token_events(texts: list[str], finish: str = "length") -> list[ChoiceDelta]:
    """One delta per token, as the engine's callback makes them; the last one finishes the choice."""
    return [ChoiceDelta(text, finish if i == len(texts) - 1 else None, i + 1, 1,
                        [TokenLogprob(text, tuple(text.encode()), -0.5 * i, None, len(text))], -0.5 * i)
            for i, text in enumerate(texts)]


def coalesce(interval: int, events: list[ChoiceDelta]) -> list[ChoiceDelta]:
    coalescer = Coalescer(interval)
    return [out for out in map(coalescer.add, events) if out is not None]


TEXTS = ["Once", " upon", " a", " time", "", " there", " was", " é", "\n", "x"]


@pytest.mark.parametrize("interval", [1, 2, 3, 4, 8, 100])
def test_coalesced_events_reassemble_to_the_same_answer(interval):
    events = token_events(TEXTS)
    sent = coalesce(interval, events)
    assert "".join(e.text for e in sent) == "".join(TEXTS)
    assert sent[0] == events[0]  # the first token goes out alone, at once (time to first token)
    assert [r for e in sent for r in e.logprobs] == [r for e in events for r in e.logprobs]  # none lost
    assert sent[-1].finish_reason == "length" and sent[-1].completion_tokens == len(TEXTS)
    assert all(e.finish_reason is None for e in sent[:-1])
    assert [e.completion_tokens for e in sent] == sorted(e.completion_tokens for e in sent)
    # after the first, a chunk carries `interval` tokens, except the last which flushes what is left
    assert [b.completion_tokens - a.completion_tokens for a, b in zip(sent, sent[1:])][:-1] == \
        [interval] * (len(sent) - 2)
    assert len(sent) == 1 + -(-(len(TEXTS) - 1) // interval)  # 1 + ceil(rest / interval)


def test_interval_one_sends_every_event_unchanged():
    events = token_events(TEXTS)
    assert coalesce(1, events) == events


def test_finish_without_a_token_flushes_held_text():
    # a cancel or error arrives as a delta without a token: held text must not be lost
    events = token_events(["a", "b", "c"], finish=None) + [ChoiceDelta("", "cancelled", 3, 0, None)]
    sent = coalesce(8, events)
    assert [e.text for e in sent] == ["a", "bc"]
    assert sent[-1].finish_reason == "cancelled" and [r.token for r in sent[-1].logprobs] == ["b", "c"]


def test_interval_must_be_positive():
    with pytest.raises(ValueError):
        Coalescer(0)


def test_completion_chunks_are_what_the_schema_models_give():
    writer = ChunkWriter("text_completion", "cmpl-1", 1700000000, 'my "model"')
    usage = Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    for text, finish, usage_now in [("héllo \"q\"\n", None, None), ("", "stop", usage), ("\u2028x", "length", None)]:
        body = CompletionResponse(id="cmpl-1", created=1700000000, model='my "model"', usage=usage_now,
                                  choices=[CompletionChoice(index=2, text=text, finish_reason=finish)]).model_dump()
        if usage_now is None:
            body.pop("usage")
        assert writer.event([writer.text_choice(2, text, finish)], usage_now) == _sse(body)
    last = CompletionResponse(id="cmpl-1", created=1700000000, model='my "model"', choices=[], usage=usage)
    assert writer.event([], usage) == _sse(last.model_dump())


def test_chat_chunks_are_what_the_schema_models_give():
    writer = ChunkWriter("chat.completion.chunk", "chatcmpl-1", 1700000000, "tiny")

    def expected(choices, usage=None) -> bytes:
        body = ChatCompletionChunk(id="chatcmpl-1", created=1700000000, model="tiny", choices=choices,
                                   usage=usage).model_dump()
        if usage is None:
            body.pop("usage")
        for choice in body["choices"]:  # OpenAI leaves unset delta fields out
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        return _sse(body)

    opening = [ChatChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(3)]
    assert writer.event([writer.delta_choice(i, "", None, role="assistant") for i in range(3)]) == expected(opening)
    usage = Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
    for content, finish, usage_now in [("tok ens", None, None), (None, "stop", usage), ("ü", "length", usage)]:
        choice = ChatChunkChoice(index=1, delta=Delta(content=content), finish_reason=finish)
        assert writer.event([writer.delta_choice(1, content, finish)], usage_now) == expected([choice], usage_now)
    # and it is one SSE event holding OpenAI's chunk object
    line = writer.event([writer.delta_choice(0, "hi", None)]).decode()
    assert line.startswith("data: ") and line.endswith("\n\n") and line.count("\n") == 2
    chunk = json.loads(line[6:])
    assert chunk["object"] == "chat.completion.chunk" and chunk["choices"][0]["delta"] == {"content": "hi"}


def test_logprobs_objects_have_openais_shapes():
    records = [TokenLogprob("<s>", (60, 115, 62), None, None, 0),
               TokenLogprob(" the", (32, 116, 104, 101), -1.5, ((" the", (32,), -1.5), (" a", (32,), -2.0)), 4),
               TokenLogprob("bytes:\\xe2", (0xE2,), -0.1, ((" x", (32,), -0.05), ("bytes:\\xe2", (0xE2,), -0.1)), 1)]
    legacy = completion_logprobs(records, offset=10)
    assert legacy == {"tokens": ["<s>", " the", "bytes:\\xe2"], "token_logprobs": [None, -1.5, -0.1],
                      "top_logprobs": [None, {" the": -1.5, " a": -2.0}, {" x": -0.05, "bytes:\\xe2": -0.1}],
                      "text_offset": [10, 10, 14]}
    chat = chat_logprobs(records[1:])
    assert chat["refusal"] is None and chat["content"][0] == {
        "token": " the", "logprob": -1.5, "bytes": [32, 116, 104, 101],
        "top_logprobs": [{"token": " the", "logprob": -1.5, "bytes": [32]}, {"token": " a", "logprob": -2.0, "bytes": [32]}]}
