"""Conversation data for post-training: reading TRL-format rows, setting bad rows aside with a reason,
tokenizing with the chat template, storing token ids for the workers, and padded batches.

Row formats (TRL's):
- SFT: ``{"messages": [{"role", "content"}, ...]}`` or ``{"prompt", "completion"}`` (strings or message lists)
- preference pairs: ``{"prompt", "chosen", "rejected"}`` (conversational or strings), optional ``margin``

Files: JSONL (plain, ``.gz``, ``.zst``) or Parquet, a file or a directory of them, local or object store.
A bad row never stops a run and is never dropped silently: it is counted under its reason and written
(PII masked) to the stage's ``rejects.jsonl``.

**Padding, not packing.** Each conversation is one row of a micro-batch, padded to the longest row of
that micro-batch (rows of similar length are batched together). Packing several conversations into one
row would need attention that stops at conversation boundaries (a block-diagonal mask, which SDPA's
flash kernel cannot take, or varlen kernels CUDA-only); padding keeps one attention path for CPU and
GPU, keeps every conversation's positions starting at 0 as at inference, and costs little once rows of
similar length share a micro-batch.
"""
from __future__ import annotations

import gzip
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from model.llama import IGNORE_INDEX
from model.tokenizer import ChatFormatError, Tokenizer, validate_messages
from pipelines.config import ConfigError
from pipelines.rundir import is_local, local_copy, resolve_filesystem

SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".parquet")
REJECTS_FILE = "rejects.jsonl"


class RowError(ValueError):
    """A row that cannot be used; ``reason`` is its short, countable name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


# ---- reading --------------------------------------------------------------------------------------
def input_files(uri: str) -> list[str]:
    """The data files of ``uri`` (a file, or a directory searched recursively), sorted."""
    fs, path = resolve_filesystem(uri)
    import pyarrow.fs as pafs

    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"input {uri}: not found")
    if info.type == pafs.FileType.File:
        if not uri.endswith(SUFFIXES):
            raise ConfigError(f"input {uri}: not a data file (expected {', '.join(SUFFIXES)})")
        return [uri]
    found = [f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
             if f.type == pafs.FileType.File and f.path.endswith(SUFFIXES)
             and not Path(f.path).name.startswith((".", "_"))]
    if not found:
        raise ConfigError(f"input {uri}: no {', '.join(SUFFIXES)} files in the directory")
    prefix = uri[: len(uri) - len(path)] if not is_local(uri) else ""
    return sorted(prefix + p for p in found)


def _open_text(path: Path) -> io.TextIOBase:
    raw: Any
    if path.name.endswith(".gz"):
        raw = gzip.open(path, "rb")
    elif path.name.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(path.open("rb"))
    else:
        raw = path.open("rb")
    # utf-8-sig: a byte-order mark at the start is not part of the first record
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace")


def read_rows(uri: str) -> Iterator[tuple[str, Any]]:
    """(where, row or RowError) for every row of every file of ``uri``; ``where`` is ``file:line``."""
    for file_uri in input_files(uri):
        path = local_copy(file_uri)
        if path.name.endswith(".parquet"):
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(path)
            except Exception as err:  # noqa: BLE001 - a damaged file is one reject, not a crash
                yield f"{file_uri}", RowError("unreadable_file", str(err).splitlines()[0][:200])
                continue
            for index, row in enumerate(table.to_pylist()):
                yield f"{file_uri}:{index + 1}", row
            continue
        with _open_text(path) as handle:
            try:
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        yield f"{file_uri}:{number}", json.loads(line)
                    except json.JSONDecodeError as err:
                        yield f"{file_uri}:{number}", RowError("malformed_json", err.msg)
            except (OSError, EOFError) as err:  # truncated archive: what was read stays read
                yield f"{file_uri}", RowError("unreadable_file", str(err)[:200])


# ---- parsing --------------------------------------------------------------------------------------
def _messages(value: Any, field_name: str, default_role: str) -> list[dict]:
    if isinstance(value, str):
        value = [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise RowError("not_a_conversation", f"'{field_name}' is neither a string nor a list of messages")
    try:
        return validate_messages([m if isinstance(m, dict) else {"bad": m} for m in value])
    except ChatFormatError as err:
        text = str(err)
        reason = "unknown_role" if "role" in text else "bad_message"
        raise RowError(reason, f"'{field_name}': {text}") from None


def parse_conversation(row: Any) -> list[dict]:
    """An SFT row as one message list that ends with an assistant turn."""
    if isinstance(row, RowError):
        raise row
    if not isinstance(row, dict):
        raise RowError("not_a_conversation", "a row must be a JSON object")
    if "messages" in row:
        messages = _messages(row["messages"], "messages", "user")
    elif "prompt" in row and "completion" in row:
        messages = _messages(row["prompt"], "prompt", "user") + _messages(row["completion"], "completion", "assistant")
    else:
        raise RowError("not_a_conversation", "expected 'messages' or 'prompt' and 'completion'")
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("no_assistant_turn", "nothing to learn from: no assistant message")
    return messages


@dataclass(frozen=True)
class Pair:
    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    margin: float = 0.0


def parse_pair(row: Any) -> Pair:
    if isinstance(row, RowError):
        raise row
    if not isinstance(row, dict) or not all(k in row for k in ("prompt", "chosen", "rejected")):
        raise RowError("not_a_pair", "expected 'prompt', 'chosen' and 'rejected'")
    prompt = _messages(row["prompt"], "prompt", "user")
    chosen = _messages(row["chosen"], "chosen", "assistant")
    rejected = _messages(row["rejected"], "rejected", "assistant")
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if reply[-1]["role"] != "assistant":
            raise RowError("no_assistant_turn", f"'{name}' does not end with an assistant message")
    if chosen == rejected:
        raise RowError("identical_replies", "chosen and rejected are the same")
    margin = row.get("margin", 0.0) or 0.0
    if not isinstance(margin, (int, float)) or isinstance(margin, bool):
        raise RowError("bad_margin", f"'margin' must be a number, got {type(margin).__name__}")
    return Pair(prompt, chosen, rejected, float(margin))


# ---- rejects --------------------------------------------------------------------------------------
@dataclass
class Rejects:
    """Counts by reason plus the rejected rows (PII masked) for ``rejects.jsonl``."""

    counts: Counter = field(default_factory=Counter)
    rows: list[dict] = field(default_factory=list)
    max_rows: int = 10_000

    def add(self, where: str, error: RowError, row: Any) -> None:
        from pipelines.data.pii import PIIConfig, redact

        self.counts[error.reason] += 1
        if len(self.rows) < self.max_rows:
            shown = row if not isinstance(row, RowError) else None
            text = json.dumps(shown, ensure_ascii=False, default=str)[:2000] if shown is not None else ""
            self.rows.append({"where": where, "reason": error.reason, "detail": redact(error.detail, PIIConfig())[0],
                              "row": redact(text, PIIConfig())[0]})

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def jsonl(self) -> str:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows)


# ---- tokenized storage ----------------------------------------------------------------------------
def encode_conversation(tokenizer: Tokenizer, messages: Sequence[dict], max_len: int) -> tuple[list[int], list[bool]]:
    encoding = tokenizer.apply_chat_template(messages)
    if len(encoding.ids) > max_len:
        raise RowError("too_long", f"{len(encoding.ids)} tokens; the context holds {max_len}")
    return encoding.ids, encoding.assistant_mask


def encode_reply(tokenizer: Tokenizer, prompt: Sequence[dict], reply: Sequence[dict],
                 max_len: int) -> tuple[list[int], list[bool]]:
    """prompt + reply; the mask marks the reply's last assistant turn (what a pair compares)."""
    whole = tokenizer.apply_chat_template([*prompt, *reply])
    if len(whole.ids) > max_len:
        raise RowError("too_long", f"{len(whole.ids)} tokens; the context holds {max_len}")
    start = len(tokenizer.apply_chat_template([*prompt, *reply[:-1]]).ids)
    return whole.ids, [i >= start and m for i, m in enumerate(whole.assistant_mask)]


