"""Readers: input paths/URIs -> the common record (id, text, source, meta) — or a quarantine record.

Inputs are resolved on the driver into a sorted list of :class:`InputFile` (directories walked,
globs expanded, formats detected), so a bad path is a one-line :class:`ConfigError` before any
work starts. Each file is then read by one Ray task (:func:`read_input_file`), which never raises
for bad content: invalid UTF-8, malformed JSON lines, truncated archives, over-long documents and
unreadable files all become quarantine records that name the reason and the location.

Ids are ``<source>:<position>`` (1-based line for line formats, 0-based row for Parquet), where
``source`` is the file's path relative to the input argument it was found under (the file name
for a file given directly), so ids do not depend on where the corpus is mounted.
"""
from __future__ import annotations

import fnmatch
import glob
import json
import os
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import pyarrow.fs as pafs

from pipelines.config import ConfigError, StrictModel
from pipelines.data.records import make_record, quarantine
from pipelines.rundir import resolve_filesystem

from pydantic import Field

BUILTIN = "builtin"
Format = Literal["jsonl", "parquet", "text", "html"]
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
EXTENSIONS: dict[str, Format] = {
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".parquet": "parquet", ".pq": "parquet",
    ".txt": "text", ".text": "text", ".md": "text",
    ".html": "html", ".htm": "html",
}
CHUNK = 1 << 20


class ReadConfig(StrictModel):
    format: Literal["auto", "jsonl", "parquet", "text", "html"] = Field(
        "auto", description="input format; auto detects it from each file's extension")
    text_field: str = Field("text", description="field/column holding the text in JSONL and Parquet")
    text_per_line: bool = Field(False, description="plain text: one document per line instead of per file")
    max_document_bytes: int = Field(1_000_000, gt=0, description="larger documents are quarantined")


@dataclass(frozen=True)
class InputFile:
    uri: str            # what resolve_filesystem() opens: absolute local path or scheme://...
    source: str         # stable name used in ids: path relative to the input argument
    format: str         # a Format, or "unknown" (quarantined when read)
    compression: str | None


def _split_compression(name: str) -> tuple[str, str | None]:
    lower = name.lower()
    for suffix, kind in COMPRESSIONS.items():
        if lower.endswith(suffix):
            return name[: -len(suffix)], kind
    return name, None


def detect_format(name: str, forced: str = "auto") -> tuple[str, str | None]:
    stem, compression = _split_compression(name)
    if forced != "auto":
        return forced, compression
    ext = os.path.splitext(stem)[1].lower()
    return EXTENSIONS.get(ext, "unknown"), compression


def _scheme_prefix(uri: str) -> str:
    return uri.split("://", 1)[0] + "://" if "://" in uri else ""


def _has_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _list_files(fs: pafs.FileSystem, base: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and not _hidden(i.path, base))


def _hidden(path: str, base: str) -> bool:
    # Dot-files and Spark/Hadoop markers (_SUCCESS) are bookkeeping, not corpus files.
    rel = path[len(base):].strip("/")
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def resolve_inputs(inputs: list[str], cfg: ReadConfig) -> list[InputFile]:
    """Expand every input argument into files; ConfigError (one line) for anything unusable."""
    if not inputs:
        raise ConfigError("config field 'inputs': give at least one input path, URI or 'builtin'")
    files: list[InputFile] = []
    for arg in inputs:
        if arg == BUILTIN:
            continue
        fs, path = resolve_filesystem(arg)
        prefix = _scheme_prefix(arg)
        if _has_glob(path):
            if prefix:
                base = path.split("*")[0].split("?")[0].split("[")[0].rsplit("/", 1)[0]
                matches = [p for p in _list_files(fs, base) if fnmatch.fnmatch(p, path)]
            else:
                base = os.path.dirname(path.split("*")[0].split("?")[0].split("[")[0])
                matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
            if not matches:
                raise ConfigError(f"input {arg}: no files match")
            pairs = [(p, os.path.relpath(p, base) if not prefix else p[len(base):].strip("/")) for p in matches]
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise ConfigError(f"input {arg}: not found")
            if info.type == pafs.FileType.Directory:
                listed = _list_files(fs, path)
                if not listed:
                    raise ConfigError(f"input {arg}: directory has no files")
                name = path.rstrip("/").rsplit("/", 1)[-1]
                pairs = [(p, f"{name}/{p[len(path):].strip('/')}") for p in listed]
            else:
                pairs = [(path, path.rsplit("/", 1)[-1])]
                fmt, _ = detect_format(path, cfg.format)
                if fmt == "unknown":
                    raise ConfigError(f"input {arg}: unknown format (use .jsonl/.parquet/.txt/.html, "
                                      f"optionally .gz/.zst, or set read.format)")
        for fs_path, source in pairs:
            fmt, compression = detect_format(fs_path, cfg.format)
            files.append(InputFile(prefix + fs_path if prefix else fs_path, source, fmt, compression))
    # Two inputs may contain files with the same relative name: fall back to the full path there.
    seen: dict[str, int] = {}
    for f in files:
        seen[f.source] = seen.get(f.source, 0) + 1
    return [f if seen[f.source] == 1 else InputFile(f.uri, f.uri, f.format, f.compression) for f in files]


