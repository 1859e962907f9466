"""``groundup data``: raw corpora -> cleaned, deduplicated, tokenized and packed shards (one Ray job).

Flow (each step can be switched off in the config), each pass a round of Ray tasks over the same
blocks (one per read unit of about equal bytes):

    read (quarantine unreadable) -> clean + filter + PII + dedup signatures (one pass)
        -> exact + MinHash-LSH dedup (on the driver, or Ray Data's shuffles for large corpora)
        -> mark duplicates, count, split kept / rejects/ (one pass) -> train/reuse tokenizer (a task)
        -> tokenize (tasks) -> merge by seeded hash -> pack into .npy shards

Every input document keeps one row through the whole job with ``status``/``reason`` saying where it
ended, so counts add up by construction and every rejected document is written to
``<run>/data/rejects/`` with its reason and source location.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from pipelines.cli import Flag, stage_main
from pipelines.config import ConfigError, StageConfig
from pipelines.console import Progress
from pipelines.data.clean import CleanConfig
from pipelines.data.dedup import SIGNED_COLUMNS, DedupConfig, dedup_dataset, dedup_signed_rows
from pipelines.data.filters import PRESETS, FiltersConfig, effective_filters
from pipelines.data.pack import (
    PackConfig,
    ShardWriter,
    TokenizerConfig,
    assign_validation,
    select_training_sample,
    token_dtype,
    tokenize_batch,
    unit_hash,
)
from pipelines.data.pii import PIIConfig, redact
from pipelines.data.readers import (
    BUILTIN,
    InputFile,
    ReadConfig,
    SkippedFile,
    builtin_parts,
    read_builtin_part,
    read_input_file,
    resolve_inputs,
    split_ranges,
)
from pipelines.data.records import DROPPED, DUPLICATE, KEPT, PII_KINDS, QUARANTINED, SCHEMA, to_table
from pipelines.data.steps import DEFAULT_STEPS, Doc, Pipeline, Rejection, SignStep, Step, build_steps
from pipelines.rundir import RunDir, new_manifest, resolve_filesystem

STAGE = "data"


class Config(StageConfig):
    inputs: list[str] = Field(["builtin"], description="input paths, directories, globs, s3://, gs:// URIs, or 'builtin'")
    read: ReadConfig = ReadConfig()
    clean: CleanConfig = CleanConfig()
    filters: FiltersConfig = FiltersConfig()
    pii: PIIConfig = PIIConfig()
    dedup: DedupConfig = DedupConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    pack: PackConfig = PackConfig()
    steps: list[str] = Field(list(DEFAULT_STEPS), description=(
        "the per-document pipeline, in order: built-in steps (clean, preset, language, gopher_repetition, "
        "gopher_quality, c4, fineweb, pii) and your own as module:Class (an apply(document) method returning "
        "the document or a Rejection); the dedup signature is appended when dedup is on"))
    step_config: dict[str, dict[str, Any]] = Field({}, description="config dict of each module:Class step, by its name in 'steps'")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a Ray started by this stage (default: all)")
    shuffle: Literal["sort", "ray_default"] = Field(
        "sort", description="shuffle for dedup's groupbys on corpora over dedup.local_max_documents: Ray "
                            "Data's task-based sort shuffle, or whatever Ray Data's context says (its hash "
                            "shuffle, with actors)")

    @field_validator("inputs", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


CLI_FLAGS = (
    Flag(("--input",), "inputs", "input paths/URIs or 'builtin', each optionally PATH:preset "
                                 "(web, books, code_docs) to set the filter preset of its documents", {"nargs": "+"}),
    Flag(("--run",), "run", "run directory"),
    Flag(("--seed",), "seed", "seed for sampling, splits and order", {"type": int}),
    Flag(("--text-field",), "read.text_field", "JSONL/Parquet field holding the text"),
    Flag(("--vocab-size",), "tokenizer.vocab_size", "tokenizer vocabulary size", {"type": int}),
    Flag(("--tokenizer",), "tokenizer.path", "reuse this tokenizer.model instead of training one"),
    Flag(("--sequence-length",), "pack.sequence_length", "tokens per training row (+1 for the target)", {"type": int}),
)


def _inspect(argv: list[str]) -> None:
    from pipelines.data.inspect import main

    main(argv)


SUBCOMMANDS = {"inspect": _inspect}  # groundup data inspect --run RUN [--reason R] [--n K]
SUBCOMMANDS_HELP = ("groundup data inspect --run RUN [--reason R] [--n K]: per filter rule, the documents "
                    "it removed and examples with what triggered it")


# ---------------------------------------------------------------- per-document processing (Ray tasks)

def _file_sizes(files: list[InputFile]) -> list[int]:
    sizes = []
    for f in files:
        fs, path = resolve_filesystem(f.uri)
        sizes.append(fs.get_file_info(path).size or 0)
    return sizes


# A read unit holds at most this many input bytes (its records are in one task's memory at once).
MAX_UNIT_BYTES = 64 << 20
# A file that cannot be cut is read in chunks of at least this many bytes of records.
MIN_CHUNK_BYTES = 1 << 20


def unit_target(total_bytes: int, tasks: int) -> int:
    """The bytes a read unit aims at: an equal share of ``tasks``, at least 64 KiB, at most MAX_UNIT_BYTES."""
    return min(max(total_bytes // max(tasks, 1), 1 << 16), MAX_UNIT_BYTES)


def balance_read_tasks(files: list[InputFile], sizes: list[int], tasks: int,
                       cfg: ReadConfig) -> list[tuple[list[InputFile], int]]:
    """Read units of about equal bytes, as (files, bytes): large uncompressed line files are cut into
    byte ranges, small files are grouped (in order). A unit of much more than its share is one large
    file that cannot be cut (compressed): the stage reads it in chunks that other tasks process."""
    target = unit_target(sum(sizes), tasks)
    pieces: list[tuple[InputFile, int]] = []
    for f, size in zip(files, sizes):
        ranges = split_ranges(f, size, target, cfg)
        pieces.extend((r, (r.end - r.start) if r.end >= 0 else size) for r in ranges)
    groups: list[tuple[list[InputFile], int]] = []
    current: list[InputFile] = []
    held = 0
    for f, size in pieces:
        if current and held + size > target:
            groups.append((current, held))
            current, held = [], 0
        current.append(f)
        held += size
    if current:
        groups.append((current, held))
    return groups


@dataclasses.dataclass
class ReadUnit:
    """What one task reads: a group of input files (or byte ranges), or one part of the built-in corpus;
    or, chunked, one large file that cannot be cut, read in chunks that other tasks process."""

    files: list[dict[str, Any]] | None = None
    builtin: dict[str, Any] | None = None
    weight: int = 1  # input bytes (an estimate for built-in parts): the progress line's share of work
    chunk_bytes: int = 0  # > 0: one large file that cannot be cut, read in chunks of about this many bytes

    @property
    def chunked(self) -> bool:
        return self.chunk_bytes > 0


def plan_read_units(cfg: Config, files: list[InputFile]) -> list[ReadUnit]:
    units: list[ReadUnit] = []
    if files:
        tasks = _processing_blocks()
        sizes = _file_sizes(files)
        groups = balance_read_tasks(files, sizes, tasks, cfg.read)
        share = unit_target(sum(sizes), tasks)
        chunk = max(MIN_CHUNK_BYTES, share)
        units += [ReadUnit(files=[asdict(f) for f in group], weight=max(size, 1),
                           chunk_bytes=chunk if size > 2 * share else 0) for group, size in groups]
    if BUILTIN in cfg.inputs:
        # Parsing the standard library is seconds of work: a few read tasks per CPU share it.
        units += [ReadUnit(builtin={"stdlib": None if p["stdlib"] is None else [str(x) for x in p["stdlib"]]},
                           weight=1 << 20) for p in builtin_parts(_processing_blocks())]
    return units


def _iter_unit(unit: ReadUnit, cfg: ReadConfig) -> Iterator[dict[str, Any]]:
    if unit.builtin is not None:
        yield from read_builtin_part(unit.builtin)
        return
    for item in unit.files or []:
        f = InputFile(**item)
        for record in read_input_file(f, cfg):
            if f.preset:
                record["preset"] = f.preset
            yield record


class ProcessBatch:
    """Run the step pipeline (:mod:`pipelines.data.steps`) on every readable document of a batch.

    Each document ends kept (text edited by the steps, PII counted, signed for dedup when the sign step
    is on) or with the first rejection's ``reason`` and ``detail``; the seconds each step spent on the
    batch ride in the ``step_seconds`` column (a JSON object on the batch's first row) to the summary.
    """

    def __init__(self, steps: list[Step], pii: PIIConfig, default_preset: str = "auto"):
        self.steps, self.pii, self.default_preset = steps, pii, default_preset
        self.signing = any(isinstance(s, SignStep) for s in steps)

    @classmethod
    def from_configs(cls, clean: CleanConfig, filters: FiltersConfig, pii: PIIConfig,
                     dedup: DedupConfig | None = None) -> ProcessBatch:
        """The default pipeline over these configs (for callers without a stage config)."""
        from types import SimpleNamespace

        stage = SimpleNamespace(clean=clean, filters=filters, pii=pii, dedup=dedup, step_config={})
        return cls(build_steps(DEFAULT_STEPS, stage, sign=dedup is not None), pii, filters.preset)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        pipeline = Pipeline(self.steps)
        signed: list[Any] = [None] * len(rows)
        for k, row in enumerate(rows):
            if row["status"] != KEPT:
                continue
            doc = Doc(row["id"], row["text"], row["source"], row["meta"], preset=row["preset"])
            try:
                result = pipeline.run(doc)
            except Exception as err:  # hostile content (or a user step's bug) must never take the job down
                row["status"], row["reason"] = QUARANTINED, f"quarantine:processing_error:{type(err).__name__}"
                row["detail"] = str(err)[:200]
                continue
            row["preset"] = doc.preset
            if isinstance(result, Rejection):
                row["status"], row["reason"], row["detail"] = DROPPED, result.reason, result.detail[:500]
                continue
            row["text"] = result.text
            for kind, n in result.pii.items():
                row[f"pii_{kind}"] = n
            signed[k] = result.extra.get("signed")
        if not self.pii.keep_raw_in_rejects:
            mask_rejected(rows, self.pii)
        table = to_table(rows)
        seconds = [json.dumps({k: round(v, 6) for k, v in pipeline.seconds.items()})] + ["{}"] * (len(rows) - 1)
        table = table.append_column("step_seconds", pa.array(seconds[:len(rows)], pa.string()))
        return self._sign(table, signed) if self.signing else table

    @staticmethod
    def _sign(table: pa.Table, signed: list[Any]) -> pa.Table:
        columns = {
            "exact_hash": pa.array([s[0] if s else None for s in signed], pa.string()),
            "signature": pa.array([s[1] if s else None for s in signed], pa.binary()),
            "band_keys": pa.array([s[2] if s else None for s in signed], pa.list_(pa.int64())),
            "t_dedup": pa.array([0.0] * len(signed), pa.float64()),  # timed by the pipeline (step "dedup")
        }
        for name, values in columns.items():
            table = table.append_column(name, values)
        return table


def mask_rejected(rows: list[dict[str, Any]], pii: PIIConfig) -> None:
    """Mask PII in the text and meta of every row that is not kept (dropped documents and quarantine
    previews go to rejects/ as they are); kept rows were masked by the PII step already."""
    every_kind = pii.model_copy(update={"enabled": True, "email": True, "phone": True, "ip": True, "card": True})
    for row in rows:
        if row["status"] != KEPT:
            row["text"] = redact(row["text"], every_kind)[0]
            if row["meta"] != "{}":
                row["meta"] = redact(row["meta"], every_kind)[0]


def _mark_duplicates(batch: pa.Table, removed: dict[str, tuple[str, str]]) -> pa.Table:
    """Set status/reason/duplicate_of of removed documents; only those three columns are rebuilt."""
    ids = batch.column("id").to_pylist()
    status = batch.column("status").to_pylist()
    hits = [removed.get(i) if s == KEPT else None for i, s in zip(ids, status)]
    if not any(hits):
        return batch
    reason = batch.column("reason").to_pylist()
    duplicate_of = batch.column("duplicate_of").to_pylist()
    for k, hit in enumerate(hits):
        if hit:
            status[k], reason[k], duplicate_of[k] = DUPLICATE, f"dedup:{hit[1]}", hit[0]
    for name, values in (("status", status), ("reason", reason), ("duplicate_of", duplicate_of)):
        batch = batch.set_column(batch.schema.get_field_index(name), name, pa.array(values, pa.string()))
    return batch


def _select_status(batch: pa.Table, status: str, keep: bool) -> pa.Table:
    """Rows whose status is (keep=True) or is not (keep=False) ``status``: one Arrow filter per
    batch instead of a Python call per row."""
    import pyarrow.compute as pc

    mask = pc.equal(batch.column("status"), status)
    return batch.filter(mask if keep else pc.invert(mask))


def _status_rows(ds, status: str, keep: bool = True):
    return ds.map_batches(_select_status, fn_kwargs={"status": status, "keep": keep}, batch_format="pyarrow")


def _summarize(batch: pa.Table) -> list[dict[str, Any]]:
    """A block's counts by (status, reason, preset, source), and the steps' seconds (a JSON object on
    the first row); summed on the driver. No row for an empty block."""
    import pyarrow.compute as pc

    if batch.num_rows == 0:
        return []
    keys = ["status", "reason", "preset", "source"]
    counted = pc.is_in(batch.column("status"), value_set=pa.array([KEPT, DUPLICATE]))
    sums = {"n": pa.array(np.ones(batch.num_rows, dtype=np.int64)),
            "bytes_in": batch.column("bytes_in"),
            "bytes_out": pc.if_else(counted, pc.cast(pc.binary_length(batch.column("text")), pa.int64()), 0),
            **{f"pii_{k}": pc.cast(batch.column(f"pii_{k}"), pa.int64()) for k in PII_KINDS}}
    table = pa.table({**{k: batch.column(k) for k in keys}, **sums})
    grouped = table.group_by(keys, use_threads=False).aggregate([(c, "sum") for c in sums])
    rows = [{**{k: row[k] for k in keys}, **{c: row[f"{c}_sum"] for c in sums}, "step_seconds": "{}"}
            for row in grouped.to_pylist()]
    seconds: dict[str, float] = {}
    if "step_seconds" in batch.column_names:
        for value in batch.column("step_seconds").to_pylist():
            if value and value != "{}":
                for name, t in json.loads(value).items():
                    seconds[name] = seconds.get(name, 0.0) + t
    rows[0]["step_seconds"] = json.dumps(seconds)
    return rows


# ---------------------------------------------------------------- the job's Ray tasks
#
# Every pass is a round of plain Ray tasks over blocks (Arrow tables in the object store), one block
# per read unit, in the units' order. The stage keeps every block until its end anyway, so Ray Data's
# streaming executor would add only its start-up: about 5 s of wall time and 7 CPU-seconds per job
# on two cores (benchmarks/bench_data.py), more than the per-document work of a 10 MB corpus.
# Ray Data still runs the dedup shuffles of corpora too large to dedup on the driver.

BATCH_ROWS = 32  # documents per ProcessBatch call: the granularity of the per-step timings


def _processing_blocks() -> int:
    """Read units for the per-document work: eight per CPU, so every core is busy to the end.

    Documents of one size cost different CPU time (a book that the language filter
    drops early against a page every step reads), so smaller units even out the last tasks.
    """
    import ray

    return max(16, 8 * int(ray.cluster_resources().get("CPU", 1)))


def _block_meta(table: pa.Table) -> dict[str, int]:
    import pyarrow.compute as pc

    kept = pc.equal(table.column("status"), KEPT)
    return {"documents": table.num_rows, "bytes_in": int(pc.sum(table.column("bytes_in")).as_py() or 0),
            "kept": int(pc.sum(kept).as_py() or 0),
            "kept_bytes": int(pc.sum(pc.binary_length(table.column("text").filter(kept))).as_py() or 0)}


def _processed(table: pa.Table, processor: ProcessBatch) -> tuple[pa.Table, dict[str, int]]:
    parts = [processor(table.slice(i, BATCH_ROWS)) for i in range(0, table.num_rows, BATCH_ROWS)]
    out = pa.concat_tables(parts) if parts else processor(table)
    return out, _block_meta(out)


def _process_unit(unit: ReadUnit, cfg: ReadConfig, processor: ProcessBatch) -> tuple[pa.Table, dict[str, int]]:
    """Task: read a unit and run the step pipeline on its documents -> (block, its counts)."""
    return _processed(to_table(list(_iter_unit(unit, cfg))), processor)


def _read_chunks(unit: ReadUnit, cfg: ReadConfig, chunk_bytes: int) -> Iterator[pa.Table]:
    """Generator task: the records of a unit that cannot be cut, in tables of about ``chunk_bytes``."""
    rows: list[dict[str, Any]] = []
    held, yielded = 0, False
    for record in _iter_unit(unit, cfg):
        rows.append(record)
        held += record["bytes_in"]
        if held >= chunk_bytes:
            yield to_table(rows)
            rows, held, yielded = [], 0, True
    if rows or not yielded:
        yield to_table(rows)


def _signed_kept(table: pa.Table) -> list[dict[str, Any]]:
    """Task: the dedup signature columns of a block's kept documents."""
    return _select_status(table, KEPT, True).select(list(SIGNED_COLUMNS)).to_pylist()


def _texts_of(table: pa.Table, ids: set[str]) -> dict[str, str]:
    return {i: t for i, t in zip(table.column("id").to_pylist(), table.column("text").to_pylist()) if i in ids}


def _finish_block(table: pa.Table, removed: dict[str, tuple[str, str]], seed: int,
                  rate: float) -> tuple[dict[str, Any], pa.Table, pa.Table]:
    """Task: mark a block's duplicates and split it in one pass -> (its summary rows, kept ids and
    tokenizer over-sample; the kept documents' id and text; the rejected rows for rejects/)."""
    table = _mark_duplicates(table, removed)
    kept = _select_status(table, KEPT, True).select(["id", "text"])
    sample = _ids_and_sample(kept, seed, rate)
    small = {"summary": _summarize(table), "ids": sample.column("id").to_pylist(),
             "sampled": [r for r in sample.to_pylist() if r["text"] is not None]}
    return small, kept, _select_status(table, KEPT, False).select(SCHEMA.names)


def _tokenize_block(kept: pa.Table, model_bytes: bytes, seed: int, validation_ids: set[str]) -> dict[str, Any]:
    """Task: a block's kept documents as tokens (ids + EOS), in (order key, id) order within the block."""
    batch = {"id": np.array(kept.column("id").to_pylist(), dtype=object),
             "text": np.array(kept.column("text").to_pylist(), dtype=object)}
    out = tokenize_batch(batch, model_bytes, seed, validation_ids)
    order = sorted(range(len(out["id"])), key=lambda k: (int(out["order"][k]), out["id"][k]))
    return {name: values[order] for name, values in out.items()}


def _wait_for(refs: list[Any], progress: Progress, weights: list[int] | None = None,
              on_ready: Callable[[int, Any], None] | None = None) -> None:
    """Wait for a round of tasks, redrawing ``progress`` with the done share of ``weights`` (its ETA);
    ``on_ready(k, ref)`` as the k-th task finishes."""
    import ray

    index = {ref: k for k, ref in enumerate(refs)}
    total = float(sum(weights)) if weights else float(len(refs))
    done, pending = 0.0, list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0.25, fetch_local=False)
        for ref in ready:
            k = index[ref]
            done += weights[k] if weights else 1
            if on_ready is not None:
                on_ready(k, ref)
        progress.update(0, 0, min(done / max(total, 1.0), 0.999))


