"""A continuous-batching generation engine over model/'s KV cache rows. No Ray here.

The KV cache holds ``max_batch_size`` rows (slots). Every :meth:`Engine.step`:

1. admits waiting sequences into free rows and prefills them (one padded forward pass),
   sampling each new sequence's first token;
2. decodes one token for every running sequence (one forward pass over their rows, each at its own
   position) — so new requests join while others are mid-answer, and a finished sequence frees its
   row at once for the next waiting one.

Each sequence keeps its own :class:`SamplingParams` and seeded generator, so its output does not depend
on what else shares the batch. Results are pushed to a per-sequence callback; :meth:`Engine.stream`
turns that into an async iterator for asyncio servers. :meth:`Engine.start` runs steps on a background
thread (PyTorch releases the GIL inside its kernels, so the event loop stays responsive).
"""
from __future__ import annotations

import asyncio
import itertools
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Sequence

import torch

from model.generate import IncrementalDetokenizer, SamplingParams, sample_next_token, seeded_generator
from model.llama import KVCache, Transformer
from model.tokenizer import Tokenizer


class PromptTooLongError(ValueError):
    """The prompt leaves no room in the model's context for even one generated token."""


@dataclass(frozen=True)
class GenerationEvent:
    """One step of one sequence. ``text`` is the new text; ``finish_reason`` is set on the last event."""

    sequence_id: int
    token_id: int | None  # None on an event that only finishes the sequence (cancel, error)
    text: str
    finish_reason: str | None  # "stop", "length", "cancelled" or "error"
    completion_tokens: int  # tokens of the answer so far (a stop token is not counted)
    error: str | None = None


EventCallback = Callable[[GenerationEvent], None]


