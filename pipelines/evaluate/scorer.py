"""What evaluation asks of a model, in-process or over HTTP: one interface, two implementations.

- ``score(spans)``: for each ``(token_ids, start)`` the sum of log p(token | prefix) over tokens
  ``start:``, whether every one of them was the greedy choice, and how many were scored — the log-likelihood
  of a continuation (lm-eval's ``loglikelihood``) and the pieces of a sliding window (``rolling``).
- ``generate(prompts, ...)``: greedy continuations of token-id prompts, cut at stop strings.
- ``chat(conversations, ...)``: greedy replies to chat messages.

:class:`LocalScorer` runs a model of ours in this process (``model.scoring`` and ``model.generate``, the
project's one scoring and one generation core); :class:`EndpointScorer` asks a served model through
``/v1/completions`` with ``echo`` and ``logprobs`` (the way lm-eval's ``local-completions`` does) and
``/v1/chat/completions``. Both take token ids built with the same tokenizer, so their scores agree.

Whole texts (bits per byte) are scored after the end-of-sequence token: that is how a document starts
in the packed pretraining rows (documents are separated by EOS). Context/continuation pairs follow
lm-eval's tokenization (:func:`encode_pair`), so in-process, endpoint and lm-eval's own scores agree.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from model.tokenizer import EOS_ID, Tokenizer

DOCUMENT_START = EOS_ID


@dataclass(frozen=True)
class SpanScore:
    logprob: float  # nats, summed over the scored tokens
    greedy: bool
    tokens: int


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's convention (as its ``hf`` and ``local-completions`` models do it, so scores match theirs):
    no BOS; trailing spaces of the context move to the continuation; the continuation's tokens are those
    of ``encode(context + continuation)`` past ``encode(context)``; an empty context is the document start."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:  # nothing to condition on: the document start (lm-eval's prefix token)
        return [DOCUMENT_START], tokenizer.encode(continuation)
    whole = tokenizer.encode(context + continuation)
    cut = min(len(tokenizer.encode(context)), len(whole) - 1) if continuation else len(whole)
    return whole[:cut], whole[cut:]


def windows(n: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows over a sequence of ``n`` tokens scoring tokens 1..n-1 exactly once:
    ``(start, end, first_scored)`` with ``end - start <= max_len``; each window after the first scores
    ``stride`` new tokens with up to ``max_len - stride`` tokens of context before them."""
    if n < 2:
        return []
    stride = max(1, min(stride, max_len - 1))
    end = min(n, max_len)
    out = [(0, end, 1)]
    while end < n:
        new_end = min(n, end + stride)
        out.append((max(0, new_end - max_len), new_end, end))
        end = new_end
    return out


def truncate_pair(context: list[int], continuation: list[int], max_len: int) -> tuple[list[int], int]:
    """(sequence, index of the continuation's first token) within ``max_len`` tokens, cut from the left."""
    sequence = (context + continuation)[-max_len:]
    start = max(1, len(sequence) - len(continuation))
    return sequence, start


