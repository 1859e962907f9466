"""The OpenAI surface people call, and requests that must not take a model down — over HTTP on the session's
`groundup serve` deployment (the shared ``serving_app`` fixture): log-probs and echo exactly as
lm-evaluation-harness's ``local-completions`` asks for them, max_completion_tokens, stream_options, text
parts and the developer role, unsupported fields, decoding strategies (greedy, sampling, beam search,
best_of), per-request limits, the int64 seed, a poisoned request among good ones."""
from __future__ import annotations

import concurrent.futures

import httpx
import openai
import pytest

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def client(openai_client) -> openai.OpenAI:
    return openai_client


@pytest.fixture(scope="module")
def model_and_tokenizer(serving_checkpoint):
    from model.checkpoint import load_model, load_tokenizer

    return load_model(serving_checkpoint), load_tokenizer(serving_checkpoint)


def post(serving_app, path: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{serving_app.api_url}{path}", json=body, timeout=timeout)


def error_of(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# ---- log-probs and echo --------------------------------------------------------------------------------
def test_lm_eval_loglikelihood_request_matches_in_process_logprobs(serving_app, model_and_tokenizer):
    """The exact request lm-evaluation-harness's local-completions sends for log-likelihoods, parsed by its
    own parser: per-token log-probs equal model.scoring's within 1e-4, and greediness agrees."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from model.generate import SamplingParams, generate
    from model.scoring import sequence_logprobs

    model, tokenizer = model_and_tokenizer
    contexts = ["The history of", "Rivers flow into the"]
    continuations = [" the river", " sea and"]
    requests = [tokenizer.encode(c, bos=True) + tokenizer.encode(x) for c, x in zip(contexts, continuations)]
    ctxlens = [len(tokenizer.encode(c, bos=True)) for c in contexts]
    # and a greedy continuation, so that lm-eval's greediness check is True somewhere
    greedy = generate(model, [requests[0]], SamplingParams(max_new_tokens=2, temperature=0, stop_token_ids=()))[0]
    requests.append(requests[0] + greedy.token_ids)
    ctxlens.append(len(requests[0]))
    body = {"model": "tiny", "prompt": requests, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0,
            "seed": 1234}
    response = post(serving_app, "/completions", body)
    assert response.status_code == 200, response.text
    output = response.json()
    for choice, ids in zip(sorted(output["choices"], key=lambda c: c["index"]), requests):
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(ids) + 1  # prompt + 1 generated
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert all(len(top) == 1 for top in logprobs["top_logprobs"][1:])
    parsed = LocalCompletionsAPI.parse_logprobs(output, tokens=requests, ctxlens=ctxlens)
    scored = sequence_logprobs(model, requests)
    for (total, is_greedy), scores, ctxlen in zip(parsed, scored, ctxlens):
        assert total == pytest.approx(scores.total(ctxlen), abs=1e-4)
        assert is_greedy == all(scores.is_greedy[ctxlen:])
    assert parsed[-1][1] is True
    served = output["choices"][0]["logprobs"]["token_logprobs"][1:len(requests[0])]
    assert served == pytest.approx(scored[0].logprobs[1:], abs=1e-4)


def test_completion_logprobs_and_echo_of_a_text_prompt(serving_app, model_and_tokenizer):
    """logprobs: N returns N alternatives per generated token, the raw model's log-probs; echo returns the
    prompt's text and tokens first; max_tokens 0 with echo scores the prompt alone."""
    from model.generate import SamplingParams, generate

    model, tokenizer = model_and_tokenizer
    prompt = "Once upon a time"
    prompt_ids = tokenizer.encode(prompt, bos=True)
    expected = generate(model, [prompt_ids], SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=()),
                        tokenizer)[0]
    choice = post(serving_app, "/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0,
                                                "logprobs": 3, "ignore_eos": True}).json()["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["text"] == expected.text
    assert len(logprobs["tokens"]) == 6 and all(len(t) == 3 for t in logprobs["top_logprobs"])
    assert logprobs["token_logprobs"] == pytest.approx(expected.logprobs, abs=1e-4)
    assert all(max(top.values()) == lp for top, lp in zip(logprobs["top_logprobs"], logprobs["token_logprobs"]))
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])
    echoed = post(serving_app, "/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0,
                                                "logprobs": 0, "echo": True, "ignore_eos": True}).json()["choices"][0]
    assert echoed["text"] == prompt + choice["text"]
    assert echoed["logprobs"]["tokens"][0] == "<s>" and len(echoed["logprobs"]["tokens"]) == len(prompt_ids) + 6
    assert echoed["logprobs"]["token_logprobs"][len(prompt_ids):] == pytest.approx(expected.logprobs, abs=1e-4)
    only_prompt = post(serving_app, "/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 0,
                                                     "echo": True, "logprobs": 1}).json()
    assert only_prompt["choices"][0]["text"] == prompt and only_prompt["usage"]["completion_tokens"] == 0
    assert len(only_prompt["choices"][0]["logprobs"]["tokens"]) == len(prompt_ids)
    assert error_of(post(serving_app, "/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}))["param"] \
        == "max_tokens"


def test_chat_logprobs_with_top_logprobs_streamed_and_not(client, model_and_tokenizer):
    from model.generate import SamplingParams, generate

    model, tokenizer = model_and_tokenizer
    messages = [{"role": "user", "content": "Hello"}]
    kwargs = dict(model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
                  extra_body={"ignore_eos": True})
    reply = client.chat.completions.create(**kwargs)
    content = reply.choices[0].logprobs.content
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True).ids
    expected = generate(model, [prompt], SamplingParams(max_new_tokens=5, temperature=0, stop_token_ids=()))[0]
    assert [t.logprob for t in content] == pytest.approx(expected.logprobs, abs=1e-4)
    assert [t.token for t in content] == [tokenizer.id_to_piece(i).replace("\u2581", " ") for i in expected.token_ids] \
        or any(t.token.startswith("bytes:") for t in content)
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == t.logprob for t in content)  # greedy
    streamed = [t for chunk in client.chat.completions.create(stream=True, **kwargs)
                for c in chunk.choices if c.logprobs for t in c.logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]
    assert error_of(httpx.post(f"{client.base_url}chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}))["param"] == "top_logprobs"


# ---- request fields --------------------------------------------------------------------------------------
def test_max_completion_tokens_bounds_the_reply(client):
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Tell me more"}],
                                           max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"
    both = client.completions.create(model="tiny", prompt="x", max_tokens=9,
                                     extra_body={"max_completion_tokens": 2, "ignore_eos": True})
    assert both.usage.completion_tokens == 2  # the current name wins


def test_stream_options_include_usage_controls_the_usage_chunk(serving_app):
    def chunks(body: dict) -> list[dict]:
        import json

        with httpx.stream("POST", f"{serving_app.api_url}/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            return [json.loads(line[6:]) for line in response.iter_lines()
                    if line.startswith("data: {")]

    base = {"model": "tiny", "prompt": "Hi", "max_tokens": 4, "stream": True, "ignore_eos": True}
    assert not any("usage" in c for c in chunks(base))
    assert not any("usage" in c for c in chunks({**base, "stream_options": {"include_usage": False}}))
    last = chunks({**base, "stream_options": {"include_usage": True}})[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4
    error = error_of(post(serving_app, "/completions", {**base, "stream": False, "stream_options": {"include_usage": True}}))
    assert error["param"] == "stream_options"


def test_text_parts_and_the_developer_role_are_read_like_strings_and_system(client):
    plain = client.chat.completions.create(model="tiny", max_tokens=4, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}])
    parts = client.chat.completions.create(model="tiny", max_tokens=4, temperature=0, messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}])
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens
    assert parts.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logit_bias": {"5": 1}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages.0.name"),
])
def test_unsupported_fields_are_400s_naming_them(serving_app, extra, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], **extra}
    error = error_of(post(serving_app, "/chat/completions", body))
    assert error["param"] == param, error
    assert param.split(".")[0] in error["message"]