@dataclass
class _Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    on_event: EventCallback
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    row: int | None = None
    finished: bool = False

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.generated)


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch_size: int = 16):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.max_batch_size = max_batch_size
        self.cache = KVCache.allocate(self.config, max_batch_size, self.config.max_seq_len, self.device,
                                      self.dtype)
        self._free_rows = list(range(max_batch_size))
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._cancelled: set[int] = set()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- requests ---------------------------------------------------------------------------
    @property
    def max_context(self) -> int:
        return self.config.max_seq_len

    def check_prompt(self, prompt: Sequence[int]) -> None:
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.max_context:
            raise PromptTooLongError(f"the prompt has {len(prompt)} tokens; this model's context holds "
                                     f"{self.max_context}, so at most {self.max_context - 1} fit")

    def submit(self, prompt: Sequence[int], params: SamplingParams, on_event: EventCallback) -> int:
        """Queue a sequence; ``on_event`` is called (from the engine's thread) with each event."""
        self.check_prompt(prompt)
        sequence = _Sequence(next(self._ids), [int(t) for t in prompt], params, on_event,
                             IncrementalDetokenizer(self.tokenizer, params.stop), seeded_generator(params.seed))
        with self._work:
            self._waiting.append(sequence)
            self._work.notify()
        return sequence.id

    def cancel(self, sequence_id: int) -> None:
        """Stop a sequence (its client went away); its row is freed at the next step."""
        with self._work:
            self._cancelled.add(sequence_id)
            self._work.notify()

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def is_alive(self) -> bool:
        """The background thread is running (see :meth:`start`)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._running or self._waiting or self._cancelled)

    # ---- the loop -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """Admit and prefill waiting sequences, then decode one token for every running one."""
        admitted = self._admit()
        if admitted:
            try:
                self._prefill(admitted)
            except Exception as err:  # a failed forward pass must end its requests, never hang them
                self._fail(admitted, err)
        just_prefilled = {s.id for s in admitted}
        decoding = [s for s in self._running if not s.finished and s.id not in just_prefilled]
        if decoding:
            try:
                self._decode(decoding)
            except Exception as err:
                self._fail(decoding, err)
        self._release_finished()

    def run_until_idle(self) -> None:
        """Step until every submitted sequence has finished (synchronous use and tests)."""
        while self.has_work():
            self.step()

    def start(self) -> "Engine":
        """Run steps on a daemon thread, sleeping while there is nothing to do."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="groundup-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        with self._work:
            self._stopping = True
            self._work.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._work:
                while not self._stopping and not self.has_work():
                    self._work.wait()
                if self._stopping:
                    return
            self.step()

    # ---- steps ----------------------------------------------------------------------------------
    def _admit(self) -> list[_Sequence]:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            for sequence in self._running:
                if sequence.id in cancelled and not sequence.finished:
                    self._finish(sequence, "cancelled")
            kept = deque()
            for sequence in self._waiting:
                if sequence.id in cancelled:
                    self._emit(sequence, GenerationEvent(sequence.id, None, "", "cancelled", 0))
                else:
                    kept.append(sequence)
            self._waiting = kept
            self._release_finished()
            admitted = []
            while self._waiting and self._free_rows:
                sequence = self._waiting.popleft()
                sequence.row = self._free_rows.pop(0)
                admitted.append(sequence)
            self._running.extend(admitted)
            return admitted

    def _prefill(self, sequences: list[_Sequence]) -> None:
        width = max(len(s.prompt) for s in sequences)
        tokens = torch.zeros(len(sequences), width, dtype=torch.long)
        for index, sequence in enumerate(sequences):
            tokens[index, : len(sequence.prompt)] = torch.tensor(sequence.prompt)
        # Padding positions write junk keys past each prompt's end; the mask hides them and decoding
        # overwrites them position by position, so they are never attended to.
        positions = torch.arange(width).expand(len(sequences), width)
        rows = torch.tensor([s.row for s in sequences])
        logits = self.model(tokens.to(self.device), positions=positions.to(self.device), cache=self.cache,
                            rows=rows.to(self.device))
        lengths = torch.tensor([len(s.prompt) for s in sequences], device=self.device)
        last = logits[torch.arange(len(sequences), device=self.device), lengths - 1].float().cpu()
        for index, sequence in enumerate(sequences):
            self._accept(sequence, last[index])

    def _decode(self, sequences: list[_Sequence]) -> None:
        rows = torch.tensor([s.row for s in sequences], device=self.device)
        tokens = torch.tensor([[s.generated[-1]] for s in sequences], device=self.device)
        positions = torch.tensor([[s.length - 1] for s in sequences], device=self.device)
        logits = self.model(tokens, positions=positions, cache=self.cache, rows=rows)[:, -1].float().cpu()
        for index, sequence in enumerate(sequences):
            self._accept(sequence, logits[index])

    def _accept(self, sequence: _Sequence, logits: torch.Tensor) -> None:
        """Sample the next token of ``sequence`` and report it."""
        params = sequence.params
        token = sample_next_token(logits, params, sequence.prompt + sequence.generated, sequence.generator)
        finish_reason = None
        if token in params.stop_token_ids:
            finish_reason = "stop"  # the stop token ends the answer; it is not part of it
            text, hit_stop = sequence.detokenizer.update(sequence.generated)
        else:
            sequence.generated.append(token)
            text, hit_stop = sequence.detokenizer.update(sequence.generated)
            if hit_stop:
                finish_reason = "stop"
            elif len(sequence.generated) >= params.max_new_tokens or sequence.length >= self.max_context:
                finish_reason = "length"
        if finish_reason is not None:
            text += sequence.detokenizer.flush()
            sequence.finished = True
        self._emit(sequence, GenerationEvent(sequence.id, token, text, finish_reason, len(sequence.generated)))

    def _finish(self, sequence: _Sequence, reason: str, error: str | None = None) -> None:
        sequence.finished = True
        self._emit(sequence, GenerationEvent(sequence.id, None, sequence.detokenizer.flush(), reason,
                                             len(sequence.generated), error))

    def _fail(self, sequences: list[_Sequence], err: Exception) -> None:
        for sequence in sequences:
            if not sequence.finished:
                self._finish(sequence, "error", f"{type(err).__name__}: {err}")

    def _release_finished(self) -> None:
        still = []
        for sequence in self._running:
            if sequence.finished:
                self._free_rows.append(sequence.row)
            else:
                still.append(sequence)
        self._running = still

    @staticmethod
    def _emit(sequence: _Sequence, event: GenerationEvent) -> None:
        try:
            sequence.on_event(event)
        except Exception:  # a broken consumer must not stop the engine for everyone else
            sequence.finished = True

    # ---- asyncio ----------------------------------------------------------------------------------
    async def stream(self, prompt: Sequence[int], params: SamplingParams) -> AsyncIterator[GenerationEvent]:
        """Events of one sequence as an async iterator; leaving the loop early cancels the sequence.

        Needs :meth:`start` (the background thread) to make progress.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        sequence_id = self.submit(prompt, params, lambda e: loop.call_soon_threadsafe(queue.put_nowait, e))
        finished = False
        try:
            while not finished:
                event = await queue.get()
                finished = event.finish_reason is not None
                yield event
        finally:
            if not finished:
                self.cancel(sequence_id)