class TruncatedInput(Exception):
    """A compressed stream ended before its end-of-stream marker."""


def _decompressed_chunks(stream: Any, compression: str | None) -> Iterator[bytes]:
    """Decompressed bytes of a stream; raises TruncatedInput if an archive ends early.

    zstandard's stream_reader returns a short read on a truncated frame instead of failing, so
    both formats are read with decompress objects whose ``eof`` flag tells a complete stream.
    """
    if compression is None:
        while chunk := stream.read(CHUNK):
            yield chunk
        return
    import zstandard

    def new_decoder():
        return zlib.decompressobj(wbits=31) if compression == "gzip" else zstandard.ZstdDecompressor().decompressobj()

    decoder, pending, started = new_decoder(), b"", False
    while True:
        chunk = pending or stream.read(CHUNK)
        pending = b""
        if not chunk:
            break
        started = True
        yield decoder.decompress(chunk)
        if decoder.eof:  # multi-member gzip / multi-frame zstd: continue with the next member
            pending = decoder.unused_data
            decoder, started = new_decoder(), bool(pending)
    if started and not decoder.eof:
        raise TruncatedInput("archive ended before its end-of-stream marker")


def iter_lines(chunks: Iterator[bytes], max_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, line bytes or None if longer than max_bytes, length) without holding huge lines."""
    buffer = b""
    lineno, oversize, oversize_len = 0, False, 0
    for chunk in chunks:
        buffer += chunk
        while True:
            cut = buffer.find(b"\n")
            if cut < 0:
                if len(buffer) > max_bytes:  # drop the middle of an over-long line as it streams by
                    oversize, oversize_len = True, oversize_len + len(buffer)
                    buffer = b""
                break
            line, buffer = buffer[:cut], buffer[cut + 1:]
            lineno += 1
            if oversize:
                yield lineno, None, oversize_len + len(line)
                oversize, oversize_len = False, 0
            elif len(line) > max_bytes:
                yield lineno, None, len(line)
            else:
                yield lineno, line, len(line)
    if oversize or buffer:
        lineno += 1
        if oversize or len(buffer) > max_bytes:
            yield lineno, None, oversize_len + len(buffer)
        else:
            yield lineno, buffer, len(buffer)


def _read_jsonl(f: InputFile, stream: Any, cfg: ReadConfig) -> Iterator[dict]:
    lineno = 0
    try:
        for lineno, line, length in iter_lines(_decompressed_chunks(stream, f.compression), cfg.max_document_bytes):
            doc_id, where = f"{f.source}:{lineno}", f"{f.source}:line {lineno}"
            if line is None:
                yield quarantine(doc_id, f.source, where, "too_large", b"")
                continue
            if not line.strip():
                continue  # blank lines separate nothing and hold no document
            try:
                decoded = line.decode("utf-8")
            except UnicodeDecodeError:
                yield quarantine(doc_id, f.source, where, "invalid_utf8", line)
                continue
            try:
                obj = json.loads(decoded)
            except (ValueError, RecursionError):
                yield quarantine(doc_id, f.source, where, "malformed_json", line)
                continue
            if not isinstance(obj, dict):
                yield quarantine(doc_id, f.source, where, "not_a_json_object", line)
                continue
            text = obj.pop(cfg.text_field, None)
            if not isinstance(text, str):
                reason = "missing_text_field" if text is None else "text_not_a_string"
                yield quarantine(doc_id, f.source, where, reason, line)
                continue
            yield make_record(doc_id, text, f.source, where, meta=obj)
    except TruncatedInput:
        yield quarantine(f"{f.source}:truncated", f.source, f"{f.source}:after line {lineno}", "truncated_archive")
    except Exception as err:  # zstd/zlib raise their own error types for corrupt data
        yield quarantine(f"{f.source}:unreadable", f.source, f"{f.source}:after line {lineno}",
                         "corrupt_archive", str(err)[:200])


def _read_whole(f: InputFile, stream: Any, cfg: ReadConfig) -> tuple[bytes | None, str]:
    """(content or None, reason) reading at most max_document_bytes + 1 decompressed bytes."""
    parts, size = [], 0
    try:
        for chunk in _decompressed_chunks(stream, f.compression):
            parts.append(chunk)
            size += len(chunk)
            if size > cfg.max_document_bytes:
                return None, "too_large"
    except TruncatedInput:
        return None, "truncated_archive"
    except Exception:
        return None, "corrupt_archive"
    return b"".join(parts), ""


def _read_text(f: InputFile, stream: Any, cfg: ReadConfig) -> Iterator[dict]:
    if cfg.text_per_line:
        try:
            for lineno, line, _ in iter_lines(_decompressed_chunks(stream, f.compression), cfg.max_document_bytes):
                doc_id, where = f"{f.source}:{lineno}", f"{f.source}:line {lineno}"
                if line is None:
                    yield quarantine(doc_id, f.source, where, "too_large")
                elif line.strip():
                    try:
                        yield make_record(doc_id, line.decode("utf-8"), f.source, where)
                    except UnicodeDecodeError:
                        yield quarantine(doc_id, f.source, where, "invalid_utf8", line)
        except TruncatedInput:
            yield quarantine(f"{f.source}:truncated", f.source, f.source, "truncated_archive")
        except Exception:
            yield quarantine(f"{f.source}:unreadable", f.source, f.source, "corrupt_archive")
        return
    content, reason = _read_whole(f, stream, cfg)
    if content is None:
        yield quarantine(f.source, f.source, f.source, reason)
        return
    try:
        yield make_record(f.source, content.decode("utf-8"), f.source, f.source)
    except UnicodeDecodeError:
        yield quarantine(f.source, f.source, f.source, "invalid_utf8", content)


def _read_html(f: InputFile, stream: Any, cfg: ReadConfig) -> Iterator[dict]:
    content, reason = _read_whole(f, stream, cfg)
    if content is None:
        yield quarantine(f.source, f.source, f.source, reason)
        return
    try:
        markup = content.decode("utf-8")
    except UnicodeDecodeError:
        # Web pages declare their own charsets; trafilatura's decoder honours that and guesses otherwise.
        from trafilatura.utils import decode_file

        markup = decode_file(content)
    yield make_record(f.source, markup, f.source, f.source, meta={"format": "html"})


def _read_parquet(f: InputFile, cfg: ReadConfig) -> Iterator[dict]:
    import pyarrow.parquet as pq

    fs, path = resolve_filesystem(f.uri)
    row = 0
    try:
        parquet = pq.ParquetFile(fs.open_input_file(path))
        if cfg.text_field not in parquet.schema_arrow.names:
            yield quarantine(f"{f.source}:schema", f.source, f.source, "missing_text_field",
                             f"columns: {parquet.schema_arrow.names}")
            return
        for batch in parquet.iter_batches(batch_size=1024):
            for values in batch.to_pylist():
                doc_id, where = f"{f.source}:{row}", f"{f.source}:row {row}"
                row += 1
                text = values.pop(cfg.text_field)
                if isinstance(text, bytes):
                    try:
                        text = text.decode("utf-8")
                    except UnicodeDecodeError:
                        yield quarantine(doc_id, f.source, where, "invalid_utf8", text)
                        continue
                if not isinstance(text, str):
                    yield quarantine(doc_id, f.source, where, "missing_text_field")
                elif len(text.encode("utf-8")) > cfg.max_document_bytes:
                    yield quarantine(doc_id, f.source, where, "too_large", text[:2000])
                else:
                    yield make_record(doc_id, text, f.source, where, meta=values)
    except Exception as err:  # corrupt footer, truncated file, bad pages
        yield quarantine(f"{f.source}:unreadable", f.source, f"{f.source}:row {row}",
                         "unreadable_parquet", str(err)[:200])


def read_input_file(f: InputFile, cfg: ReadConfig) -> Iterator[dict]:
    """Every record of one input file; never raises for bad content."""
    if f.format == "unknown":
        yield quarantine(f.source, f.source, f.source, "unknown_format")
        return
    if f.format == "parquet":
        yield from _read_parquet(f, cfg)
        return
    fs, path = resolve_filesystem(f.uri)
    try:
        stream = fs.open_input_stream(path, compression=None)
    except OSError as err:
        yield quarantine(f.source, f.source, f.source, "unreadable_file", str(err)[:200])
        return
    with stream:
        reader = {"jsonl": _read_jsonl, "text": _read_text, "html": _read_html}[f.format]
        yield from reader(f, stream, cfg)


def iter_builtin_records() -> Iterator[dict]:
    from pipelines.data.builtin import iter_builtin_documents

    for doc in iter_builtin_documents():
        yield make_record(doc["id"], doc["text"], doc["source"], doc["id"], meta=doc["meta"])


def builtin_parts(count: int) -> list[dict[str, Any]]:
    """The built-in corpus cut into ``count`` contiguous slices of module files, then the pydoc
    topics: read in order, the parts give :func:`iter_builtin_records` exactly."""
    from pipelines.data.builtin import stdlib_files

    files = [str(p) for p in stdlib_files()]
    size = -(-len(files) // max(count, 1))
    return [{"stdlib": files[i:i + size]} for i in range(0, len(files), size)] + [{"stdlib": None}]


def read_builtin_part(part: dict[str, Any]) -> list[dict]:
    """Records of one part from :func:`builtin_parts` (``stdlib: None`` means the pydoc topics)."""
    from pathlib import Path

    from pipelines.data.builtin import iter_pydoc_documents, iter_stdlib_documents

    docs = (iter_pydoc_documents() if part["stdlib"] is None
            else iter_stdlib_documents(paths=[Path(p) for p in part["stdlib"]]))
    return [make_record(d["id"], d["text"], d["source"], d["id"], meta=d["meta"]) for d in docs]
