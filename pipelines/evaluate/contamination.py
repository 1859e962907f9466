"""Decontamination: n-gram overlap between a task's examples and the run's training shards.

As the GPT-3 paper did: text is lower-cased and split into words (runs of letters and digits); an
example is contaminated when any of its 13-grams (``ngram``) also occurs in the training data. Examples
shorter than ``ngram`` words are never flagged (reported in ``max_overlap`` as 0). The training shards are decoded with the
run's tokenizer (rows are consecutive pieces of the token stream, so the stream comes back whole) and
their n-grams kept as 64-bit hashes: memory grows with the training text (about 8 bytes per word),
which suits runs up to a few GB of text on one node.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


_WORD_IDS: dict[str, int] = {}  # word -> a number, stable within this process (all hashing happens in one)


def _word_numbers(tokens: Sequence[str]) -> np.ndarray:
    ids = _WORD_IDS
    numbers = np.fromiter((ids.setdefault(w, len(ids) + 1) for w in tokens), dtype=np.uint64, count=len(tokens))
    with np.errstate(over="ignore"):  # spread the small ids over 64 bits (Fibonacci hashing)
        return numbers * np.uint64(0x9E3779B97F4A7C15)


def ngram_hashes(tokens: Sequence[str], n: int) -> np.ndarray:
    """A 64-bit hash of every run of ``n`` consecutive words (polynomial rolling over word numbers)."""
    if len(tokens) < n:
        return np.zeros(0, dtype=np.uint64)
    base = _word_numbers(tokens)
    out = np.zeros(len(tokens) - n + 1, dtype=np.uint64)
    multiplier = np.uint64(1099511628211)
    with np.errstate(over="ignore"):
        for offset in range(n):
            out = out * multiplier + base[offset:offset + len(out)]
    return out


class TrainingNgrams:
    """The set of word n-grams of the training text (sorted hashes)."""

    def __init__(self, texts: Iterable[str], n: int = 13):
        self.n = n
        parts = [np.unique(ngram_hashes(words(text), n)) for text in texts]
        self.hashes = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)

    @classmethod
    def from_shards(cls, shards, tokenizer, n: int = 13, chunk_rows: int = 4096) -> TrainingNgrams:
        from model.tokenizer import EOS_ID

        def texts():
            carry: list[int] = []
            for array in shards._open():
                for start in range(0, len(array), chunk_rows):
                    stream = carry + np.asarray(array[start:start + chunk_rows]).reshape(-1).tolist()
                    cut = len(stream) - 1 - stream[::-1].index(EOS_ID) if EOS_ID in stream else 0
                    complete, carry = stream[:cut], stream[cut:]
                    pieces, current = [], []
                    for token in complete:
                        if token == EOS_ID:
                            if current:
                                pieces.append(current)
                            current = []
                        else:
                            current.append(token)
                    yield from (tokenizer.decode(p) for p in pieces)
            if carry:
                yield tokenizer.decode([t for t in carry if t != EOS_ID])

        return cls(texts(), n)

    def overlap(self, text: str) -> float:
        """The share of the example's n-grams found in the training text."""
        tokens = words(text)
        if len(tokens) < self.n or len(self.hashes) == 0:
            return 0.0  # shorter than one n-gram: not decidable from n-grams (GPT-3 left such examples out too)
        return float(np.isin(ngram_hashes(tokens, self.n), self.hashes).mean())


def contamination(examples: Sequence[str], ngrams: TrainingNgrams, threshold: float = 0.0) -> dict:
    """Per task: how many examples share at least one n-gram (more than ``threshold`` of them) with training."""
    shares = [ngrams.overlap(text) for text in examples]
    flagged = [i for i, share in enumerate(shares) if share > threshold]
    return {"examples": len(examples), "contaminated": len(flagged), "contaminated_ids": flagged,
            "fraction": len(flagged) / max(len(examples), 1), "ngram": ngrams.n,
            "max_overlap": max(shares, default=0.0)}
