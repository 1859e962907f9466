"""A continuous-batching engine: requests and a background thread around the generation core. No Ray.

The core (:class:`model.generate.Decoder`) owns ``max_batch_size`` KV-cache rows, prefill, sampling,
stopping and finish reasons. This module adds what a server needs around it:

- :meth:`Engine.submit` / :meth:`Engine.cancel` from any thread (requests are handed to the decoder
  between steps, so the decoder itself is only ever touched by the engine's thread);
- a callback per sequence with each :class:`~model.generate.GenerationEvent` (a new sequence joins the
  running ones at the next step, and a finished one frees its row at once);
- **jobs** — work other than token-by-token sampling that needs the model: prompt scoring for ``echo`` /
  ``logprobs`` (:func:`model.scoring.sequence_logprobs`) and beam search
  (:class:`model.generate.BeamSearch`), advanced one forward pass per engine step between decoding steps;
- :meth:`Engine.start` runs steps on a daemon thread (PyTorch releases the GIL inside its kernels);
  :meth:`Engine.stream` is an async iterator for asyncio servers.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from model.generate import (
    BeamSearch,
    Decoder,
    GenerationEvent,
    PromptTooLongError,
    SamplingParams,
    SequenceState,
)
from model.scoring import sequence_logprobs
from model.tokenizer import Tokenizer

__all__ = ["Engine", "GenerationEvent", "PromptTooLongError", "JobDone", "EventCallback", "JOB_KINDS"]

EventCallback = Callable[[GenerationEvent], None]


@dataclass(frozen=True)
class JobDone:
    """A job's outcome: its result, or the error that ended it (one line, for the server's log)."""

    result: Any = None
    error: str | None = None


JobCallback = Callable[[JobDone], None]


class Job(Protocol):
    def step(self) -> bool:
        """Do one forward pass of work; True once finished."""

    def results(self) -> Any: ...


class _Scoring:
    """Log-probabilities of given sequences (the API's echo/logprobs): model.scoring in one step."""

    def __init__(self, engine: Engine, sequences: list[list[int]], top_n: int):
        self.model, self.sequences, self.top_n = engine.model, sequences, top_n
        self._results = None

    def step(self) -> bool:
        self._results = sequence_logprobs(self.model, self.sequences, top_n=self.top_n)
        return True

    def results(self):
        return self._results


def _beam_search(engine: Engine, prompt: list[int], params: SamplingParams, width: int, n: int,
                 length_penalty: float = 1.0) -> BeamSearch:
    return BeamSearch(engine.model, prompt, params, width, n, engine.tokenizer, length_penalty)


# A job is named by a kind and picklable arguments, so the engine in a child process builds it there.
JOB_KINDS: dict[str, Callable[..., Job]] = {"score": _Scoring, "beam_search": _beam_search}


class Engine:
    def __init__(self, model, tokenizer: Tokenizer, max_batch_size: int = 16):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.decoder = Decoder(model, max_batch_size, tokenizer)
        self.config = self.decoder.config
        self.max_batch_size = max_batch_size
        self._callbacks: dict[int, EventCallback] = {}
        self._sequences: dict[int, SequenceState] = {}
        self._incoming: list[tuple[int, list[int], SamplingParams]] = []
        self._cancelled: set[int] = set()
        self._new_jobs: list[tuple[int, str, tuple, JobCallback]] = []
        self._jobs: list[tuple[int, Job, JobCallback]] = []
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- requests (any thread) ----------------------------------------------------------------------
    @property
    def max_context(self) -> int:
        return self.config.max_seq_len

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def check_prompt(self, prompt: Sequence[int]) -> None:
        self.decoder.check_prompt(prompt)

    def submit(self, prompt: Sequence[int], params: SamplingParams, on_event: EventCallback) -> int:
        """Queue a sequence (the prompt is checked here); ``on_event`` is called from the engine's thread
        with each event."""
        prompt = self.decoder.check_prompt(prompt)
        with self._work:
            sequence_id = next(self._ids)
            self._callbacks[sequence_id] = on_event
            self._incoming.append((sequence_id, prompt, params))
            self._work.notify()
        return sequence_id

    def submit_job(self, kind: str, args: tuple, on_done: JobCallback) -> int:
        """Queue a job (``JOB_KINDS[kind](engine, *args)``); ``on_done`` gets its :class:`JobDone`."""
        if kind not in JOB_KINDS:
            raise ValueError(f"unknown job kind {kind!r}")
        with self._work:
            job_id = next(self._ids)
            self._new_jobs.append((job_id, kind, tuple(args), on_done))
            self._work.notify()
        return job_id

    def cancel(self, sequence_id: int) -> None:
        """Stop a sequence (its client went away); its row is freed at the next step."""
        with self._work:
            self._cancelled.add(sequence_id)
            self._work.notify()

    def is_alive(self) -> bool:
        """The background thread is running (see :meth:`start`)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_running(self) -> int:
        return len(self.decoder.running)

    @property
    def num_waiting(self) -> int:
        return len(self.decoder.waiting) + len(self._incoming)

    def has_work(self) -> bool:
        return bool(self.decoder.has_work() or self._incoming or self._cancelled or self._jobs or self._new_jobs)

    # ---- the loop (the engine's thread) ---------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """Take new requests and cancellations, run one decoding step, then advance each job by one step."""
        with self._lock:
            incoming, self._incoming = self._incoming, []
            cancelled, self._cancelled = self._cancelled, set()
            new_jobs, self._new_jobs = self._new_jobs, []
        for sequence_id, prompt, params in incoming:
            self._sequences[sequence_id] = self.decoder.add(sequence_id, prompt, params)
        for sequence_id in cancelled:
            sequence = self._sequences.get(sequence_id)
            if sequence is not None and not sequence.finished:
                self._emit(self.decoder.cancel(sequence))
        for job_id, kind, args, on_done in new_jobs:
            try:
                self._jobs.append((job_id, JOB_KINDS[kind](self, *args), on_done))
            except Exception as err:  # bad arguments end this job only
                self._call(on_done, JobDone(error=f"{type(err).__name__}: {err}"))
        for event in self.decoder.step():
            self._emit(event)
        self._advance_jobs()

    def _advance_jobs(self) -> None:
        still = []
        for job_id, job, on_done in self._jobs:
            try:
                if not job.step():
                    still.append((job_id, job, on_done))
                    continue
                outcome = JobDone(result=job.results())
            except Exception as err:  # a failing job ends itself, never the engine
                outcome = JobDone(error=f"{type(err).__name__}: {err}")
            self._call(on_done, outcome)
        self._jobs = still

    def _emit(self, event: GenerationEvent) -> None:
        finished = event.finish_reason is not None
        callback = self._callbacks.pop(event.sequence_id) if finished else self._callbacks.get(event.sequence_id)
        if finished:
            self._sequences.pop(event.sequence_id, None)
        if callback is not None and not self._call(callback, event) and not finished:
            # A broken consumer must not stop the engine for everyone else: drop its sequence.
            sequence = self._sequences.pop(event.sequence_id, None)
            self._callbacks.pop(event.sequence_id, None)
            if sequence is not None:
                self.decoder.cancel(sequence)

    @staticmethod
    def _call(callback: Callable, value) -> bool:
        try:
            callback(value)
            return True
        except Exception:
            return False

    def run_until_idle(self) -> None:
        """Step until every submitted sequence and job has finished (synchronous use and tests)."""
        while self.has_work():
            self.step()

    def start(self) -> Engine:
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
            try:
                self.step()
            except Exception as err:  # end what is open with an error, keep serving the next requests
                self._fail_all(f"{type(err).__name__}: {err}")

    def _fail_all(self, error: str) -> None:
        for sequence in [*self.decoder.waiting, *self.decoder.running]:
            self._emit(self.decoder.cancel(sequence, "error", error))

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
