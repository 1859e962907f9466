"""Tokenizer training sample, tokenization (a Ray task per block) and packing into fixed-length shards.

Documents become ``ids + [EOS]`` and are concatenated in a deterministic order (a seeded hash of
the id), then cut into rows of ``sequence_length + 1`` tokens (input = row[:-1], target = row[1:]).
Rows are written as ``.npy`` shards, ``uint16`` when the vocabulary fits. The split into train and
validation is by document (a seeded hash of its id), so no document straddles the two.
"""
from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import Field

from model.tokenizer import EOS_ID, Tokenizer
from pipelines.config import StrictModel


class TokenizerConfig(StrictModel):
    path: str | None = Field(None, description="reuse this tokenizer.model (or a directory holding it) instead of training")
    vocab_size: int = Field(4096, ge=300, description="vocabulary size of a trained tokenizer")
    model_type: Literal["bpe", "unigram"] = "bpe"
    character_coverage: float = Field(0.9995, gt=0, le=1)
    sample_bytes: int = Field(50_000_000, gt=0, description="at most this much cleaned text trains the tokenizer")
    threads: int = Field(2, ge=1, description="sentencepiece training threads")


class PackConfig(StrictModel):
    sequence_length: int = Field(256, ge=1, description="model context; rows hold sequence_length + 1 tokens")
    validation_fraction: float = Field(0.05, ge=0, lt=1, description="share of documents in the validation split")
    rows_per_shard: int = Field(8192, ge=1, description="rows in each .npy shard")
    last_row: Literal["pad", "drop"] = Field("pad", description="the last partial row of a split: pad with EOS or drop it")