def _process_all(cfg: Config, files: list[InputFile], processor: ProcessBatch,
                 progress: Progress) -> tuple[list[Any], list[dict[str, int]]]:
    """The per-document pass: (block refs in input order, each block's counts)."""
    import ray

    units = plan_read_units(cfg, files)
    processor_ref = ray.put(processor)
    process_unit = ray.remote(_process_unit).options(num_returns=2)
    process_chunk = ray.remote(_processed).options(num_returns=2)
    read_chunks = ray.remote(_read_chunks)
    blocks: list[list[tuple[Any, Any]]] = []  # per unit: its (block, counts) refs, several when chunked
    chunked: list[tuple[int, Any]] = []
    for unit in units:
        if unit.chunked:
            chunked.append((len(blocks), read_chunks.remote(unit, cfg.read, unit.chunk_bytes)))
            blocks.append([])
        else:
            blocks.append([tuple(process_unit.remote(unit, cfg.read, processor_ref))])
    for position, generator in chunked:  # a large compressed file: its chunks spread over the cores
        for chunk in generator:
            blocks[position].append(tuple(process_chunk.remote(chunk, processor_ref)))
    flat = [pair for unit_blocks in blocks for pair in unit_blocks]
    unit_of = [k for k, unit_blocks in enumerate(blocks) for _ in unit_blocks]
    metas: list[dict[str, int]] = [{}] * len(flat)

    def counted(k: int, ref: Any) -> None:
        metas[k] = ray.get(ref)
        progress.update(metas[k]["documents"], metas[k]["bytes_in"])

    block_weights = [units[u].weight // len(blocks[u]) for u in unit_of]
    _wait_for([meta for _, meta in flat], progress, block_weights, counted)
    return [table for table, _ in flat], metas


def _ids_and_sample(batch: pa.Table, seed: int, rate: float) -> pa.Table:
    """Every kept id, with the text only for documents drawn into the tokenizer's sample."""
    ids = batch.column("id").to_pylist()
    drawn = [unit_hash(i, seed, "tokenizer") < rate for i in ids] if rate > 0 else [False] * len(ids)
    texts = [t if d else None for t, d in zip(batch.column("text").to_pylist(), drawn)]
    return pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string())})