# ---- decoding strategies -----------------------------------------------------------------------------------
def test_decoding_strategies(client):
    """Greedy = top_k 1 = min_p 1 at any temperature; beam search returns n of best_of beams, the best at least
    as likely as greedy; best_of sampling keeps the likeliest; streaming either is refused."""
    def text(**kwargs):
        return client.completions.create(model="tiny", prompt="The history of", max_tokens=6,
                                         extra_body={"ignore_eos": True, **kwargs.pop("extra", {})},
                                         **kwargs).choices[0].text

    greedy = text(temperature=0)
    assert text(temperature=1.5, seed=3, extra={"top_k": 1}) == greedy
    assert text(temperature=1.5, seed=3, extra={"min_p": 1.0}) == greedy
    assert text(temperature=5e-324) == greedy  # below the greedy threshold
    sampled = {text(temperature=1.5, seed=s, top_p=0.95) for s in range(4)}
    assert len(sampled) > 1

    def total(choice) -> float:
        return sum(choice.logprobs.token_logprobs)

    base = dict(model="tiny", prompt="The history of", max_tokens=6, logprobs=0)
    greedy_choice = client.completions.create(temperature=0, extra_body={"ignore_eos": True}, **base).choices[0]
    beams = client.completions.create(n=2, extra_body={"use_beam_search": True, "best_of": 3, "ignore_eos": True},
                                      **base).choices
    assert [c.index for c in beams] == [0, 1] and total(beams[0]) >= total(beams[1])
    assert total(beams[0]) >= total(greedy_choice) - 1e-4
    best = client.completions.create(n=1, temperature=1.0, seed=11, extra_body={"best_of": 4, "ignore_eos": True},
                                     **base).choices
    samples = client.completions.create(n=4, temperature=1.0, seed=11, extra_body={"ignore_eos": True}, **base).choices
    assert len(best) == 1 and total(best[0]) == pytest.approx(max(total(c) for c in samples), abs=1e-4)
    with pytest.raises(openai.BadRequestError, match="stream"):
        client.completions.create(stream=True, extra_body={"use_beam_search": True, "best_of": 2}, **base)


