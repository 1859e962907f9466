"""The per-model Ray Serve deployment: holds the weights and a continuous-batching :class:`Engine`.

The ingress sends it a validated OpenAI request; it tokenizes (plain prompt or chat template), checks
the request against the context and the server's per-request limits, and streams back a header (or
why the request cannot be served) followed by batches of ``(choice_index, ChoiceDelta)``. Tokenization
lives here, next to the tokenizer that matches the weights, so the ingress never needs model files;
for the same reason token ids become token strings (for ``logprobs``) here.

Decoding strategies: sampled or greedy answers stream from the engine; ``best_of > n`` samples best_of
answers per prompt and keeps the n most likely; ``use_beam_search`` and the prompt scoring behind
``echo``/``logprobs`` run as engine jobs (:mod:`serving.engine`). A failure in any of them ends the
request's open choices with ``finish_reason="error"`` — logged here with its cause; the ingress answers
with an OpenAI-shaped 5xx and never shows the cause to the client.

Every message to the ingress costs far more CPU (serialisation, a Ray object report, an event-loop
wake-up in both replicas and then in Serve's proxy) than a decode step of a small model, so a choice's
tokens are coalesced into one delta every ``stream_interval`` tokens (the first token and the last
delta always go at once, keeping time to first token; like vLLM's stream interval).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from model.checkpoint import load_model, load_tokenizer
from model.device import pick_device
from model.generate import GenerationEvent
from model.llama import Transformer
from model.tokenizer import SPECIAL_IDS, Tokenizer
from serving.engine import Engine, JobDone
from serving.schemas import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class ServerSettings:
    """What a model replica needs beyond its checkpoint (from serving.app.Config)."""

    max_batch_size: int = 16
    default_max_tokens: int = 256
    device: str | None = None
    stream_interval: int = 1
    dtype: str = "auto"
    engine_process: bool = False
    max_choices_per_request: int = 64
    max_tokens_per_request: int = 65536

    def __post_init__(self) -> None:
        if self.stream_interval < 1:
            raise ValueError("stream_interval must be at least 1")


@dataclass(frozen=True)
class RequestRejected:
    """A request the model cannot take (sent instead of a header); ``status`` is the HTTP status."""

    message: str
    param: str | None
    code: str
    status: int = 400


@dataclass(frozen=True)
class StreamHeader:
    prompt_tokens: list[int]  # per prompt (a completions request may carry several)
    choices: int


@dataclass(frozen=True)
class TokenLogprob:
    """One token of a choice with its log-probability, as the API reports it."""

    token: str  # its text ("bytes:\\xNN" for a byte of a longer character, the symbol for special tokens)
    bytes: tuple[int, ...]  # its UTF-8 bytes
    logprob: float | None  # None for a prompt's first token (nothing precedes it)
    top: tuple[tuple[str, tuple[int, ...], float], ...] | None  # the most likely tokens there
    text_length: int  # characters it adds to the choice's text (0 for special tokens)


@dataclass
class ChoiceDelta:
    """What one message to the ingress carries for one choice: the new text and tokens since the last."""

    text: str = ""
    finish_reason: str | None = None  # "stop", "length", or "error" (the ingress turns it into an error)
    completion_tokens: int = 0  # tokens of the answer so far
    tokens: int = 0  # tokens this delta covers
    logprobs: list[TokenLogprob] | None = None  # when the request asked for log-probs
    cumulative_logprob: float = 0.0  # of the answer so far (best_of ranks by it)
    error: str | None = None  # why it failed (for the server's log; never sent to the client)

    def then(self, later: ChoiceDelta) -> ChoiceDelta:
        """This delta followed by a later one of the same choice, as one."""
        logprobs = None if self.logprobs is None and later.logprobs is None else \
            (self.logprobs or []) + (later.logprobs or [])
        return replace(later, text=self.text + later.text, tokens=self.tokens + later.tokens, logprobs=logprobs)


class Coalescer:
    """Merges one choice's deltas so that one goes out per ``interval`` tokens.

    Called only from the engine's thread (the sequence's callback), so it needs no lock. ``add`` returns
    the delta to send now, or None while tokens are held back. The first delta is sent at once (time to
    first token), and a delta that finishes the choice flushes everything held.
    """

    def __init__(self, interval: int):
        if interval < 1:
            raise ValueError("stream interval must be at least 1")
        self.interval = interval
        self._held: ChoiceDelta | None = None
        self._sent_first = False

    def add(self, delta: ChoiceDelta) -> ChoiceDelta | None:
        if self._held is not None:
            delta = self._held.then(delta)
        if self._sent_first and delta.finish_reason is None and delta.tokens < self.interval:
            self._held = delta
            return None
        self._held, self._sent_first = None, True
        return delta


class ChoiceStream:
    """One choice's engine events turned into coalesced deltas (with token strings when log-probs are asked
    for). It runs where the engine runs — in the engine's child process when there is one — so that only
    the deltas to send cross to the replica, not every token."""

    def __init__(self, interval: int, token_texts: TokenTexts, top_logprobs: int | None):
        self.coalescer, self.token_texts, self.top_logprobs = Coalescer(interval), token_texts, top_logprobs
        self.total = 0.0

    def add(self, event: GenerationEvent) -> ChoiceDelta | None:
        if event.logprob is not None:
            self.total += event.logprob
        records = None
        if self.top_logprobs is not None and event.token_id is not None:
            records = [self.token_texts.record(event.token_id, event.logprob, event.top_logprobs or ())]
        return self.coalescer.add(ChoiceDelta(event.text, event.finish_reason, event.completion_tokens,
                                              int(event.token_id is not None), records, self.total, event.error))


def submit_choice(engine: Engine, token_texts: TokenTexts, prompt, params, interval: int,
                  top_logprobs: int | None, on_delta: Callable[[ChoiceDelta], None]) -> int:
    """Submit one choice to an in-process :class:`Engine`; ``on_delta`` gets its coalesced deltas."""
    stream = ChoiceStream(interval, token_texts, top_logprobs)

    def on_event(event: GenerationEvent) -> None:
        delta = stream.add(event)
        if delta is not None:
            on_delta(delta)

    return engine.submit(prompt, params, on_event)


class TokenTexts:
    """Token ids -> OpenAI's token strings and bytes (cached: the same few thousand ids recur)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._special = set(SPECIAL_IDS.values())
        self._cache: dict[int, tuple[str, tuple[int, ...], int]] = {}

    def __call__(self, token_id: int) -> tuple[str, tuple[int, ...], int]:
        found = self._cache.get(token_id)
        if found is None:
            piece = self.tokenizer.id_to_piece(token_id)
            if token_id in self._special:
                found = (piece, tuple(piece.encode()), 0)
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # a byte-fallback piece
                value = int(piece[3:5], 16)
                found = (f"bytes:\\x{value:02x}", (value,), int(value & 0xC0 != 0x80))
            else:
                text = piece.replace("\u2581", " ")
                found = (text, tuple(text.encode()), len(text))
            self._cache[token_id] = found
        return found

    def record(self, token_id: int, logprob: float | None,
               top: tuple[tuple[int, float], ...] | list[tuple[int, float]] | None) -> TokenLogprob:
        text, raw, length = self(token_id)
        alternatives = None
        if top is not None:
            # The token's own entry carries exactly its log-prob, so "is it the most likely" compares
            # equal numbers (lm-evaluation-harness checks greediness with ==).
            alternatives = tuple((*self(i)[:2], logprob if i == token_id and logprob is not None else value)
                                 for i, value in top)
        return TokenLogprob(text, raw, logprob, alternatives, length)


