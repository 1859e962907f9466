"""The continuous-batching :class:`~serving.engine.Engine` in a child process of the model replica.

In a Ray Serve replica the engine thread shares one GIL with Serve's event loop (request routing,
pickling streamed batches): measured on 2 CPUs, a replica reached ~80% of the same engine run alone.
A child process has its own interpreter, so the Python between kernels never waits for the replica.
:class:`EngineProcess` keeps the Engine's interface (``submit``/``cancel``/``submit_job`` with callbacks,
``is_alive``): requests go down a pipe, and after every engine step the child sends that step's events
up in one message, which a reader thread in the replica hands to the callbacks. If the child dies, every
open request and job ends with an error at once, ``is_alive`` turns false (Serve's health check then
replaces the replica), and later requests fail at once instead of writing into a broken pipe.
"""
from __future__ import annotations

import itertools
import multiprocessing
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection

from model.generate import SamplingParams
from serving.engine import EventCallback, GenerationEvent, JobCallback, JobDone
from serving.model_server import ChoiceDelta

STARTUP_TIMEOUT_S = 600.0
ENGINE_EXITED = "the engine process exited"


def _child_main(path: str, device: str, dtype: str, max_batch_size: int, num_threads: int,
                connection: Connection) -> None:
    """The child: load the model, then alternate reading requests and running engine steps."""
    import torch

    from serving.engine import Engine
    from serving.model_server import TokenTexts, load_for_serving, submit_choice

    torch.set_num_threads(num_threads)
    try:
        model, tokenizer = load_for_serving(path, torch.device(device), dtype)
        engine = Engine(model, tokenizer, max_batch_size)
    except Exception as err:  # reported to the parent, which raises it in the replica's constructor
        connection.send(("error", f"{type(err).__name__}: {err}"))
        return
    connection.send(("ready", {"max_context": engine.max_context, "vocab_size": engine.vocab_size}))
    events: list[tuple[int, GenerationEvent | ChoiceDelta]] = []
    jobs: list[tuple[int, JobDone]] = []
    remote_ids: dict[int, int] = {}  # the parent's id -> the engine's id

    token_texts = TokenTexts(tokenizer)

    def handle(message) -> bool:
        kind = message[0]
        if kind == "submit":
            _, request_id, prompt, params = message
            remote_ids[request_id] = engine.submit(prompt, params, lambda e, r=request_id: events.append((r, e)))
        elif kind == "submit_choice":  # coalesced here: only the deltas to send cross the pipe
            _, request_id, prompt, params, interval, top_logprobs = message
            remote_ids[request_id] = submit_choice(engine, token_texts, prompt, params, interval, top_logprobs,
                                                   lambda d, r=request_id: events.append((r, d)))
        elif kind == "job":
            _, request_id, job_kind, args = message
            engine.submit_job(job_kind, args, lambda outcome, r=request_id: jobs.append((r, outcome)))
        elif kind == "cancel" and message[1] in remote_ids:
            engine.cancel(remote_ids[message[1]])
        return kind != "stop"

    while True:
        if not engine.has_work() and not connection.poll(None):  # idle: block until a request comes
            continue
        while connection.poll():
            try:
                message = connection.recv()
            except EOFError:  # the replica is gone
                return
            if not handle(message):
                return
        engine.step()
        if events or jobs:
            for request_id, event in events:
                if event.finish_reason is not None:
                    remote_ids.pop(request_id, None)
            connection.send((events, jobs))
            events, jobs = [], []


