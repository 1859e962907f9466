"""The continuous-batching engine without Ray: same answers as model.generate, whatever shares the batch."""
from __future__ import annotations

import asyncio

import pytest

from model.checkpoint import load_model, load_tokenizer
from model.generate import SamplingParams, generate
from serving.engine import Engine, GenerationEvent, PromptTooLongError


@pytest.fixture(scope="module")
def model_and_tokenizer(serving_checkpoint):
    return load_model(serving_checkpoint), load_tokenizer(serving_checkpoint)


def run_all(engine: Engine, requests: list[tuple[list[int], SamplingParams]]) -> list[list[GenerationEvent]]:
    events: list[list[GenerationEvent]] = [[] for _ in requests]
    for index, (prompt, params) in enumerate(requests):
        engine.submit(prompt, params, events[index].append)
    engine.run_until_idle()
    return events


def answer(events: list[GenerationEvent]) -> tuple[list[int], str, str]:
    tokens = [e.token_id for e in events if e.token_id is not None][: events[-1].completion_tokens]
    return tokens, "".join(e.text for e in events), events[-1].finish_reason


PROMPTS = ["The history of", "Once upon a time there was a", "Rivers flow", "A", "Numbers like 12 and 345 are",
           "In the morning the", "Science is the study of how the world works and"]


