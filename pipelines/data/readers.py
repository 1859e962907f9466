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

import dataclasses
import errno
import fnmatch
import glob
import json
import os
import re
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow.fs as pafs
from pydantic import Field

from pipelines.config import ConfigError, StrictModel
from pipelines.data.records import make_record, quarantine
from pipelines.rundir import resolve_filesystem

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
    preset: str = ""    # filter preset given with the input (``PATH:preset``); "" = the config's
    start: int = 0      # a byte range of an uncompressed line-format file: the lines that start in
    end: int = -1       # [start, end) (end -1: the whole file), read by one task; ids stay file:line


@dataclass(frozen=True)
class SkippedFile:
    """A file found under an input that is not read, and why: counted in the manifest and summary."""

    path: str
    reason: str  # hidden | dangling_symlink | unreadable | not_a_regular_file


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


def _list_files(fs: pafs.FileSystem, base: str, skipped: list[SkippedFile] | None = None) -> list[str]:
    if isinstance(fs, pafs.LocalFileSystem):
        return _walk_local(base, skipped if skipped is not None else [])
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    files = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        if _hidden(info.path, base):
            if skipped is not None:
                skipped.append(SkippedFile(info.path, "hidden"))
        else:
            files.append(info.path)
    return sorted(files)


def _classify_local(path: str) -> str:
    """"" for a regular file this process can open, else why it is skipped."""
    if os.path.islink(path) and not os.path.exists(path):
        try:
            os.stat(path)
        except OSError as err:
            if err.errno == errno.ENOENT:
                return "dangling_symlink"
        return "unreadable"  # a symlink loop, or a target this process may not look at
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "unreadable"
    if not stat.S_ISREG(mode):
        return "not_a_regular_file"
    try:
        with open(path, "rb"):
            return ""
    except OSError:
        return "unreadable"


def _walk_local(base: str, skipped: list[SkippedFile]) -> list[str]:
    """Regular files under a local directory; everything else found there goes to ``skipped``.

    pyarrow's listing leaves out dangling symlinks, and hidden files were dropped without a word:
    here each skipped entry is named with its reason (a hidden directory counts as one entry).
    """
    files: list[str] = []
    seen_dirs: set[str] = set()

    def visit(directory: str) -> None:
        real = os.path.realpath(directory)
        if real in seen_dirs:  # a symlink back up the tree
            return
        seen_dirs.add(real)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            skipped.append(SkippedFile(directory, "unreadable"))
            return
        for entry in entries:
            path = entry.path
            if entry.name.startswith((".", "_")):
                skipped.append(SkippedFile(path, "hidden"))
                continue
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if is_dir:
                visit(path)
                continue
            reason = _classify_local(path)
            if reason:
                skipped.append(SkippedFile(path, reason))
            else:
                files.append(path)

    visit(base)
    return sorted(files)


def _hidden(path: str, base: str) -> bool:
    # Dot-files and Spark/Hadoop markers (_SUCCESS) are bookkeeping, not corpus files.
    rel = path[len(base):].strip("/")
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def split_preset(arg: str, presets: tuple[str, ...]) -> tuple[str, str]:
    """``PATH:preset`` -> (PATH, preset); a colon not followed by a known preset is part of the path."""
    head, sep, tail = arg.rpartition(":")
    if sep and tail in presets and head:
        return head, tail
    return arg, ""


def resolve_inputs(inputs: list[str], cfg: ReadConfig, skipped: list[SkippedFile] | None = None,
                   presets: tuple[str, ...] = ()) -> list[InputFile]:
    """Expand every input argument into files; ConfigError (one line) for anything unusable.

    Files found under an input but not read (hidden, dangling symlinks, unreadable, not regular files)
    are appended to ``skipped`` with their reason. An argument ``PATH:preset`` (a name in ``presets``)
    sets the filter preset of every file under PATH.
    """
    if not inputs:
        raise ConfigError("config field 'inputs': give at least one input path, URI or 'builtin'")
    files: list[InputFile] = []
    skipped = skipped if skipped is not None else []
    for given in inputs:
        arg, preset = split_preset(given, presets)
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
                matches = []
                for p in sorted(glob.glob(path, recursive=True)):
                    if os.path.isdir(p):
                        continue
                    reason = _classify_local(p)
                    if reason:
                        skipped.append(SkippedFile(p, reason))
                    else:
                        matches.append(p)
            if not matches:
                raise ConfigError(f"input {arg}: no files match")
            pairs = [(p, os.path.relpath(p, base) if not prefix else p[len(base):].strip("/")) for p in matches]
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise ConfigError(f"input {arg}: not found")
            if info.type == pafs.FileType.Directory:
                listed = _list_files(fs, path, skipped)
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
            files.append(InputFile(prefix + fs_path if prefix else fs_path, source, fmt, compression, preset))
    # Two inputs may contain files with the same relative name: fall back to the full path there.
    seen: dict[str, int] = {}
    for f in files:
        seen[f.source] = seen.get(f.source, 0) + 1
    return [f if seen[f.source] == 1 else InputFile(f.uri, f.uri, f.format, f.compression, f.preset) for f in files]


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


