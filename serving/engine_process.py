"""The continuous-batching :class:`~serving.engine.Engine` in a child process of the model replica.

In a Ray Serve replica the engine thread shares one GIL with Serve's event loop (request routing,
pickling streamed batches): measured on 2 CPUs, a replica reached ~80% of the same engine run alone.
A child process has its own interpreter, so the Python between kernels never waits for the replica.
:class:`EngineProcess` keeps the Engine's ``submit``/``cancel``/callback interface: requests go down a
pipe, and after every engine step the child sends that step's events up in one message, which a reader
thread in the replica hands to the sequences' callbacks.
"""
from __future__ import annotations

import itertools
import multiprocessing
import threading
from multiprocessing.connection import Connection
from typing import Sequence

from model.generate import SamplingParams
from serving.engine import EventCallback, GenerationEvent

STARTUP_TIMEOUT_S = 600.0


def _child_main(path: str, device: str, dtype: str, max_batch_size: int, num_threads: int,
                connection: Connection) -> None:
    """The child: load the model, then alternate reading requests and running engine steps."""
    import torch

    from serving.engine import Engine
    from serving.model_server import load_for_serving

    torch.set_num_threads(num_threads)
    try:
        model, tokenizer = load_for_serving(path, torch.device(device), dtype)
        engine = Engine(model, tokenizer, max_batch_size)
    except Exception as err:  # reported to the parent, which raises it in the replica's constructor
        connection.send(("error", f"{type(err).__name__}: {err}"))
        return
    connection.send(("ready", {"max_context": engine.max_context, "vocab_size": engine.config.vocab_size}))
    pending: list[tuple[int, GenerationEvent]] = []
    remote_ids: dict[int, int] = {}  # the parent's id -> the engine's id

    def handle(message) -> bool:
        kind = message[0]
        if kind == "submit":
            _, request_id, prompt, params = message
            remote_ids[request_id] = engine.submit(prompt, params, lambda e, r=request_id: pending.append((r, e)))
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
        if pending:
            for request_id, event in pending:
                if event.finish_reason is not None:
                    remote_ids.pop(request_id, None)
            connection.send(pending)
            pending = []


class EngineProcess:
    """Drop-in for a started :class:`Engine` (``submit``, ``cancel``, ``max_context``), in a child process."""

    def __init__(self, path: str, device: str, dtype: str, max_batch_size: int, num_threads: int):
        self._send_lock = threading.Lock()
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
        self._ids = itertools.count()
        self._reader = threading.Thread(target=self._read, name="groundup-engine-reader", daemon=True)
        self._reader.start()

    def submit(self, prompt: Sequence[int], params: SamplingParams, on_event: EventCallback) -> int:
        request_id = next(self._ids)
        self._callbacks[request_id] = on_event
        self._send(("submit", request_id, [int(t) for t in prompt], params))
        return request_id

    def cancel(self, request_id: int) -> None:
        self._send(("cancel", request_id))

    def is_alive(self) -> bool:
        return self._process.is_alive() and self._reader.is_alive()

    def shutdown(self) -> None:
        try:
            self._send(("stop",))
        except (OSError, ValueError):
            pass
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()

    def _send(self, message) -> None:
        with self._send_lock:
            self._connection.send(message)

    def _read(self) -> None:
        """Hand each step's events to their callbacks; if the child dies, end every open request."""
        try:
            while True:
                for request_id, event in self._connection.recv():
                    callback = self._callbacks.get(request_id)
                    if event.finish_reason is not None:
                        self._callbacks.pop(request_id, None)
                    if callback is not None:
                        try:
                            callback(event)
                        except Exception:  # a broken consumer must not stop the others' events
                            pass
        except (EOFError, OSError):
            for request_id, callback in list(self._callbacks.items()):
                callback(GenerationEvent(request_id, None, "", "error", 0, "the engine process exited"))
            self._callbacks.clear()