def test_continuous_batching_matches_generate_greedy(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    # Fewer rows than requests, and different lengths: sequences join while others decode.
    engine = Engine(model, tokenizer, max_batch_size=3)
    requests = [(tokenizer.encode(text, bos=True), SamplingParams(max_new_tokens=5 + 3 * i, temperature=0,
                                                                  stop_token_ids=()))
                for i, text in enumerate(PROMPTS)]
    results = run_all(engine, requests)
    for (prompt, params), events in zip(requests, results):
        expected = generate(model, [prompt], params, tokenizer)[0]
        tokens, text, finish = answer(events)
        assert tokens == expected.token_ids
        assert text == expected.text
        assert finish == expected.finish_reason == "length"
        assert len(tokens) == params.max_new_tokens
    assert engine.num_running == 0 and engine.num_waiting == 0
    assert sorted(engine.decoder.free_rows) == [0, 1, 2]


def test_seeded_sampling_is_reproducible_and_independent_of_batch(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode("Once upon a time", bos=True)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=1234, stop_token_ids=())
    alone = answer(run_all(Engine(model, tokenizer, 4), [(prompt, params)])[0])
    crowded = run_all(Engine(model, tokenizer, 4), [
        (tokenizer.encode("Other text here", bos=True), SamplingParams(max_new_tokens=7, seed=1)),
        (prompt, params),
        (tokenizer.encode("More", bos=True), SamplingParams(max_new_tokens=20, temperature=0.7, seed=9)),
    ])
    assert answer(crowded[1]) == alone
    other_seed = answer(run_all(Engine(model, tokenizer, 4), [(prompt, SamplingParams(
        max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=4321, stop_token_ids=()))])[0])
    assert other_seed[0] != alone[0]
    # model.generate with the same seed gives the same sample
    assert generate(model, [prompt], params, tokenizer)[0].token_ids == alone[0]


def test_stop_strings_and_max_tokens(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode("The history of", bos=True)
    free = answer(run_all(Engine(model, tokenizer, 2), [(prompt, SamplingParams(
        max_new_tokens=30, temperature=0, stop_token_ids=()))])[0])
    text = free[1]
    assert len(text) > 6
    stop = text[3:6]
    stopped = answer(run_all(Engine(model, tokenizer, 2), [(prompt, SamplingParams(
        max_new_tokens=30, temperature=0, stop=(stop,), stop_token_ids=()))])[0])
    assert stopped[2] == "stop"
    assert stopped[1] == text[: text.find(stop)]
    assert stop not in stopped[1]
    one = answer(run_all(Engine(model, tokenizer, 2), [(prompt, SamplingParams(
        max_new_tokens=1, temperature=0, stop_token_ids=()))])[0])
    assert one[0] == free[0][:1] and one[2] == "length"


def test_stop_token_ends_the_answer_without_being_part_of_it(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode("The history of", bos=True)
    greedy = answer(run_all(Engine(model, tokenizer, 2), [(prompt, SamplingParams(
        max_new_tokens=10, temperature=0, stop_token_ids=()))])[0])
    stop_id = greedy[0][4]
    first = greedy[0].index(stop_id)
    events = run_all(Engine(model, tokenizer, 2), [(prompt, SamplingParams(
        max_new_tokens=10, temperature=0, stop_token_ids=(stop_id,)))])[0]
    tokens, _, finish = answer(events)
    assert finish == "stop" and tokens == greedy[0][:first]
    assert events[-1].completion_tokens == first


def test_prompt_too_long_is_refused_and_context_caps_length(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, 2)
    limit = model.config.max_seq_len
    with pytest.raises(PromptTooLongError):
        engine.submit([5] * limit, SamplingParams(), lambda e: None)
    events = run_all(engine, [([5] * (limit - 3), SamplingParams(max_new_tokens=50, temperature=0,
                                                                stop_token_ids=()))])[0]
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 3


def test_async_stream_and_cancel(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, 2).start()
    prompt = tokenizer.encode("Rivers flow", bos=True)

    async def collect(limit: int | None):
        events = []
        async for event in engine.stream(prompt, SamplingParams(max_new_tokens=40, temperature=0,
                                                                stop_token_ids=())):
            events.append(event)
            if limit is not None and len(events) == limit:
                break
        return events

    try:
        full = asyncio.run(collect(None))
        assert full[-1].finish_reason == "length" and full[-1].completion_tokens == 40
        asyncio.run(collect(2))  # leaving early cancels the sequence and frees its row
        for _ in range(200):
            if not engine.has_work():
                break
            asyncio.run(asyncio.sleep(0.01))
        assert engine.num_running == 0 and sorted(engine.decoder.free_rows) == [0, 1]
        again = asyncio.run(collect(None))
        assert [e.token_id for e in again] == [e.token_id for e in full]
    finally:
        engine.shutdown()


def test_a_poisoned_request_among_fifteen_good_ones_leaves_them_intact(model_and_tokenizer):
    """Accepted extreme values (5e-324, 1e-40) in one request of a full batch: it answers (greedy), and the
    fifteen sampled requests sharing its batch answer exactly as they do alone."""
    model, tokenizer = model_and_tokenizer
    good = [(tokenizer.encode(f"{PROMPTS[i % len(PROMPTS)]} {i}", bos=True),
             SamplingParams(max_new_tokens=6 + i % 5, temperature=0.6 + 0.05 * i, top_p=0.9, top_k=40 * (i % 2),
                            min_p=0.02 * (i % 3), repetition_penalty=1.0 + 0.1 * (i % 4), seed=100 + i,
                            stop_token_ids=()))
            for i in range(15)]
    poison = (tokenizer.encode("Poison", bos=True),
              SamplingParams(max_new_tokens=9, temperature=5e-324, top_p=1e-40, min_p=5e-324,
                             repetition_penalty=1e-40, stop_token_ids=()))
    together = run_all(Engine(model, tokenizer, max_batch_size=16), good[:7] + [poison] + good[7:])
    answers = [answer(events) for events in together]
    poisoned = answers.pop(7)
    assert poisoned[2] == "length" and len(poisoned[0]) == 9
    alone = [answer(run_all(Engine(model, tokenizer, max_batch_size=1), [request])[0]) for request in good]
    assert answers == alone
    assert all(a[2] == "length" for a in alone)


def test_jobs_score_and_beam_search_between_decoding_steps(model_and_tokenizer):
    """Scoring (model.scoring) and beam search (model.generate) run as engine jobs while sequences decode,
    with the same results as called directly; a job that fails ends alone."""
    from model.generate import beam_search
    from model.scoring import sequence_logprobs
    from serving.engine import JobDone

    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, max_batch_size=2)
    texts = [tokenizer.encode(t, bos=True) for t in PROMPTS[:3]]
    params = SamplingParams(max_new_tokens=5, stop_token_ids=())
    done: dict[str, JobDone] = {}
    events: list[GenerationEvent] = []
    engine.submit(texts[0], SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=()), events.append)
    engine.submit_job("score", (texts, 2), lambda outcome: done.__setitem__("score", outcome))
    engine.submit_job("beam_search", (texts[1], params, 3, 2), lambda outcome: done.__setitem__("beam", outcome))
    engine.submit_job("score", ([[5] * 10_000], 0), lambda outcome: done.__setitem__("bad", outcome))
    engine.run_until_idle()
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 12
    direct = sequence_logprobs(model, texts, top_n=2)
    assert [s.logprobs for s in done["score"].result] == [s.logprobs for s in direct]
    assert [s.top for s in done["score"].result] == [s.top for s in direct]
    beams = beam_search(model, texts[1], params, 3, 2, tokenizer)
    assert [(b.token_ids, b.text) for b in done["beam"].result] == [(b.token_ids, b.text) for b in beams]
    assert done["bad"].result is None and "context" in done["bad"].error