class EngineProcess:
    """Drop-in for a started :class:`Engine`, in a child process."""

    def __init__(self, path: str, device: str, dtype: str, max_batch_size: int, num_threads: int):
        self._send_lock = threading.Lock()
        self._dead = threading.Event()
        context = multiprocessing.get_context("spawn")  # no forked copy of Ray's or torch's threads
        self._connection, child_end = context.Pipe()
        self._process = context.Process(target=_child_main, name="groundup-engine", daemon=True,
                                        args=(path, device, dtype, max_batch_size, num_threads, child_end))
        self._process.start()
        child_end.close()
        if not self._connection.poll(STARTUP_TIMEOUT_S):
            self.shutdown()
            raise RuntimeError(f"the engine process did not start within {STARTUP_TIMEOUT_S:.0f} s")
        status, detail = self._connection.recv()
        if status != "ready":
            self.shutdown()
            raise RuntimeError(f"the engine process failed to load {path}: {detail}")
        self.max_context: int = detail["max_context"]
        self.vocab_size: int = detail["vocab_size"]
        self._callbacks: dict[int, EventCallback] = {}
        self._job_callbacks: dict[int, JobCallback] = {}
        self._deltas: set[int] = set()  # requests answered with ChoiceDeltas rather than events
        self._ids = itertools.count()
        self._reader = threading.Thread(target=self._read, name="groundup-engine-reader", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def submit(self, prompt: Sequence[int], params: SamplingParams, on_event: EventCallback) -> int:
        request_id = next(self._ids)
        self._callbacks[request_id] = on_event
        self._send(("submit", request_id, [int(t) for t in prompt], params))
        return request_id

    def submit_choice(self, prompt: Sequence[int], params: SamplingParams, interval: int, top_logprobs: int | None,
                      on_delta: Callable[[ChoiceDelta], None]) -> int:
        """Like :func:`serving.model_server.submit_choice`, coalescing in the child."""
        request_id = next(self._ids)
        self._callbacks[request_id] = on_delta
        self._deltas.add(request_id)
        self._send(("submit_choice", request_id, [int(t) for t in prompt], params, interval, top_logprobs))
        return request_id

    def submit_job(self, kind: str, args: tuple, on_done: JobCallback) -> int:
        request_id = next(self._ids)
        self._job_callbacks[request_id] = on_done
        self._send(("job", request_id, kind, tuple(args)))
        return request_id

    def cancel(self, request_id: int) -> None:
        self._send(("cancel", request_id))

    def is_alive(self) -> bool:
        return not self._dead.is_set() and self._process.is_alive() and self._reader.is_alive()

    def shutdown(self) -> None:
        self._send(("stop",))
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()

    def _send(self, message) -> None:
        """Send to the child; once it is gone, end whatever waits on it instead of raising."""
        try:
            if self._dead.is_set():
                raise OSError(ENGINE_EXITED)
            with self._send_lock:
                self._connection.send(message)
        except (OSError, ValueError):
            self._end_everything()

    def _read(self) -> None:
        """Hand each step's events and job results to their callbacks; if the child dies, end them all."""
        try:
            while True:
                events, jobs = self._connection.recv()
                for request_id, event in events:
                    callback = self._callbacks.get(request_id)
                    if event.finish_reason is not None:
                        self._callbacks.pop(request_id, None)
                        self._deltas.discard(request_id)
                    if callback is not None:
                        _call(callback, event)
                for request_id, outcome in jobs:
                    callback = self._job_callbacks.pop(request_id, None)
                    if callback is not None:
                        _call(callback, outcome)
        except (EOFError, OSError):
            self._end_everything()

    def _end_everything(self) -> None:
        self._dead.set()
        for request_id, callback in list(self._callbacks.items()):
            self._callbacks.pop(request_id, None)
            if request_id in self._deltas:
                _call(callback, ChoiceDelta(finish_reason="error", error=ENGINE_EXITED))
            else:
                _call(callback, GenerationEvent(request_id, None, "", "error", 0, ENGINE_EXITED))
        for request_id, callback in list(self._job_callbacks.items()):
            self._job_callbacks.pop(request_id, None)
            _call(callback, JobDone(error=ENGINE_EXITED))


def _call(callback, value) -> None:
    try:
        callback(value)
    except Exception:  # a broken consumer must not stop the others' events
        pass