UTF8_BOM = b"\xef\xbb\xbf"
# A lone surrogate can only come from a JSON escape (UTF-8 decoding rejects them); pairs are joined
# by json.loads, so any surrogate left in a decoded string is lone and cannot be stored in Arrow.
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _without_bom(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The stream without a leading UTF-8 byte-order mark (editors on Windows write one)."""
    head = b""
    for chunk in chunks:
        if head is None:
            yield chunk
            continue
        head += chunk
        if len(head) < len(UTF8_BOM) and UTF8_BOM.startswith(head):
            continue  # could still be the start of a BOM
        yield head.removeprefix(UTF8_BOM)
        head = None
    if head:
        yield head


def replace_surrogates(value: Any) -> Any:
    """Strings (also inside lists and dicts) with lone surrogates replaced by U+FFFD."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [replace_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {replace_surrogates(k): replace_surrogates(v) for k, v in value.items()}
    return value


def splittable(f: InputFile, cfg: ReadConfig) -> bool:
    """Lines can be read from any byte range: uncompressed JSONL, or text read one document per line."""
    return f.compression is None and (f.format == "jsonl" or (f.format == "text" and cfg.text_per_line))


def split_ranges(f: InputFile, size: int, target: int, cfg: ReadConfig) -> list[InputFile]:
    """``f`` cut into byte ranges of about ``target`` bytes (one task each), or ``[f]``."""
    if not splittable(f, cfg) or size <= target or target <= 0:
        return [f]
    pieces = -(-size // target)
    bounds = [size * k // pieces for k in range(pieces + 1)]
    return [dataclasses.replace(f, start=a, end=b) for a, b in zip(bounds, bounds[1:])]


def _range_chunks(stream: Any, start: int, end: int) -> tuple[Iterator[bytes], int]:
    """(bytes of the lines that start in [start, end), newlines before the first of them).

    The prefix is read to count its newlines (line numbers stay those of the whole file); a line that
    began before ``start`` belongs to the previous range and one that begins at ``end`` to the next.
    """
    newlines, remaining, last = 0, start, b"\n"
    while remaining > 0:
        chunk = stream.read(min(CHUNK, remaining))
        if not chunk:
            break
        newlines += chunk.count(b"\n")
        last, remaining = chunk[-1:], remaining - len(chunk)
    skip = start > 0 and last != b"\n"

    def chunks() -> Iterator[bytes]:
        pos, skipping, finishing = start, skip, False
        while chunk := stream.read(CHUNK):
            if skipping:  # the rest of a line that started in the previous range
                cut = chunk.find(b"\n")
                pos += len(chunk) if cut < 0 else cut + 1
                if cut < 0:
                    continue
                chunk, skipping = chunk[cut + 1:], False
                if pos >= end:
                    return
            if finishing or pos + len(chunk) >= end:  # the line that holds byte end-1 ends this range
                cut = chunk.find(b"\n", 0 if finishing else max(end - 1 - pos, 0))
                if cut >= 0:
                    yield chunk[:cut + 1]
                    return
                finishing = True
            yield chunk
            pos += len(chunk)

    return chunks(), newlines + (1 if skip else 0)


def _line_chunks(f: InputFile, stream: Any) -> tuple[Iterator[bytes], int]:
    """(decompressed bytes of the file or of its byte range, line number before the first line)."""
    if f.end >= 0:
        return _range_chunks(stream, f.start, f.end)
    return _decompressed_chunks(stream, f.compression), 0


def iter_lines(chunks: Iterator[bytes], max_bytes: int, first_line: int = 0) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, line bytes or None if longer than max_bytes, length) without holding huge lines."""
    buffer = b""
    lineno, oversize, oversize_len = first_line, False, 0
    for chunk in _without_bom(chunks):
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
        chunks, before = _line_chunks(f, stream)
        for lineno, line, length in iter_lines(chunks, cfg.max_document_bytes, before):
            doc_id, where = f"{f.source}:{lineno}", f"{f.source}:line {lineno}"
            if line is None:
                yield quarantine(doc_id, f.source, where, "too_large", b"", size=length)
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
            if _SURROGATE_ESCAPE.search(decoded) is not None:  # rare: only then walk the object
                obj = replace_surrogates(obj)
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


def _read_whole(f: InputFile, stream: Any, cfg: ReadConfig) -> tuple[bytes | None, str, int]:
    """(content or None, reason, bytes read) holding at most max_document_bytes + 1 decompressed bytes.

    An oversized file is read to its end without being kept, so its real size is counted.
    """
    parts, size = [], 0
    try:
        for chunk in _without_bom(_decompressed_chunks(stream, f.compression)):
            size += len(chunk)
            if parts is not None:
                parts.append(chunk)
                if size > cfg.max_document_bytes:
                    parts = None
    except TruncatedInput:
        return None, "truncated_archive", size
    except Exception:
        return None, "corrupt_archive", size
    if parts is None:
        return None, "too_large", size
    return b"".join(parts), "", size


def _read_text(f: InputFile, stream: Any, cfg: ReadConfig) -> Iterator[dict]:
    if cfg.text_per_line:
        try:
            chunks, before = _line_chunks(f, stream)
            for lineno, line, length in iter_lines(chunks, cfg.max_document_bytes, before):
                doc_id, where = f"{f.source}:{lineno}", f"{f.source}:line {lineno}"
                if line is None:
                    yield quarantine(doc_id, f.source, where, "too_large", size=length)
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
    content, reason, size = _read_whole(f, stream, cfg)
    if content is None:
        yield quarantine(f.source, f.source, f.source, reason, size=size)
        return
    try:
        yield make_record(f.source, content.decode("utf-8"), f.source, f.source)
    except UnicodeDecodeError:
        yield quarantine(f.source, f.source, f.source, "invalid_utf8", content)


def _read_html(f: InputFile, stream: Any, cfg: ReadConfig) -> Iterator[dict]:
    content, reason, size = _read_whole(f, stream, cfg)
    if content is None:
        yield quarantine(f.source, f.source, f.source, reason, size=size)
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
                    reason = "missing_text_field" if text is None else "text_not_a_string"
                    yield quarantine(doc_id, f.source, where, reason, "" if text is None else repr(text))
                elif (size := len(text.encode("utf-8"))) > cfg.max_document_bytes:
                    yield quarantine(doc_id, f.source, where, "too_large", text[:2000], size=size)
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
