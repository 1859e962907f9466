"""Packed token shards: memory-mapped reading and a seeded, resumable batch order.

Each epoch visits every training row once in an order fixed by (seed, epoch). Global step ``s`` uses
rows ``order[s·G : (s+1)·G]`` of its epoch (G = global batch in sequences); each worker takes its own
micro-batches out of that block. The data position is therefore just the step number: a resumed run
sees exactly the batches an uninterrupted one would, on any number of workers.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pipelines.data.pack import entropy_bits_per_byte, target_token_counts
from pipelines.rundir import is_local, join, local_copy
from pipelines.train.metrics import say


@dataclass
class PackedShards:
    """Rows of ``sequence_length + 1`` tokens spread over .npy shards, read lazily (mmap)."""

    paths: list[str]
    rows_per_shard: list[int]
    sequence_length: int
    _arrays: list[np.ndarray] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._starts = np.concatenate([[0], np.cumsum(self.rows_per_shard)]).astype(np.int64)

    def __getstate__(self):  # ship paths to Ray workers, never the mapped arrays
        state = dict(self.__dict__)
        state["_arrays"] = None
        return state

    @property
    def num_rows(self) -> int:
        return int(self._starts[-1])

    def _open(self) -> list[np.ndarray]:
        if self._arrays is None:  # object-store shards are copied to this node once, then memory-mapped
            started = time.perf_counter()
            self._arrays = [np.load(local_copy(p), mmap_mode="r") for p in self.paths]
            remote = [a for a, p in zip(self._arrays, self.paths) if not is_local(p)]
            if remote:  # the first step waits for this: say why
                say(f"[data] {len(remote)} shard(s), {sum(a.nbytes for a in remote) / 1e6:.1f} MB under "
                    f"{self.paths[0].rsplit('/', 1)[0]} ready in this node's cache "
                    f"({time.perf_counter() - started:.1f} s)")
        return self._arrays

    def rows(self, indices: np.ndarray) -> torch.Tensor:
        """Rows as int64 [n, sequence_length + 1] (shards may hold longer rows: they are cropped)."""
        arrays = self._open()
        shard = np.searchsorted(self._starts, indices, side="right") - 1
        out = np.empty((len(indices), self.sequence_length + 1), dtype=np.int64)
        for i, (s, index) in enumerate(zip(shard, indices)):
            out[i] = arrays[s][index - self._starts[s], : self.sequence_length + 1]
        return torch.from_numpy(out)


@dataclass(frozen=True)
class BatchOrder:
    num_rows: int
    global_batch: int  # sequences per optimizer step, all workers together
    seed: int

    def __post_init__(self) -> None:
        if self.num_rows < self.global_batch:
            raise ValueError(f"{self.num_rows} training rows cannot fill one global batch of {self.global_batch} sequences")

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.global_batch

    def position(self, step: int) -> dict[str, int]:
        return {"step": step, "epoch": step // self.steps_per_epoch, "offset": step % self.steps_per_epoch}

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def step_rows(self, step: int) -> np.ndarray:
        epoch, offset = divmod(step, self.steps_per_epoch)
        return self._permutation(epoch)[offset * self.global_batch:(offset + 1) * self.global_batch]

    def micro_batches(self, step: int, rank: int, world: int, micro: int) -> list[np.ndarray]:
        """This worker's micro-batches of ``step``: interleaved so each accumulation round spans all ranks."""
        rows = self.step_rows(step)
        rounds = self.global_batch // (micro * world)
        return [rows[(r * world + rank) * micro:(r * world + rank + 1) * micro] for r in range(rounds)]


def eval_rows(num_rows: int, max_rows: int, rank: int, world: int) -> np.ndarray:
    """The first ``max_rows`` validation rows, dealt round-robin to workers (fixed across evaluations)."""
    return np.arange(min(num_rows, max_rows))[rank::world]


def unigram_bits_per_byte(shards: PackedShards, num_bytes: int, vocab_size: int, skip_ids: tuple[int, ...] = ()) -> float:
    """Entropy of the split's unigram token distribution, in bits per byte of text.

    The loss a model reaches by predicting every token from its frequency alone: a trained language
    model should land well below it. ``skip_ids`` leaves out e.g. padding.
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    for array in shards._open():
        for start in range(0, len(array), 4096):
            counts += target_token_counts(np.asarray(array[start:start + 4096]), vocab_size)
    for token in skip_ids:
        counts[token] = 0
    return entropy_bits_per_byte(counts, num_bytes)


def bits_per_byte(mean_loss_nats: float, tokens: int, num_bytes: int) -> float:
    return mean_loss_nats / math.log(2) * tokens / max(num_bytes, 1)


def shards_from_manifest(data_uri: str, split: dict, sequence_length: int) -> PackedShards:
    """The split's shards under the data stage's directory (a local path or an object-store URI)."""
    return PackedShards([join(data_uri, s["path"]) for s in split["shards"]], [int(s["rows"]) for s in split["shards"]],
                        sequence_length)