SERVING_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def serving_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs that support it; fp32 on CPU, where bf16 matmuls are slow on most processors
    (on CPUs with AVX512-BF16 or AMX, ``bfloat16`` decodes batches faster: half the weight bytes per step)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if name not in SERVING_DTYPES:
        raise ValueError(f"dtype must be auto, {' or '.join(SERVING_DTYPES)}; got {name!r}")
    return SERVING_DTYPES[name]


def load_for_serving(path: str | Path, device: torch.device, dtype: str = "auto") -> tuple[Transformer, Tokenizer]:
    """Our checkpoint format or an exported Hugging Face Llama directory, on ``device`` in ``dtype``."""
    from model.hf import import_hf, is_hf_directory
    from pipelines.rundir import local_copy

    path = local_copy(str(path))  # object-store models: one download per node, shared by its replicas
    torch_dtype = serving_dtype(dtype, device)
    if is_hf_directory(path):
        model, tokenizer = import_hf(path)
        if tokenizer is None:
            raise ValueError(f"{path}: no tokenizer.model beside the weights")
        return model.to(device=device, dtype=torch_dtype).eval(), tokenizer
    return load_model(path, device, torch_dtype), load_tokenizer(path)


def _metrics():
    """Generated tokens (rate() of it is tokens/s) and time to first token, exported beside Serve's own.

    Serve tags them with the deployment ("model-NAME"), replica and application itself.
    """
    from ray.serve import metrics

    tokens = metrics.Counter("groundup_generated_tokens", "tokens generated")
    ttft = metrics.Histogram("groundup_time_to_first_token_seconds", "time from request to first token",
                             boundaries=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10])
    requests = metrics.Counter("groundup_requests", "generation requests admitted")
    return tokens, ttft, requests