def _aggregate_counts(summary_rows: Iterable[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
    """(counts, totals by (status, reason), CPU seconds of each per-document step) from the blocks'
    summary rows (:func:`_summarize`)."""
    totals: dict[tuple[str, str], dict[str, int]] = {}
    seconds: dict[str, float] = {}
    presets: dict[str, dict[str, int]] = {}
    by_source: dict[str, dict[str, int]] = {}
    for row in summary_rows:
        key = (row["status"], row["reason"])
        bucket = totals.setdefault(key, {})
        for name, value in json.loads(row["step_seconds"]).items():
            seconds[name] = seconds.get(name, 0.0) + float(value)
        for name, value in row.items():
            if name not in ("status", "reason", "preset", "source", "step_seconds"):
                bucket[name] = bucket.get(name, 0) + int(value)
        if row["preset"]:
            judged = presets.setdefault(row["preset"], {"documents": 0, "kept": 0, "bytes_in": 0})
            judged["documents"] += int(row["n"])
            judged["kept"] += int(row["n"]) if row["status"] == KEPT else 0
            judged["bytes_in"] += int(row["bytes_in"])
            per_source = by_source.setdefault(row["source"], {})
            per_source[row["preset"]] = per_source.get(row["preset"], 0) + int(row["n"])

    def total(field: str, status: str | None = None, prefix: str = "") -> int:
        return sum(v[field] for (s, r), v in totals.items()
                   if (status is None or s == status) and r.startswith(prefix))

    by_reason = {r: v["n"] for (s, r), v in sorted(totals.items()) if s != KEPT}
    by_filter: dict[str, int] = {}
    for reason, n in by_reason.items():
        step = reason.split(":")[0] if not reason.startswith("quarantine") else "quarantine"
        by_filter[step] = by_filter.get(step, 0) + n
    counts = {
        "documents_in": total("n"), "kept": total("n", KEPT), "dropped": total("n", DROPPED),
        "duplicates": total("n", DUPLICATE), "quarantined": total("n", QUARANTINED),
        "duplicates_exact": total("n", DUPLICATE, "dedup:exact"), "duplicates_near": total("n", DUPLICATE, "dedup:near"),
        "bytes_in": total("bytes_in"), "bytes_out": total("bytes_out", KEPT),
        "bytes_quarantined": total("bytes_in", QUARANTINED), "bytes_duplicates": total("bytes_out", DUPLICATE),
        "by_reason": by_reason, "by_step": by_filter,
        "pii": {k: total(f"pii_{k}", KEPT) for k in PII_KINDS},
        # Which preset judged the documents (documents that reached the preset step): per preset and
        # per input source, so every document's preset is known from where it came from.
        "by_preset": dict(sorted(presets.items())),
        "preset_by_source": dict(sorted(by_source.items())),
    }
    return counts, totals, seconds


def _sample_rate(cfg: Config, total_bytes: int) -> float:
    """Over-sample by hash (cheap, distributed), then pick exactly by hash order on the driver."""
    if cfg.tokenizer.path:
        return 0.0
    return min(1.0, 1.5 * cfg.tokenizer.sample_bytes / max(total_bytes, 1))


def _train_or_load_tokenizer(cfg: Config, sampled: list[dict[str, Any]]) -> tuple[bytes, dict[str, Any]]:
    if cfg.tokenizer.path:
        path = Path(cfg.tokenizer.path)
        path = path / "tokenizer.model" if path.is_dir() else path
        return path.read_bytes(), {"reused": str(path)}
    from model.tokenizer import train_tokenizer

    texts = select_training_sample(sampled, cfg.seed, cfg.tokenizer.sample_bytes)
    if not texts:
        raise ConfigError("no documents survived cleaning and dedup: nothing to train the tokenizer on "
                          "(check the inputs or relax config field 'filters')")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer(texts, tmp, vocab_size=cfg.tokenizer.vocab_size,
                                    model_type=cfg.tokenizer.model_type,
                                    character_coverage=cfg.tokenizer.character_coverage,
                                    num_threads=cfg.tokenizer.threads)
    info = {"trained": True, "model_type": cfg.tokenizer.model_type, "requested_vocab_size": cfg.tokenizer.vocab_size,
            "sample_documents": len(texts), "sample_bytes": sum(len(t.encode("utf-8")) for t in texts),
            "train_seconds": round(time.perf_counter() - started, 3)}
    return tokenizer.model_bytes, info


def _pack(cfg: Config, kept: list[Any], run: RunDir, model_bytes: bytes, validation_ids: set[str],
          documents: int) -> tuple[dict, float]:
    """Tokenize the kept blocks (tasks; the sentencepiece processor is cached per worker process), then
    write the documents in (seeded order key, id) order, merged from the blocks, into .npy shards."""
    import heapq

    import ray

    from model.tokenizer import Tokenizer

    vocab = Tokenizer.from_bytes(model_bytes).vocab_size
    dtype = token_dtype(vocab)
    tokenize = ray.remote(_tokenize_block)
    model_ref, validation_ref = ray.put(model_bytes), ray.put(validation_ids)
    refs = [tokenize.remote(block, model_ref, cfg.seed, validation_ref) for block in kept]

    def write(relpath: str, data: bytes) -> None:
        run.write_bytes(f"{STAGE}/{relpath}", data)

    writers = {split: ShardWriter(split, cfg.pack.sequence_length, cfg.pack.rows_per_shard, dtype, write,
                                  cfg.pack.last_row) for split in ("train", "validation")}
    cpu_seconds = 0.0
    with Progress("data: tokenize, pack", total=documents) as progress:
        _wait_for(refs, progress)
        blocks = ray.get(refs)
        cpu_seconds = float(sum(np.sum(b["t_tokenize"]) for b in blocks))
        keyed = ([(int(b["order"][k]), str(b["id"][k]), n, k) for k in range(len(b["id"]))]
                 for n, b in enumerate(blocks))
        for _, _, n, k in heapq.merge(*keyed):
            block = blocks[n]
            writers[str(block["split"][k])].add(np.frombuffer(block["tokens"][k], dtype=np.uint32),
                                                int(block["n_bytes"][k]))
            progress.update(1, int(block["n_bytes"][k]))
    splits = {split: writer.finish() for split, writer in writers.items()}
    return {"splits": splits, "vocab_size": vocab, "dtype": dtype.name}, cpu_seconds


def _write_rejects(run_dir: RunDir, rejected: list[Any]) -> int:
    """Every rejected row, block by block (one in memory at a time), into rejects/part-00000.parquet."""
    import pyarrow.parquet as pq
    import ray

    directory = run_dir.path(STAGE, "rejects")
    run_dir.fs.delete_dir_contents(directory, missing_dir_ok=True)
    writer, rows = None, 0
    try:
        for ref in rejected:
            table = ray.get(ref)
            if table.num_rows == 0:
                continue
            if writer is None:
                run_dir.fs.create_dir(directory, recursive=True)
                writer = pq.ParquetWriter(f"{directory}/part-00000.parquet", SCHEMA, filesystem=run_dir.fs)
            writer.write_table(table)
            rows += table.num_rows
    finally:
        if writer is not None:
            writer.close()
    return rows


def _dedup(config: Config, blocks: list[Any], metas: list[dict[str, int]]) -> tuple[dict[str, tuple[str, str]], dict[str, Any]]:
    """Duplicates among the kept documents: on the driver (their signatures fetched by tasks) up to
    ``dedup.local_max_documents``, else by Ray Data's shuffles over the same blocks."""
    import ray

    kept_total = sum(m["kept"] for m in metas)

    def texts_of(ids: set[str]) -> dict[str, str]:
        lookup = ray.remote(_texts_of)
        found: dict[str, str] = {}
        for part in ray.get([lookup.remote(block, ids) for block in blocks]):
            found.update(part)
        return found

    if kept_total <= config.dedup.local_max_documents:
        signed = ray.remote(_signed_kept)
        rows = [row for part in ray.get([signed.remote(block) for block in blocks]) for row in part]
        return dedup_signed_rows(rows, config.dedup, texts_of)
    from ray.data.context import ShuffleStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    if config.shuffle == "sort":
        # Ray Data's default hash shuffle starts a pool of aggregator actors for every groupby and
        # sort: about 4 s each, 10-15 s of a job on two cores. The task-based sort shuffle starts
        # nothing and gives the same groups and the same order; the hash shuffle may pay off on
        # large clusters, hence the option.
        ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    survivors = _status_rows(ray.data.from_arrow_refs(blocks), KEPT)
    # local_max_documents=0: the count is known to be over it, so no attempt on the driver first.
    return dedup_dataset(survivors, config.dedup.model_copy(update={"local_max_documents": 0}), signed=True)


def run(config: Config) -> dict[str, Any]:
    started = time.time()
    phase: dict[str, float] = {}
    skipped: list[SkippedFile] = []
    # Bad paths fail here, before Ray starts; PATH:preset sets the filter preset of PATH's documents.
    files = resolve_inputs(config.inputs, config.read, skipped, presets=(*PRESETS, "published", "auto"))
    steps = build_steps(config.steps, config, sign=config.dedup.exact or config.dedup.near)  # user steps load here
    if config.tokenizer.path and not (Path(config.tokenizer.path).is_file()
                                      or (Path(config.tokenizer.path) / "tokenizer.model").is_file()):
        raise ConfigError(f"config field 'tokenizer.path': {config.tokenizer.path} not found")
    run_dir = RunDir(config.run)
    run_dir.check_writable(STAGE)  # a bad --run fails here in one line, not after the whole job

    import ray

    from pipelines.ray_env import ensure_ray

    mark = time.perf_counter()
    ensure_ray(config.num_cpus)
    phase["ray_start"] = time.perf_counter() - mark

    mark = time.perf_counter()
    dedup_on = config.dedup.exact or config.dedup.near
    processor = ProcessBatch(steps, config.pii, config.filters.preset)
    with Progress("data: read, clean, filter, PII, sign") as progress:
        blocks, metas = _process_all(config, files, processor, progress)
    phase["read_clean_filter_pii_sign"] = time.perf_counter() - mark

    mark = time.perf_counter()
    removed: dict[str, tuple[str, str]] = {}
    dedup_stats: dict[str, Any] = {}
    if dedup_on:
        with Progress("data: dedup") as progress:
            removed, dedup_stats = _dedup(config, blocks, metas)
            progress.update(dedup_stats.get("documents", 0))
    phase["dedup"] = time.perf_counter() - mark

    mark = time.perf_counter()
    # One pass marks the duplicates and splits every block into its summary, its kept documents (with
    # the tokenizer's over-sample) and its rejects.
    # The tokenizer's over-sample rate from the kept text before dedup (an upper bound of after).
    bytes_kept = sum(m["kept_bytes"] for m in metas)
    finish = ray.remote(_finish_block).options(num_returns=3)
    removed_ref = ray.put(removed)
    finished = [finish.remote(block, removed_ref, config.seed, _sample_rate(config, bytes_kept)) for block in blocks]
    del blocks
    with Progress("data: count, split, write rejects") as progress:
        _wait_for([small for small, _, _ in finished], progress)
        smalls = ray.get([small for small, _, _ in finished])
        counts, _, step_seconds = _aggregate_counts(row for small in smalls for row in small["summary"])
        if counts["documents_in"] != counts["kept"] + counts["dropped"] + counts["duplicates"] + counts["quarantined"]:
            raise RuntimeError("data stage: document counts do not add up")  # a bug, not a user error
        progress.update(counts["documents_in"])
        kept_ids = [i for small in smalls for i in small["ids"]]
        sampled = [row for small in smalls for row in small["sampled"]]
        kept = [kept_block for _, kept_block, _ in finished]
        rejected = [rejects for _, _, rejects in finished]
        del smalls, finished
        from pipelines.data.report import funnel_png, summary_text

        # The tokenizer trains and the funnel is drawn (matplotlib's import is most of its second) on
        # workers while the driver writes rejects/.
        training = None
        if counts["kept"] and config.tokenizer.path:  # a path on the driver's machine: read here
            training = ray.put(_train_or_load_tokenizer(config, []))
        elif counts["kept"]:
            training = ray.remote(_train_or_load_tokenizer).remote(config, sampled)
        funnel = ray.remote(funnel_png).remote(counts, f"data funnel — {config.run}")
        del sampled
        written = _write_rejects(run_dir, rejected)
        if written != counts["documents_in"] - counts["kept"]:
            raise RuntimeError("data stage: rejects/ does not hold every rejected document")  # a bug
    step_cpu = {name: round(value, 3) for name, value in step_seconds.items()}
    dedup_stats.pop("cpu_seconds_signatures", None)  # the signing is the pipeline's "dedup" step
    if training is None:
        raise ConfigError("no documents survived cleaning and dedup (see data/rejects/; "
                          "relax config field 'filters' or check the inputs)")
    phase["counts_rejects"] = time.perf_counter() - mark

    mark = time.perf_counter()
    with Progress("data: tokenizer" + (" (reused)" if config.tokenizer.path else " training"), unit="docs") as progress:
        try:
            model_bytes, tok_info = ray.get(training)
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, ConfigError):  # a user's problem: its one line, not the task's traceback
                raise err.cause from None
            raise
        progress.update(tok_info.get("sample_documents", 0), tok_info.get("sample_bytes", 0))
    run_dir.write_bytes(f"{STAGE}/tokenizer/tokenizer.model", model_bytes)
    phase["tokenizer"] = time.perf_counter() - mark

    mark = time.perf_counter()
    validation_ids = assign_validation(kept_ids, config.seed, config.pack.validation_fraction)
    run_dir.fs.delete_dir_contents(run_dir.path(STAGE, "shards"), missing_dir_ok=True)
    packed, tokenize_cpu = _pack(config, kept, run_dir, model_bytes, validation_ids, counts["kept"])
    step_cpu["tokenize"] = round(tokenize_cpu, 3)
    phase["tokenize_pack"] = time.perf_counter() - mark

    splits = packed["splits"]
    tokens_out = sum(s["tokens"] for s in splits.values())
    tok_info["bytes_per_token"] = round(counts["bytes_out"] / max(tokens_out, 1), 4)
    counts["tokens_out"] = tokens_out
    counts["files_skipped"] = len(skipped)
    counts["files_skipped_by_reason"] = {r: sum(1 for f in skipped if f.reason == r)
                                         for r in sorted({f.reason for f in skipped})}
    duplicates = {doc: target for doc, (target, _) in sorted(removed.items())}
    outputs = {
        "tokenizer": "tokenizer/tokenizer.model",
        "vocab_size": packed["vocab_size"], "dtype": packed["dtype"], "eos_id": 3,
        "sequence_length": config.pack.sequence_length,
        "row_length": config.pack.sequence_length + 1,
        "last_row": "padded_with_eos" if config.pack.last_row == "pad" else "dropped",
        "tokens_note": "tokens count each document's tokens plus its closing EOS; padding is not counted",
        "splits": splits,
        "rejects": "rejects/" if counts["documents_in"] - counts["kept"] else None,
        "funnel_png": "funnel.png",
    }
    manifest = new_manifest(
        STAGE, config, started,
        inputs={"inputs": config.inputs, "files": len(files), "filters_preset": config.filters.preset,
                "steps": [s.name for s in steps],
                "skipped_files": [{"path": f.path, "reason": f.reason} for f in skipped],
                "effective_filters": {p: effective_filters(config.filters, p).model_dump(mode="json")
                                      for p in PRESETS}},
        outputs=outputs, counts=counts,
        figures={"tokenizer": tok_info, "dedup": {**dedup_stats, "duplicates": duplicates},
                 "cpu_seconds_by_step": step_cpu},
        timings={"phases_s": {k: round(v, 3) for k, v in phase.items()}},
    )
    run_dir.write_bytes(f"{STAGE}/funnel.png", ray.get(funnel))
    run_dir.write_manifest(STAGE, manifest)
    print(summary_text(manifest), flush=True)
    return manifest


if __name__ == "__main__":
    stage_main(STAGE)
