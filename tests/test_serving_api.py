"""The OpenAI-compatible API on a real Ray Serve deployment, through the official openai client and raw HTTP."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def client(openai_client) -> openai.OpenAI:
    return openai_client


@pytest.fixture(scope="module")
def tokenizer(serving_checkpoint):
    from model.checkpoint import load_tokenizer

    return load_tokenizer(serving_checkpoint)


def post(serving_app, path: str, timeout: float = 120, **kwargs) -> httpx.Response:
    return httpx.post(f"{serving_app.api_url}{path}", timeout=timeout, **kwargs)


def test_models_and_health(client, serving_app):
    models = client.models.list()
    assert sorted(m.id for m in models.data) == ["tiny", "tiny-2"]
    versions = {m.id: m.version for m in models.data}  # the weights' short hash, kept with votes
    assert versions["tiny"] == versions["tiny-2"] == serving_app.config.models[0].version
    assert len(versions["tiny"]) == 12 and int(versions["tiny"], 16) >= 0
    one = httpx.get(f"{serving_app.api_url}/models/tiny", timeout=30).json()
    assert one["id"] == "tiny" and one["version"] == versions["tiny"]
    health = httpx.get(f"{serving_app.base_url}/health", timeout=30)
    assert health.status_code == 200 and health.json() == {"status": "ok", "models": {"tiny": "ok", "tiny-2": "ok"}}


def test_completion_usage_and_greedy_determinism(client, tokenizer):
    prompt = "The history of"
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=7, temperature=0,
                                      extra_body={"ignore_eos": True})
    again = client.completions.create(model="tiny", prompt=prompt, max_tokens=7, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert first.choices[0].text == again.choices[0].text
    assert first.choices[0].finish_reason == "length"
    assert first.usage.prompt_tokens == len(tokenizer.encode(prompt, bos=True))
    assert first.usage.completion_tokens == 7
    assert first.usage.total_tokens == first.usage.prompt_tokens + 7


def test_completion_matches_in_process_generate(client, serving_checkpoint, tokenizer):
    from model.checkpoint import load_model
    from model.generate import SamplingParams, generate

    prompt = "Once upon a time"
    served = client.completions.create(model="tiny-2", prompt=prompt, max_tokens=9, temperature=0,
                                       extra_body={"ignore_eos": True})
    expected = generate(load_model(serving_checkpoint), [tokenizer.encode(prompt, bos=True)],
                        SamplingParams(max_new_tokens=9, temperature=0, stop_token_ids=()), tokenizer)[0]
    assert served.choices[0].text == expected.text


def test_seeded_sampling_n_and_per_choice_seeds(client):
    kwargs = dict(model="tiny", prompt="Rivers", max_tokens=8, temperature=1.0, top_p=0.95, seed=7, n=3,
                  extra_body={"ignore_eos": True, "top_k": 40, "repetition_penalty": 1.2})
    one, two = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.text for c in one.choices] == [c.text for c in two.choices]
    assert [c.index for c in one.choices] == [0, 1, 2]
    assert len({c.text for c in one.choices}) > 1  # different seeds per choice
    assert one.usage.completion_tokens == 24


def test_chat_completion_uses_chat_template(client, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    expected_prompt = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True).ids)
    assert reply.usage.prompt_tokens == expected_prompt
    assert 0 < reply.usage.completion_tokens <= 6 or reply.choices[0].finish_reason == "stop"


def test_streaming_chat_equals_non_streaming(client):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=12,
                  temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_streaming_completion_with_stop_string(client):
    base = client.completions.create(model="tiny", prompt="The history of", max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(base) > 6
    stop = base[3:6]
    chunks = list(client.completions.create(model="tiny", prompt="The history of", max_tokens=20, temperature=0,
                                            stop=[stop], stream=True, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks)
    assert text == base[: base.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)  # no usage chunk unless stream_options asks for one


def test_streamed_tokens_are_coalesced_per_interval_and_reassemble(client, serving_app):
    interval = serving_app.config.stream_interval
    assert interval > 1  # the served default coalesces
    kwargs = dict(model="tiny", prompt="Once upon a time", max_tokens=20, temperature=0,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    usage = chunks.pop()  # the last chunk: usage, no choices
    assert usage.choices == [] and usage.usage.completion_tokens == 20
    assert all(c.object == "text_completion" and len(c.choices) == 1 and c.choices[0].index == 0 for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == whole
    # the first token alone (time to first token), then up to `interval` tokens per chunk
    assert len(chunks) <= 1 + -(-19 // interval) < 20
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]


def test_raw_sse_format_ends_with_done(serving_app):
    with httpx.stream("POST", f"{serving_app.api_url}/completions", timeout=120,
                      json={"model": "tiny", "prompt": "Hi", "max_tokens": 3, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    bodies = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(b["object"] == "text_completion" for b in bodies)


def test_concurrent_requests_all_complete(serving_app):
    import concurrent.futures

    def one(i: int):
        return post(serving_app, "/completions", json={"model": "tiny", "prompt": f"Number {i}", "max_tokens": 5 + i,
                                                       "temperature": 0, "ignore_eos": True})

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(one, range(12)))
    assert [r.status_code for r in responses] == [200] * 12
    assert [r.json()["usage"]["completion_tokens"] for r in responses] == [5 + i for i in range(12)]


# ---- errors ----------------------------------------------------------------------------------------
def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code


@pytest.mark.parametrize("body, status, param", [
    ({"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": "x", "n": 0}, 400, "n"),
    ({"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "tiny", "prompt": 5}, 400, "prompt"),
    ({"model": "tiny", "prompt": []}, 400, "prompt"),
    ({"model": "tiny"}, 400, "prompt"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": 3, "prompt": "x"}, 400, "model"),
])
def test_bad_completion_fields(serving_app, body, status, param):
    assert_error(post(serving_app, "/completions", json=body), status, param)


def test_bad_chat_messages(serving_app):
    assert_error(post(serving_app, "/chat/completions", json={"model": "tiny", "messages": []}), 400, "messages")
    assert_error(post(serving_app, "/chat/completions", json={"model": "tiny", "messages": [{"role": "robot",
                                                                                              "content": "x"}]}), 400)
    assert_error(post(serving_app, "/chat/completions", json={"model": "tiny", "messages": [{"role": "user"}]}), 400)
    assert_error(post(serving_app, "/chat/completions", json={"model": "tiny", "messages": "hello"}), 400, "messages")


def test_malformed_json_and_unknown_routes(serving_app):
    for content in (b"{not json", b"", b"[1, 2]", b"null", b"\xff\xfe"):
        response = post(serving_app, "/chat/completions", content=content, headers={"content-type": "application/json"})
        assert_error(response, 400)
    assert_error(httpx.get(f"{serving_app.api_url}/nothing", timeout=30), 404)
    assert_error(httpx.get(f"{serving_app.api_url}/completions", timeout=30), 405)


def test_unknown_model_is_404(client, serving_app):
    assert_error(post(serving_app, "/completions", json={"model": "gpt-9", "prompt": "x"}), 404, "model",
                 "model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])


def test_prompt_longer_than_context_and_max_tokens_beyond_it(serving_app, client):
    context = serving_app.config.models[0].max_context
    huge = "word " * (context * 3)
    assert_error(post(serving_app, "/completions", json={"model": "tiny", "prompt": huge}), 400, "prompt",
                 "context_length_exceeded")
    assert_error(post(serving_app, "/chat/completions", json={"model": "tiny", "stream": True, "messages": [
        {"role": "user", "content": huge}]}), 400, "messages", "context_length_exceeded")
    assert_error(post(serving_app, "/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 10**9}), 400,
                 "max_tokens", "context_length_exceeded")
    assert_error(post(serving_app, "/completions", json={"model": "tiny", "prompt": [[1, 2], [99999999]]}), 400,
                 "prompt")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=context + 1)
    # the context caps a default-length answer instead of failing
    near_full = post(serving_app, "/completions", json={"model": "tiny", "prompt": [5] * (context - 2),
                                                        "ignore_eos": True})
    assert near_full.status_code == 200 and near_full.json()["usage"]["completion_tokens"] == 2


def test_api_keys_and_rate_limit(serving_app):
    url = f"{serving_app.secure_api_url}/completions"
    body = {"model": "tiny", "prompt": "x", "max_tokens": 1}
    assert_error(httpx.post(url, json=body, timeout=60), 401, code="invalid_api_key")
    assert_error(httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}, timeout=60), 401)
    assert_error(httpx.post(url, json=body, headers={"Authorization": "Basic test-key-1"}, timeout=60), 401)
    secure = openai.OpenAI(base_url=serving_app.secure_api_url, api_key="test-key-1", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=serving_app.secure_api_url, api_key="nope", max_retries=0).models.list()
    assert [m.id for m in secure.models.list().data] == ["tiny"]  # request 1 of 5 for this key
    for _ in range(serving_app.rate_limit_per_minute - 1):
        assert secure.completions.create(**body).usage.completion_tokens == 1
    limited = httpx.post(url, json=body, headers={"Authorization": "Bearer test-key-1"}, timeout=60)
    assert_error(limited, 429, code="rate_limit_exceeded")
    assert int(limited.headers["retry-after"]) >= 1
    # the limit is per key
    other = httpx.post(url, json=body, headers={"Authorization": "Bearer test-key-2"}, timeout=60)
    assert other.status_code == 200
    # the open app has no keys
    assert httpx.post(f"{serving_app.api_url}/completions", json=body, timeout=60).status_code == 200


def test_single_model_app_is_colocated_and_serves_like_the_split_one(serving_app, client):
    """One model: the API runs in the model's own replicas (one deployment, no separate ingress), answers
    the same greedy text as the two-deployment app, streams it identically, and a client that leaves
    mid-stream frees the row (later requests still complete)."""
    from conftest import _wait_healthy
    from ray import serve

    from serving.app import build_application

    solo = serving_app.config.model_copy(update={"models": serving_app.config.models[:1], "colocate": True})
    serve.run(build_application(solo), name="groundup-solo", route_prefix="/solo", blocking=False)
    try:
        _wait_healthy(f"{serving_app.base_url}/solo/health")
        deployments = serve.status().applications["groundup-solo"].deployments
        assert list(deployments) == ["model-tiny"]
        local = openai.OpenAI(base_url=f"{serving_app.base_url}/solo/v1", api_key="unused", max_retries=0,
                              timeout=120)
        kwargs = dict(model="tiny", prompt="The history of", max_tokens=10, temperature=0,
                      extra_body={"ignore_eos": True})
        expected = client.completions.create(**kwargs).choices[0].text
        assert local.completions.create(**kwargs).choices[0].text == expected
        streamed = "".join(c.choices[0].text for c in local.completions.create(stream=True, **kwargs) if c.choices)
        assert streamed == expected
        with httpx.stream("POST", f"{serving_app.base_url}/solo/v1/completions", timeout=60,
                          json={**{k: v for k, v in kwargs.items() if k != "extra_body"}, "max_tokens": 400,
                                "ignore_eos": True, "stream": True}) as response:
            next(response.iter_lines())  # leave after the first chunk
        assert local.completions.create(**kwargs).choices[0].text == expected
    finally:
        serve.delete("groundup-solo")