# ---- requests that must not take a model down ---------------------------------------------------------------
def test_seed_beyond_int64_is_a_400_and_the_model_keeps_serving(serving_app):
    for seed in (2**64, 2**63, -(2**63) - 1):
        error = error_of(post(serving_app, "/completions", {"model": "tiny", "prompt": "x", "seed": seed}))
        assert error["param"] == "seed"
    edge = post(serving_app, "/completions", {"model": "tiny", "prompt": "x", "seed": 2**63 - 1, "max_tokens": 3,
                                              "n": 2, "ignore_eos": True})
    assert edge.status_code == 200 and edge.json()["usage"]["completion_tokens"] == 6
    assert httpx.get(f"{serving_app.base_url}/health", timeout=30).status_code == 200


def test_a_poisoned_request_among_fifteen_good_ones_leaves_them_intact(serving_app):
    """Accepted extreme values (5e-324, 1e-40) in one request sharing the batch with fifteen seeded ones:
    all sixteen answer, and the fifteen are what they are alone."""
    good = [{"model": "tiny-2", "prompt": f"Number {i} is", "max_tokens": 6, "temperature": 0.9, "top_p": 0.9,
             "seed": 40 + i, "ignore_eos": True} for i in range(15)]
    poison = {"model": "tiny-2", "prompt": "Poison", "max_tokens": 6, "temperature": 5e-324, "top_p": 1e-40,
              "min_p": 5e-324, "repetition_penalty": 1e-40, "ignore_eos": True}
    alone = [post(serving_app, "/completions", body).json()["choices"][0]["text"] for body in good]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda body: post(serving_app, "/completions", body), good[:7] + [poison] + good[7:]))
    assert [r.status_code for r in together] == [200] * 16
    texts = [r.json()["choices"][0]["text"] for r in together]
    assert together[7].json()["choices"][0]["finish_reason"] == "length"
    assert texts[:7] + texts[8:] == alone


def test_choices_and_tokens_per_request_are_bounded_by_config(serving_app):
    config = serving_app.config
    error = error_of(post(serving_app, "/completions", {"model": "tiny", "prompt": ["x"] * 64, "n": 16,
                                                        "max_tokens": 1}))
    assert error["code"] == "too_many_choices" and f"max_choices_per_request={config.max_choices_per_request}" \
        in error["message"]
    error = error_of(post(serving_app, "/completions", {"model": "tiny", "prompt": ["x y"] * 8, "n": 4,
                                                        "max_tokens": 200}))
    assert error["code"] == "too_many_tokens" and f"max_tokens_per_request={config.max_tokens_per_request}" \
        in error["message"]