class Scorer:
    name: str
    tokenizer: Tokenizer
    max_len: int  # longest sequence score() takes

    def score(self, spans: Sequence[tuple[list[int], int]]) -> list[SpanScore]:
        raise NotImplementedError

    def generate(self, prompts: Sequence[list[int]], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        raise NotImplementedError

    def chat(self, conversations: Sequence[list[dict]], max_new_tokens: int) -> list[str]:
        raise NotImplementedError

    # ---- built on score() ------------------------------------------------------------------------
    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[SpanScore]:
        spans = []
        for context, continuation in pairs:
            context_ids, continuation_ids = encode_pair(self.tokenizer, context, continuation)
            spans.append(truncate_pair(context_ids, continuation_ids, self.max_len))
        return self.score(spans)

    def rolling(self, texts: Sequence[str], stride: int | None = None) -> list[SpanScore]:
        """Log-likelihood of whole texts (every token after the document start) with a sliding window."""
        stride = stride or max(1, self.max_len // 2)
        spans, owners = [], []
        for index, text in enumerate(texts):
            ids = [DOCUMENT_START, *self.tokenizer.encode(text)]
            for start, end, first in windows(len(ids), self.max_len, stride):
                spans.append((ids[start:end], first - start))
                owners.append(index)
        totals = [[0.0, True, 0] for _ in texts]
        for owner, scored in zip(owners, self.score(spans)):
            totals[owner][0] += scored.logprob
            totals[owner][1] &= scored.greedy
            totals[owner][2] += scored.tokens
        return [SpanScore(t[0], t[1], t[2]) for t in totals]


class LocalScorer(Scorer):
    """A model of ours (or an imported Hugging Face Llama) in this process."""

    def __init__(self, name: str, model, tokenizer: Tokenizer, batch_size: int = 16):
        self.name, self.model, self.tokenizer, self.batch_size = name, model, tokenizer, batch_size
        self.max_len = model.config.max_seq_len

    @classmethod
    def load(cls, name: str, path: str, device=None, batch_size: int = 16) -> LocalScorer:
        from model.device import pick_device
        from pipelines.export import open_model

        model, tokenizer, _ = open_model(path, pick_device(device))
        return cls(name, model, tokenizer, batch_size)

    def score(self, spans):
        # Spans that share a prefix (a question's choices) run it once: model.scoring.continuation_logprobs.
        from model.scoring import continuation_logprobs

        results = continuation_logprobs(self.model, [(ids[:start], ids[start:]) for ids, start in spans],
                                        batch_size=self.batch_size)
        return [SpanScore(logprob, greedy, len(ids) - start) for (ids, start), (logprob, greedy) in zip(spans, results)]

    def generate(self, prompts, max_new_tokens, stop=()):
        from model.generate import SamplingParams, generate

        room = [max(1, min(max_new_tokens, self.max_len - 1)) for _ in prompts]
        prompts = [list(p)[-(self.max_len - r):] for p, r in zip(prompts, room)]
        params = [SamplingParams(max_new_tokens=r, temperature=0.0, stop=tuple(stop)) for r in room]
        return [c.text for c in generate(self.model, prompts, params, self.tokenizer, max_batch_size=self.batch_size)]

    def chat(self, conversations, max_new_tokens):
        prompts = [self.tokenizer.apply_chat_template(m, add_generation_prompt=True).ids for m in conversations]
        return self.generate(prompts, max_new_tokens)


class EndpointScorer(Scorer):
    """A model served by ``groundup serve`` (or any OpenAI-compatible server with echo + logprobs)."""

    def __init__(self, name: str, url: str, model: str, tokenizer: Tokenizer, max_len: int,
                 batch_size: int = 16, timeout_s: float = 300.0, api_key: str | None = None):
        self.name, self.url, self.model, self.tokenizer = name, url.rstrip("/"), model, tokenizer
        self.max_len = max_len - 1  # the server keeps room for at least one new token
        self.batch_size, self.timeout_s = batch_size, timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _post(self, path: str, body: dict) -> dict:
        import httpx

        response = httpx.post(f"{self.url}{path}", json=body, headers=self.headers, timeout=self.timeout_s)
        if response.status_code != 200:
            raise RuntimeError(f"{self.url}{path}: HTTP {response.status_code}: {response.text[:300]}")
        return response.json()

    def score(self, spans):
        out: list[SpanScore] = []
        for begin in range(0, len(spans), self.batch_size):
            chunk = spans[begin:begin + self.batch_size]
            reply = self._post("/v1/completions", {
                "model": self.model, "prompt": [list(ids) for ids, _ in chunk], "max_tokens": 0, "echo": True,
                "logprobs": 1, "temperature": 0})
            choices = sorted(reply["choices"], key=lambda c: c["index"])
            for (ids, start), choice in zip(chunk, choices):
                logprobs = choice["logprobs"]
                values = logprobs["token_logprobs"][start:len(ids)]
                tops = logprobs["top_logprobs"][start:len(ids)]
                greedy = all(v >= max(top.values()) - 1e-6 for v, top in zip(values, tops) if top)
                out.append(SpanScore(float(sum(values)), greedy, len(ids) - start))
        return out

    def generate(self, prompts, max_new_tokens, stop=()):
        texts = []
        for prompt in prompts:
            room = max(1, min(max_new_tokens, self.max_len))
            body = {"model": self.model, "prompt": list(prompt)[-(self.max_len + 1 - room):], "max_tokens": room,
                    "temperature": 0}
            if stop:
                body["stop"] = list(stop)[:4]
            texts.append(self._post("/v1/completions", body)["choices"][0]["text"])
        return texts

    def chat(self, conversations, max_new_tokens):
        return [self._post("/v1/chat/completions", {"model": self.model, "messages": list(messages),
                                                    "max_tokens": max_new_tokens, "temperature": 0})
                ["choices"][0]["message"]["content"] for messages in conversations]


def endpoint_models(url: str, api_key: str | None = None) -> dict[str, int]:
    """Served model name -> context length, from ``/v1/models``."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(f"{url.rstrip('/')}/v1/models", headers=headers, timeout=30)
    response.raise_for_status()
    return {card["id"]: int(card.get("max_model_len") or 2048) for card in response.json()["data"]}


def nats_to_bits_per_byte(nats: float, num_bytes: int) -> float:
    return nats / math.log(2) / max(num_bytes, 1)
