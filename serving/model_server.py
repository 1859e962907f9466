"""The per-model Ray Serve deployment: holds the weights and a continuous-batching :class:`Engine`.

The ingress sends it a validated OpenAI request; it tokenizes (plain prompt or chat template), checks
the prompt against the context, and streams back a header (or an error) followed by batches of
``(choice_index, GenerationEvent)``. Tokenization lives here, next to the tokenizer that matches the
weights, so the ingress never needs model files.

Every message to the ingress costs far more CPU (serialisation, a Ray object report, an event-loop
wake-up in both replicas and then in Serve's proxy) than a decode step of a small model, so a choice's
tokens are coalesced into one event every ``stream_interval`` tokens (the first token and the last
event always go at once, keeping time to first token; like vLLM's stream interval).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import AsyncIterator, Callable

import torch

from model.checkpoint import load_model, load_tokenizer
from model.device import pick_device
from model.llama import Transformer
from model.tokenizer import Tokenizer
from serving.engine import Engine, GenerationEvent
from serving.schemas import ChatCompletionRequest, CompletionRequest


@dataclass(frozen=True)
class RequestRejected:
    """A request the model cannot take (sent instead of a header); becomes an HTTP 400."""

    message: str
    param: str | None
    code: str


class Coalescer:
    """Merges one choice's events so that one goes out per ``interval`` tokens.

    Called only from the engine's thread (the sequence's callback), so it needs no lock. ``add`` returns
    the event to send now, or None while tokens are held back. The first event is sent at once (time to
    first token), and an event that finishes the choice flushes everything held.
    """

    def __init__(self, interval: int):
        if interval < 1:
            raise ValueError("stream interval must be at least 1")
        self.interval = interval
        self._held: GenerationEvent | None = None
        self._held_tokens = 0
        self._sent_first = False

    def add(self, event: GenerationEvent) -> GenerationEvent | None:
        self._held_tokens += event.token_id is not None
        held = self._held
        if held is not None:  # later fields win; the texts join
            event = replace(event, text=held.text + event.text,
                            token_id=event.token_id if event.token_id is not None else held.token_id)
        if self._sent_first and event.finish_reason is None and self._held_tokens < self.interval:
            self._held = event
            return None
        self._held, self._held_tokens, self._sent_first = None, 0, True
        return event


@dataclass(frozen=True)
class StreamHeader:
    prompt_tokens: list[int]  # per prompt (a completions request may carry several)
    choices: int


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


class ModelServer:
    """Decorated with ``serve.deployment`` by :mod:`serving.app` (replicas/resources come from config)."""

    def __init__(self, name: str, path: str, max_batch_size: int = 16, default_max_tokens: int = 256,
                 device: str | None = None, stream_interval: int = 1, dtype: str = "auto",
                 engine_process: bool = False):
        if stream_interval < 1:
            raise ValueError("stream_interval must be at least 1")
        self.name = name
        self.stream_interval = stream_interval
        self.device = pick_device(device)
        if engine_process:  # the weights live in the child only; the replica keeps the tokenizer
            from serving.engine_process import EngineProcess

            self.tokenizer = load_tokenizer(path)  # both our checkpoints and HF exports keep tokenizer.model
            self.engine = EngineProcess(str(path), str(self.device), dtype, max_batch_size, torch.get_num_threads())
        else:
            model, self.tokenizer = load_for_serving(path, self.device, dtype)
            self.engine = Engine(model, self.tokenizer, max_batch_size).start()
        self.default_max_tokens = default_max_tokens
        self.generated_tokens, self.time_to_first_token, self.requests = _metrics()

    def info(self) -> dict:
        return {"name": self.name, "max_context": self.engine.max_context, "device": str(self.device)}

    def check_health(self) -> None:  # Serve calls this periodically; a dead engine restarts the replica
        if not self.engine.is_alive():
            raise RuntimeError("the engine is not running")

    def _prompts(self, request: CompletionRequest | ChatCompletionRequest) -> list[list[int]]:
        if isinstance(request, ChatCompletionRequest):
            messages = [m.model_dump() for m in request.messages]
            return [self.tokenizer.apply_chat_template(messages, add_generation_prompt=True).ids]
        prompt = request.prompt
        if isinstance(prompt, str):
            return [self.tokenizer.encode(prompt, bos=True)]
        if isinstance(prompt[0], int):
            return [list(prompt)]
        if isinstance(prompt[0], str):
            return [self.tokenizer.encode(p, bos=True) for p in prompt]
        return [list(p) for p in prompt]

    def _validate(self, request, prompts: list[list[int]]) -> RequestRejected | int:
        """Returns max_new_tokens, or why the request cannot be served."""
        context = self.engine.max_context
        vocab = self.engine.vocab_size
        param = "messages" if isinstance(request, ChatCompletionRequest) else "prompt"
        for prompt in prompts:
            if any(t < 0 or t >= vocab for t in prompt):
                return RequestRejected(f"token ids must lie in [0, {vocab})", param, "invalid_value")
            if len(prompt) >= context:
                return RequestRejected(
                    f"This model's maximum context length is {context} tokens; your prompt has {len(prompt)} "
                    "tokens, leaving no room for a completion.", param, "context_length_exceeded")
        room = context - max(len(p) for p in prompts)
        if request.max_tokens is None:
            return min(self.default_max_tokens, room)
        if request.max_tokens > room:
            return RequestRejected(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{max(len(p) for p in prompts) + request.max_tokens} tokens ({max(len(p) for p in prompts)} in "
                f"the prompt, {request.max_tokens} for the completion). Reduce the prompt or max_tokens.",
                "max_tokens", "context_length_exceeded")
        return request.max_tokens

    async def generate(self, request: CompletionRequest | ChatCompletionRequest) -> AsyncIterator:
        """Yields a StreamHeader (or RequestRejected, then stops), then lists of (choice, event)."""
        started = time.perf_counter()
        try:
            prompts = self._prompts(request)
        except ValueError as err:
            yield RequestRejected(str(err), "messages", "invalid_value")
            return
        checked = self._validate(request, prompts)
        if isinstance(checked, RequestRejected):
            yield checked
            return
        self.requests.inc()
        yield StreamHeader([len(p) for p in prompts], len(prompts) * request.n)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, GenerationEvent]] = asyncio.Queue()
        sequence_ids, open_choices = [], set()
        for prompt_index, prompt in enumerate(prompts):
            for sample in range(request.n):
                choice = prompt_index * request.n + sample
                params = request.sampling_params(checked, sample)
                # Non-streamed answers are sent whole anyway: hold every token until the end.
                interval = self.stream_interval if request.stream else checked + 1
                sequence_ids.append(self.engine.submit(prompt, params, self._forward(choice, interval, loop, queue)))
                open_choices.add(choice)
        first = True
        counted: dict[int, int] = {}
        try:
            while open_choices:
                batch = [await queue.get()]
                while not queue.empty():  # send what is ready together: fewer, larger messages
                    batch.append(queue.get_nowait())
                if first:
                    self.time_to_first_token.observe(time.perf_counter() - started)
                    first = False
                produced = 0
                for choice, event in batch:
                    produced += event.completion_tokens - counted.get(choice, 0)
                    counted[choice] = event.completion_tokens
                    if event.finish_reason is not None:
                        open_choices.discard(choice)
                if produced:  # Ray's counters refuse 0 (a first token that is a stop token adds none)
                    self.generated_tokens.inc(produced)
                yield batch
        finally:
            if open_choices:  # the client went away: free the rows for others
                for sequence_id in sequence_ids:
                    self.engine.cancel(sequence_id)

    @staticmethod
    def _forward(choice: int, interval: int, loop: asyncio.AbstractEventLoop,
                 queue: asyncio.Queue) -> Callable[[GenerationEvent], None]:
        """The engine-thread callback of one choice: coalesce, and wake the event loop only to send."""
        coalescer = Coalescer(interval)

        def on_event(event: GenerationEvent) -> None:
            ready = coalescer.add(event)
            if ready is not None:
                loop.call_soon_threadsafe(queue.put_nowait, (choice, ready))

        return on_event

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
