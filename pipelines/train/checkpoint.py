"""Training checkpoints: DeepSpeed state (model, optimizer, scheduler) + data position + RNG states,
plus a safetensors export of the weights that model/ and serving load directly.

Every rank writes into its own local directory and reports it to Ray Train, which merges them into
one checkpoint directory and registers it only once every rank's upload finished: a half-written
checkpoint is never what ``ray.train.get_checkpoint()`` (or a ``--resume`` job) sees.

Layout of one checkpoint::

    ds/<DEEPSPEED_TAG>/...        DeepSpeed's own files (one optimizer shard per rank under ZeRO)
    ds-<name>/<DEEPSPEED_TAG>/... the same for each other trained engine (PPO's critic)
    trainer_state-rank<r>.json    step, data position and RNG states of rank r
    model/                        model.safetensors + config.json + tokenizer.model (rank 0)
"""
from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEEPSPEED_DIR = "ds"
DEEPSPEED_TAG = "state"
EXPORT_DIR = "model"


def _state_file(rank: int) -> str:
    return f"trainer_state-rank{rank}.json"


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


def rng_states() -> dict[str, Any]:
    """Every RNG a training step may draw from, as JSON (no pickles)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    states = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        states["cuda"] = _b64(torch.cuda.get_rng_state())
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(states["torch"]))
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(states["cuda"]))


def save_training_state(engine, directory: Path, rank: int, trainer_state: dict[str, Any],
                        others: dict[str, Any] | None = None) -> None:
    """Collective: every rank must call it (DeepSpeed synchronises inside). ``others``: more trained
    engines by name (PPO's critic), each under ``ds-<name>/``."""
    engine.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
    for name, other in (others or {}).items():
        other.save_checkpoint(str(directory / f"{DEEPSPEED_DIR}-{name}"), tag=DEEPSPEED_TAG)
    state = {**trainer_state, "rng": rng_states()}
    (directory / _state_file(rank)).write_text(json.dumps(state))


def load_training_state(engine, directory: Path, rank: int, others: dict[str, Any] | None = None) -> dict[str, Any]:
    """Collective. Restores the engines and this rank's RNGs; returns the trainer state (step, ...)."""
    for name, target in (("", engine), *(others or {}).items()):
        path, _ = target.load_checkpoint(str(directory / (f"{DEEPSPEED_DIR}-{name}" if name else DEEPSPEED_DIR)),
                                         tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"checkpoint {directory}: DeepSpeed found no {name or 'model'} state to load")
    state_file = directory / _state_file(rank)
    if not state_file.is_file():  # restarted with more workers: fall back to rank 0's position
        state_file = directory / _state_file(0)
    state = json.loads(state_file.read_text())
    set_rng_states(state.pop("rng"))
    return state


def gather_full_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Whole weights on rank 0 (None elsewhere). Collective under ZeRO-3, where weights are sharded."""
    import torch.distributed as dist

    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank != 0 or state is None:
        return None
    return {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}


def read_trainer_state(directory: Path, rank: int = 0) -> dict[str, Any]:
    return json.loads((Path(directory) / _state_file(rank)).read_text())