@dataclass
class TokenizedSequences:
    """Token ids and loss masks of many sequences in three flat arrays (``<prefix>.ids.npy`` etc.),
    memory-mapped in the workers. Picklable: carries the path prefix, never the arrays."""

    prefix: str

    def __post_init__(self) -> None:
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.prefix, self._arrays = state["prefix"], None

    @staticmethod
    def write(prefix: Path, sequences: Sequence[tuple[Sequence[int], Sequence[bool]]]) -> "TokenizedSequences":
        lengths = np.array([len(ids) for ids, _ in sequences], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        ids = np.fromiter((t for s, _ in sequences for t in s), dtype=np.int32, count=int(offsets[-1]))
        mask = np.fromiter((bool(m) for _, s in sequences for m in s), dtype=np.bool_, count=int(offsets[-1]))
        prefix.parent.mkdir(parents=True, exist_ok=True)
        for name, array in (("ids", ids), ("mask", mask), ("offsets", offsets)):
            np.save(f"{prefix}.{name}.npy", array)
        return TokenizedSequences(str(prefix))

    def _load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = tuple(np.load(f"{self.prefix}.{name}.npy", mmap_mode="r")  # type: ignore[assignment]
                                 for name in ("ids", "mask", "offsets"))
        return self._arrays

    def __len__(self) -> int:
        return len(self._load()[2]) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self._load()[2])

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        ids, mask, offsets = self._load()
        return np.asarray(ids[offsets[index]:offsets[index + 1]]), np.asarray(mask[offsets[index]:offsets[index + 1]])


@dataclass
class PaddedBatch:
    tokens: torch.Tensor  # [batch, time] right-padded with 0
    targets: torch.Tensor  # [batch, time - 1]: the next token where the mask trains on it, else IGNORE_INDEX
    lengths: torch.Tensor  # [batch]

    @property
    def count(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    @property
    def real_tokens(self) -> int:
        return int(self.lengths.sum())


def pad_batch(sequences: Sequence[tuple[np.ndarray, np.ndarray]]) -> PaddedBatch:
    width = max(len(ids) for ids, _ in sequences)
    tokens = torch.zeros(len(sequences), width, dtype=torch.long)
    targets = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, mask) in enumerate(sequences):
        ids_t = torch.from_numpy(ids.astype(np.int64))
        tokens[row, :len(ids)] = ids_t
        targets[row, :len(ids)] = torch.where(torch.from_numpy(mask.astype(np.bool_)), ids_t,
                                              torch.tensor(IGNORE_INDEX))
    lengths = torch.tensor([len(ids) for ids, _ in sequences], dtype=torch.long)
    return PaddedBatch(tokens, targets[:, 1:], lengths)


def length_grouped(rows: np.ndarray, lengths: np.ndarray, rank: int, world: int, micro: int) -> list[np.ndarray]:
    """This rank's micro-batches of one optimizer step's ``rows``: sorted by length first, so rows of a
    micro-batch have similar lengths (little padding), then dealt out as ``BatchOrder`` does."""
    ordered = rows[np.argsort(lengths[rows], kind="stable")]
    rounds = len(ordered) // (micro * world)
    return [ordered[(r * world + rank) * micro:(r * world + rank + 1) * micro] for r in range(rounds)]


def split_for_validation(key: str, share: float) -> bool:
    """Deterministic hold-out by a row's content."""
    import hashlib

    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64 < share
