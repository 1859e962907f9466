"""The one record shape every step of the data stage reads and writes.

Every input document becomes exactly one row and keeps it to the end: ``status`` says where it
ended (kept, dropped by a filter, removed as a duplicate, quarantined as unreadable) and ``reason``
names the filter/rule or the read error. The schema is fixed so blocks from different
readers concatenate without type surprises; ``meta`` is a JSON string for the same reason.
"""
from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

KEPT, DROPPED, DUPLICATE, QUARANTINED = "kept", "dropped", "duplicate", "quarantined"
STATUSES = (KEPT, DROPPED, DUPLICATE, QUARANTINED)
PII_KINDS = ("email", "phone", "ip", "card")

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("text", pa.string()),
    ("source", pa.string()),
    ("meta", pa.string()),          # JSON object
    ("location", pa.string()),      # where in the input it came from (file:line, file:row, ...)
    ("status", pa.string()),
    ("reason", pa.string()),        # "" when kept; "<step>:<rule>" otherwise
    ("duplicate_of", pa.string()),  # id of the kept document this one duplicates
    ("bytes_in", pa.int64()),       # UTF-8 bytes as read (raw bytes for unreadable input)
    ("preset", pa.string()),        # the filter preset that judged it ("" before the preset step)
    ("detail", pa.string()),        # for a rejection: the part of the text that triggered the rule
    *[(f"pii_{kind}", pa.int32()) for kind in PII_KINDS],
])


def make_record(
    doc_id: str,
    text: str,
    source: str,
    location: str,
    meta: dict[str, Any] | None = None,
    status: str = KEPT,
    reason: str = "",
    bytes_in: int | None = None,
) -> dict[str, Any]:
    return {
        "id": doc_id,
        "text": text,
        "source": source,
        "meta": json.dumps(meta or {}, sort_keys=True, ensure_ascii=False, default=str),
        "location": location,
        "status": status,
        "reason": reason,
        "duplicate_of": "",
        "bytes_in": len(text.encode("utf-8", "replace")) if bytes_in is None else bytes_in,
        "preset": "",
        "detail": "",
        **{f"pii_{kind}": 0 for kind in PII_KINDS},
    }


def quarantine(doc_id: str, source: str, location: str, reason: str, raw: bytes | str = b"",
               preview_chars: int = 2000, size: int | None = None) -> dict[str, Any]:
    """A record for input that could not be read as a document: a preview is kept for inspection.

    ``size`` is the input's real size in bytes when ``raw`` holds only part of it (or nothing, as for
    an oversized line that was never kept in memory), so "bytes in" counts every byte read.
    """
    raw_bytes = raw.encode("utf-8", "replace") if isinstance(raw, str) else raw
    preview = raw_bytes[:preview_chars].decode("utf-8", "replace")
    return make_record(doc_id, preview, source, location, status=QUARANTINED,
                       reason=f"quarantine:{reason}", bytes_in=len(raw_bytes) if size is None else size)


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)
