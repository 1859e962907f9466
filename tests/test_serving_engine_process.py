"""The engine in a child process (serving.engine_process): same answers as the engine on a thread,
cancellation frees the request, and a child that dies ends every open request with an error event."""
from __future__ import annotations

import threading

import pytest
import torch

from serving.engine import Engine
from serving.model_server import load_for_serving


def _collect(engine, prompt, params):
    events, done = [], threading.Event()

    def on_event(event):
        events.append(event)
        if event.finish_reason is not None:
            done.set()

    return engine.submit(prompt, params, on_event), events, done


@pytest.fixture(scope="module")
def engine_process(serving_checkpoint):
    from serving.engine_process import EngineProcess

    engine = EngineProcess(str(serving_checkpoint), "cpu", "float32", max_batch_size=4, num_threads=1)
    yield engine
    engine.shutdown()


def test_child_engine_answers_like_the_threaded_engine(engine_process, serving_checkpoint):
    from model.generate import SamplingParams
    from serving.engine import Engine
    from serving.model_server import load_for_serving

    params = SamplingParams(max_new_tokens=12, temperature=0.8, seed=7, stop_token_ids=())
    local = Engine(*load_for_serving(serving_checkpoint, torch.device("cpu")), max_batch_size=4)
    tokenizer = local.tokenizer
    prompts = [tokenizer.encode(text, bos=True) for text in ("The history of", "Rivers flow into")]
    expected = []
    for prompt in prompts:
        events = []
        local.submit(prompt, params, events.append)
        local.run_until_idle()
        expected.append([e.token_id for e in events])
    runs = [_collect(engine_process, prompt, params) for prompt in prompts]
    for (_, events, done), want in zip(runs, expected):
        assert done.wait(60)
        assert [e.token_id for e in events] == want and events[-1].finish_reason == "length"
    assert engine_process.max_context == local.max_context and engine_process.is_alive()


def test_choices_are_coalesced_in_the_child(engine_process, serving_checkpoint):
    """submit_choice: the child sends one delta per interval (with token strings for log-probs), carrying the
    same text and log-probs the threaded engine's events give."""
    import threading

    from model.generate import SamplingParams
    from serving.model_server import TokenTexts, submit_choice

    params = SamplingParams(max_new_tokens=20, temperature=0.7, seed=5, top_logprobs=2, stop_token_ids=())
    local = Engine(*load_for_serving(serving_checkpoint, torch.device("cpu")), max_batch_size=2)
    prompt = local.tokenizer.encode("Rivers flow into", bos=True)
    expected = []
    submit_choice(local, TokenTexts(local.tokenizer), prompt, params, 1, 2, expected.append)
    local.run_until_idle()
    deltas, done = [], threading.Event()
    engine_process.submit_choice(prompt, params, 8, 2, lambda d: (deltas.append(d), d.finish_reason and done.set()))
    assert done.wait(60)
    assert len(deltas) == 1 + -(-19 // 8)  # the first token alone, then 8 at a time
    assert "".join(d.text for d in deltas) == "".join(d.text for d in expected)
    assert [r.logprob for d in deltas for r in d.logprobs] == pytest.approx([r.logprob for d in expected
                                                                            for r in d.logprobs])
    assert all(len(r.top) == 2 for d in deltas for r in d.logprobs) and deltas[-1].finish_reason == "length"


def test_jobs_run_in_the_child(engine_process, serving_checkpoint):
    import threading

    from model.checkpoint import load_model
    from model.scoring import sequence_logprobs

    done, outcomes = threading.Event(), []
    engine_process.submit_job("score", ([[2, 10, 11, 12], [2, 40]], 1),
                              lambda outcome: (outcomes.append(outcome), done.set()))
    assert done.wait(60) and outcomes[0].error is None
    expected = sequence_logprobs(load_model(serving_checkpoint), [[2, 10, 11, 12], [2, 40]], top_n=1)
    for got, want in zip(outcomes[0].result, expected):
        assert got.logprobs[0] is None and got.logprobs[1:] == pytest.approx(want.logprobs[1:], abs=1e-5)


def test_cancel_ends_the_request(engine_process, serving_checkpoint):
    from model.generate import SamplingParams

    params = SamplingParams(max_new_tokens=400, temperature=0, stop_token_ids=())
    request_id, events, done = _collect(engine_process, [2, 10, 11, 12], params)
    engine_process.cancel(request_id)
    assert done.wait(60)
    assert events[-1].finish_reason == "cancelled" and len(events) < 400


def test_a_dead_child_ends_open_requests_with_an_error(serving_checkpoint):
    from model.generate import SamplingParams
    from serving.engine_process import EngineProcess

    engine = EngineProcess(str(serving_checkpoint), "cpu", "float32", max_batch_size=2, num_threads=1)
    _, events, done = _collect(engine, [2, 10, 11], SamplingParams(max_new_tokens=100_000, temperature=0,
                                                                 stop_token_ids=()))
    engine._process.kill()
    assert done.wait(60)
    assert events[-1].finish_reason == "error" and not engine.is_alive()
    # later work ends at once instead of writing into a broken pipe
    outcomes = []
    engine.submit_job("score", ([[2, 10, 11]], 0), outcomes.append)
    _, late, late_done = _collect(engine, [2, 10], SamplingParams(max_new_tokens=3))
    assert late_done.wait(5) and late[-1].finish_reason == "error"
    assert outcomes and outcomes[0].error == "the engine process exited"


def test_a_bad_checkpoint_fails_at_start_with_its_path(tmp_path):
    from serving.engine_process import EngineProcess

    with pytest.raises(RuntimeError, match=str(tmp_path)):
        EngineProcess(str(tmp_path), "cpu", "float32", max_batch_size=2, num_threads=1)