def unit_hash(doc_id: str, seed: int, purpose: str) -> float:
    """A uniform number in [0, 1) fixed by (purpose, seed, id): same answer on every run and node."""
    digest = hashlib.blake2b(f"{purpose}:{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def order_key(doc_id: str, seed: int) -> int:
    digest = hashlib.blake2b(f"order:{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def assign_validation(ids: list[str], seed: int, fraction: float) -> set[str]:
    """Ids of the validation documents; at least one when there are two or more documents and fraction > 0."""
    if fraction <= 0 or len(ids) < 2:
        return set()
    scored = sorted((unit_hash(i, seed, "split"), i) for i in ids)
    chosen = {i for score, i in scored if score < fraction}
    return chosen or {scored[0][1]}


def target_token_counts(rows: np.ndarray, vocab_size: int) -> np.ndarray:
    """How often each token id is a prediction target in ``rows`` (every token but each row's first)."""
    return np.bincount(np.asarray(rows[:, 1:], dtype=np.int64).ravel(), minlength=vocab_size)[:vocab_size]


def entropy_bits_per_byte(counts: np.ndarray, num_bytes: int) -> float:
    """Entropy of the unigram distribution ``counts``, in bits per byte of the text they encode:
    the loss of a model that predicts every token from its frequency alone."""
    total = int(counts.sum())
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum()) * total / max(num_bytes, 1)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def select_training_sample(rows: list[dict[str, Any]], seed: int, budget_bytes: int) -> list[str]:
    """Texts for the tokenizer: documents in seeded-hash order until the byte budget is spent."""
    ranked = sorted(rows, key=lambda r: (unit_hash(r["id"], seed, "tokenizer"), r["id"]))
    texts, used = [], 0
    for row in ranked:
        size = len(row["text"].encode("utf-8"))
        if used and used + size > budget_bytes:
            break
        texts.append(row["text"])
        used += size
    return texts


_TOKENIZERS: dict[bytes, Tokenizer] = {}


def _cached_tokenizer(model_bytes: bytes) -> Tokenizer:
    """One sentencepiece processor per model per worker process (Ray reuses worker processes)."""
    key = hashlib.blake2b(model_bytes, digest_size=16).digest()
    tokenizer = _TOKENIZERS.get(key)
    if tokenizer is None:
        _TOKENIZERS.clear()
        tokenizer = _TOKENIZERS[key] = Tokenizer.from_bytes(model_bytes)
    return tokenizer


class TokenizeBatch:
    """Tokenize a batch of documents: token bytes (ids + EOS), order key, split and sizes."""

    def __init__(self, model_bytes: bytes, seed: int, validation_ids: set[str]):
        self.tokenizer = _cached_tokenizer(model_bytes)
        self.seed = seed
        self.validation_ids = validation_ids

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import time

        started = time.perf_counter()
        texts = [str(t) for t in batch["text"]]
        encoded = self.tokenizer.encode_batch(texts)
        ids = [str(i) for i in batch["id"]]
        tokens = [np.asarray(e + [EOS_ID], dtype=np.uint32).tobytes() for e in encoded]
        n = len(ids)
        return {
            "id": np.array(ids, dtype=object),
            "order": np.array([order_key(i, self.seed) for i in ids], dtype=np.int64),
            "split": np.array(["validation" if i in self.validation_ids else "train" for i in ids], dtype=object),
            "tokens": np.array(tokens, dtype=object),
            "n_tokens": np.array([len(e) + 1 for e in encoded], dtype=np.int64),
            "n_bytes": np.array([len(t.encode("utf-8")) for t in texts], dtype=np.int64),
            "t_tokenize": np.full(n, (time.perf_counter() - started) / max(n, 1)),
        }


def tokenize_batch(batch: dict[str, np.ndarray], model_bytes: bytes, seed: int,
                   validation_ids: set[str]) -> dict[str, Any]:
    """:class:`TokenizeBatch` with the processor cached across the tasks of a worker process."""
    return TokenizeBatch(model_bytes, seed, validation_ids)(batch)


@dataclass
class ShardWriter:
    """Packs a stream of token arrays into rows and writes ``.npy`` shards through ``write``."""

    split: str
    sequence_length: int
    rows_per_shard: int
    dtype: np.dtype
    write: Callable[[str, bytes], Any]  # (relative path, bytes)
    last_row: str = "pad"
    shards: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0
    bytes: int = 0
    documents: int = 0
    padding_tokens: int = 0
    dropped_tokens: int = 0
    _pending: list[np.ndarray] = field(default_factory=list)
    _pending_len: int = 0
    _rows: list[np.ndarray] = field(default_factory=list)
    _target_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def row_len(self) -> int:
        return self.sequence_length + 1

    def add(self, tokens: np.ndarray, n_bytes: int) -> None:
        self.documents += 1
        self.tokens += len(tokens)
        self.bytes += n_bytes
        self._pending.append(tokens.astype(self.dtype, copy=False))
        self._pending_len += len(tokens)
        if self._pending_len >= self.row_len * 64:
            self._cut_rows()

    def _cut_rows(self) -> None:
        stream = np.concatenate(self._pending) if self._pending else np.zeros(0, self.dtype)
        full = len(stream) // self.row_len
        if full:
            self._rows.append(stream[: full * self.row_len].reshape(full, self.row_len))
        rest = stream[full * self.row_len:]
        self._pending, self._pending_len = ([rest] if len(rest) else []), len(rest)
        while sum(len(r) for r in self._rows) >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, count: int) -> None:
        rows = np.concatenate(self._rows) if self._rows else np.zeros((0, self.row_len), self.dtype)
        shard, rest = rows[:count], rows[count:]
        self._rows = [rest] if len(rest) else []
        if len(shard) == 0:
            return
        path = f"shards/{self.split}/shard-{len(self.shards):05d}.npy"
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(shard), allow_pickle=False)
        self.write(path, buffer.getvalue())
        self.shards.append({"path": path, "rows": int(len(shard))})
        seen = len(self._target_counts)
        counts = target_token_counts(shard, max(seen, int(shard.max()) + 1))
        counts[:seen] += self._target_counts
        self._target_counts = counts

    def finish(self) -> dict[str, Any]:
        self._cut_rows()
        if self._pending_len:
            rest = np.concatenate(self._pending)
            if self.last_row == "pad":
                pad = self.row_len - len(rest)
                self.padding_tokens = pad
                self._rows.append(np.concatenate([rest, np.full(pad, EOS_ID, self.dtype)]).reshape(1, -1))
            else:
                self.dropped_tokens = len(rest)
            self._pending, self._pending_len = [], 0
        while self._rows and sum(len(r) for r in self._rows):
            self._flush(self.rows_per_shard)
        return self.summary()

    def summary(self) -> dict[str, Any]:
        return {"shards": self.shards, "rows": sum(s["rows"] for s in self.shards), "tokens": self.tokens,
                "bytes": self.bytes, "documents": self.documents, "padding_tokens": self.padding_tokens,
                "dropped_tokens": self.dropped_tokens,
                # The baseline a trained model must beat, counted here so training never re-reads the shards.
                "unigram_bits_per_byte": entropy_bits_per_byte(self._target_counts, self.bytes)}