class GenerationFailed(RuntimeError):
    """A job or sequence of the request failed; the cause is already in the server's log."""


class ModelServer:
    """Decorated with ``serve.deployment`` by :mod:`serving.app` (replicas/resources come from config)."""

    def __init__(self, name: str, path: str, settings: ServerSettings = ServerSettings()):
        self.name, self.settings = name, settings
        self.device = pick_device(settings.device)
        if settings.engine_process:  # the weights live in the child only; the replica keeps the tokenizer
            from serving.engine_process import EngineProcess

            self.tokenizer = load_tokenizer(path)  # both our checkpoints and HF exports keep tokenizer.model
            self.engine = EngineProcess(str(path), str(self.device), settings.dtype, settings.max_batch_size,
                                        torch.get_num_threads())
        else:
            model, self.tokenizer = load_for_serving(path, self.device, settings.dtype)
            self.engine = Engine(model, self.tokenizer, settings.max_batch_size).start()
        self.token_texts = TokenTexts(self.tokenizer)
        self.generated_tokens, self.time_to_first_token, self.requests = _metrics()

    def info(self) -> dict:
        """What /health and operators read: the model's context, device, and whether its engine runs."""
        return {"name": self.name, "max_context": self.engine.max_context, "device": str(self.device),
                "engine_alive": self.engine.is_alive(), "engine_pid": getattr(self.engine, "pid", os.getpid())}

    def check_health(self) -> None:  # Serve calls this periodically; a dead engine restarts the replica
        if not self.engine.is_alive():
            raise RuntimeError(f"model {self.name}: the engine is not running")

    # ---- requests --------------------------------------------------------------------------------
    def _prompts(self, request: CompletionRequest | ChatCompletionRequest) -> tuple[list[list[int]], list[str]]:
        """Token ids of each prompt, and its text (what ``echo`` shows)."""
        if isinstance(request, ChatCompletionRequest):
            messages = [m.for_template() for m in request.messages]
            return [self.tokenizer.apply_chat_template(messages, add_generation_prompt=True).ids], [""]
        prompt = request.prompt
        if isinstance(prompt, str):
            return [self.tokenizer.encode(prompt, bos=True)], [prompt]
        if isinstance(prompt[0], int):
            prompt = [prompt]
        if isinstance(prompt[0], str):
            return [self.tokenizer.encode(p, bos=True) for p in prompt], list(prompt)
        return [list(p) for p in prompt], [self._decode_checked(p) for p in prompt]

    def _decode_checked(self, ids: list[int]) -> str:
        vocab = self.engine.vocab_size
        return self.tokenizer.decode(ids) if all(0 <= t < vocab for t in ids) else ""

    def _validate(self, request, prompts: list[list[int]]) -> RequestRejected | int:
        """Returns max_new_tokens, or why the request cannot be served."""
        settings, context, vocab = self.settings, self.engine.max_context, self.engine.vocab_size
        param = "messages" if isinstance(request, ChatCompletionRequest) else "prompt"
        samples = request.samples_per_prompt
        choices = len(prompts) * samples
        if choices > settings.max_choices_per_request:
            return RequestRejected(
                f"This request asks for {choices} answers ({len(prompts)} prompt(s) x {samples}); this server "
                f"returns at most max_choices_per_request={settings.max_choices_per_request} per request.",
                "n", "too_many_choices")
        for prompt in prompts:
            if any(t < 0 or t >= vocab for t in prompt):
                return RequestRejected(f"token ids must lie in [0, {vocab})", param, "invalid_value")
            if len(prompt) >= context:
                return RequestRejected(
                    f"This model's maximum context length is {context} tokens; your prompt has {len(prompt)} "
                    "tokens, leaving no room for a completion.", param, "context_length_exceeded")
        longest = max(len(p) for p in prompts)
        room = context - longest
        requested = request.requested_tokens
        tokens_param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        if requested is None:
            max_new = min(settings.default_max_tokens, room)
        elif requested > room:
            return RequestRejected(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{longest + requested} tokens ({longest} in the prompt, {requested} for the completion). "
                f"Reduce the prompt or {tokens_param}.", tokens_param, "context_length_exceeded")
        else:
            max_new = requested
        total = sum(len(p) + max_new for p in prompts) * samples
        if total > settings.max_tokens_per_request:
            return RequestRejected(
                f"This request may use {total} tokens (prompts and answers of {choices} choice(s)); this server "
                f"takes at most max_tokens_per_request={settings.max_tokens_per_request} per request. Ask for "
                f"fewer prompts, choices or tokens.", tokens_param, "too_many_tokens")
        return max_new

    async def generate(self, request: CompletionRequest | ChatCompletionRequest) -> AsyncIterator:
        """Yields a StreamHeader (or RequestRejected, then stops), then lists of (choice, ChoiceDelta)."""
        started = time.perf_counter()
        try:
            prompts, texts = self._prompts(request)
        except ValueError as err:
            yield RequestRejected(str(err), "messages", "invalid_value")
            return
        checked = self._validate(request, prompts)
        if isinstance(checked, RequestRejected):
            yield checked
            return
        if not self.engine.is_alive():
            yield RequestRejected(f"The model '{self.name}' is restarting; try again in a few seconds.", None,
                                  "model_unavailable", 503)
            return
        self.requests.inc()
        yield StreamHeader([len(p) for p in prompts], len(prompts) * request.n)
        counted: dict[int, int] = {}
        try:
            if isinstance(request, CompletionRequest) and request.echo:
                echoed = await self._echo(request, prompts, texts, final=checked == 0)
                yield echoed
                if checked == 0:
                    return
            if isinstance(request, CompletionRequest) and (request.use_beam_search or request.samples_per_prompt
                                                           > request.n):
                batch = await (self._beam_search(request, prompts, checked) if request.use_beam_search
                               else self._best_of(request, prompts, checked))
                self._count(batch, counted)
                yield batch
                return
            first = True
            async for batch in self._stream(request, prompts, checked):
                if first:
                    self.time_to_first_token.observe(time.perf_counter() - started)
                    first = False
                self._count(batch, counted)
                yield batch
        except GenerationFailed:
            yield [(choice, ChoiceDelta(finish_reason="error")) for choice in range(len(prompts) * request.n)]

    def _count(self, batch: list[tuple[int, ChoiceDelta]], counted: dict[int, int]) -> None:
        produced = 0
        for choice, delta in batch:
            produced += delta.completion_tokens - counted.get(choice, 0)
            counted[choice] = max(counted.get(choice, 0), delta.completion_tokens)
        if produced > 0:  # Ray's counters refuse 0 (a first token that is a stop token adds none)
            self.generated_tokens.inc(produced)

    async def _stream(self, request, prompts: list[list[int]], max_new: int) -> AsyncIterator[list]:
        """Sample n answers per prompt; yields what is ready as batches of (choice, delta)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, ChoiceDelta]] = asyncio.Queue()
        # Non-streamed answers are sent whole anyway: hold every token until the end.
        interval = self.settings.stream_interval if request.stream else max_new + 1
        sequence_ids, open_choices = [], set()
        for prompt_index, prompt in enumerate(prompts):
            for sample in range(request.n):
                choice = prompt_index * request.n + sample
                sequence_ids.append(self._submit(choice, prompt, request.sampling_params(max_new, sample), interval,
                                                 request.top_logprobs_wanted, loop, queue))
                open_choices.add(choice)
        try:
            while open_choices:
                batch = [await queue.get()]
                while not queue.empty():  # send what is ready together: fewer, larger messages
                    batch.append(queue.get_nowait())
                for choice, delta in batch:
                    if delta.finish_reason is not None:
                        open_choices.discard(choice)
                yield batch
        finally:
            if open_choices:  # the client went away (or the request failed): free the rows for others
                for sequence_id in sequence_ids:
                    self.engine.cancel(sequence_id)

    async def _collect(self, request, prompts: list[list[int]], max_new: int, samples: int) -> list[list[ChoiceDelta]]:
        """``samples`` whole answers per prompt (not streamed), for best_of."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, ChoiceDelta]] = asyncio.Queue()
        answers: dict[int, ChoiceDelta] = {}  # whole answers, once finished
        partial: dict[int, ChoiceDelta] = {}
        sequence_ids = []
        for prompt_index, prompt in enumerate(prompts):
            for sample in range(samples):
                key = prompt_index * samples + sample
                sequence_ids.append(self._submit(key, prompt, request.sampling_params(max_new, sample), max_new + 1,
                                                 request.top_logprobs_wanted, loop, queue))
        try:
            while len(answers) < len(sequence_ids):
                key, delta = await queue.get()
                delta = partial[key].then(delta) if key in partial else delta
                partial[key] = delta
                if delta.finish_reason is not None:
                    answers[key] = delta
                    if delta.finish_reason == "error":  # logged as it arrived
                        raise GenerationFailed()
        finally:
            if len(answers) < len(sequence_ids):
                for sequence_id in sequence_ids:
                    self.engine.cancel(sequence_id)
        return [[answers[p * samples + s] for s in range(samples)] for p in range(len(prompts))]

    async def _best_of(self, request: CompletionRequest, prompts, max_new: int) -> list[tuple[int, ChoiceDelta]]:
        """best_of sampled answers per prompt; the n with the highest log-probability, most likely first."""
        per_prompt = await self._collect(request, prompts, max_new, request.samples_per_prompt)
        batch = []
        for prompt_index, answers in enumerate(per_prompt):
            ranked = sorted(answers, key=lambda d: -d.cumulative_logprob)[: request.n]
            batch += [(prompt_index * request.n + i, delta) for i, delta in enumerate(ranked)]
        return batch

    async def _beam_search(self, request: CompletionRequest, prompts, max_new: int) -> list[tuple[int, ChoiceDelta]]:
        width = request.samples_per_prompt
        params = request.sampling_params(max_new, 0)
        searches = [self._job("beam_search", (prompt, params, width, request.n, request.length_penalty))
                    for prompt in prompts]
        batch = []
        for prompt_index, completions in enumerate(await asyncio.gather(*searches)):
            for i, completion in enumerate(completions):
                records = None
                if request.top_logprobs_wanted is not None:
                    records = [self.token_texts.record(t, lp, ())
                               for t, lp in zip(completion.sampled_ids, completion.logprobs)]
                batch.append((prompt_index * request.n + i, ChoiceDelta(
                    completion.text, completion.finish_reason, len(completion.token_ids),
                    len(completion.sampled_ids), records, sum(completion.logprobs))))
        return batch

    async def _echo(self, request: CompletionRequest, prompts: list[list[int]], texts: list[str],
                    final: bool) -> list[tuple[int, ChoiceDelta]]:
        """Each prompt's text (and, with logprobs, its tokens scored by model.scoring) before the answer."""
        records: list[list[TokenLogprob] | None] = [None] * len(prompts)
        if request.logprobs is not None:
            scores = await self._job("score", (prompts, request.logprobs))
            # The first token has nothing before it: no log-prob and no alternatives (None, as OpenAI's).
            records = [[self.token_texts.record(t, lp, top) for t, lp, top in
                        zip(s.token_ids, s.logprobs, s.top or [None] + [()] * (len(s.token_ids) - 1))]
                       for s in scores]
        return [(prompt_index * request.n + sample,
                 ChoiceDelta(texts[prompt_index], "length" if final else None, 0, 0,
                             None if records[prompt_index] is None else list(records[prompt_index])))
                for prompt_index in range(len(prompts)) for sample in range(request.n)]

    async def _job(self, kind: str, args: tuple):
        loop = asyncio.get_running_loop()
        done: asyncio.Future[JobDone] = loop.create_future()
        self.engine.submit_job(kind, args, lambda outcome: loop.call_soon_threadsafe(done.set_result, outcome))
        outcome = await done
        if outcome.error is not None:
            logger.error("model %s: %s job failed: %s", self.name, kind, outcome.error)
            raise GenerationFailed(outcome.error)
        return outcome.result

    def _submit(self, key: int, prompt: list[int], params, interval: int, top_logprobs: int | None,
                loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> int:
        """Start one choice; its deltas reach ``queue`` as (key, delta), waking the event loop only to send."""
        def on_delta(delta: ChoiceDelta) -> None:
            if delta.error:
                logger.error("model %s: a sequence failed: %s", self.name, delta.error)
            loop.call_soon_threadsafe(queue.put_nowait, (key, delta))

        if isinstance(self.engine, Engine):
            return submit_choice(self.engine, self.token_texts, prompt, params, interval, top_logprobs, on_delta)
        return self.engine.submit_choice(prompt, params, interval, top_logprobs, on_delta)

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
