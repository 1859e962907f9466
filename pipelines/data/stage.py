"""``groundup data``: raw corpora -> cleaned, deduplicated, tokenized and packed shards (one Ray Data job).

Flow (each step can be switched off in the config):

    read (quarantine unreadable) -> clean + filter + PII + dedup signatures (one pass)
        -> exact + MinHash-LSH dedup (groupbys) -> train/reuse tokenizer -> tokenize (tasks)
        -> sort by seeded hash -> pack into .npy shards

Every input document keeps one row through the whole job with ``status``/``reason`` saying where it
ended, so counts add up by construction and every rejected document is written to
``<run>/data/rejects/`` with its reason and source location.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from pipelines.cli import Flag, stage_main
from pipelines.config import ConfigError, StageConfig
from pipelines.data.clean import CleanConfig, clean_document
from pipelines.data.dedup import DedupConfig, dedup_dataset, new_minhash, sign_document
from pipelines.data.filters import FiltersConfig, apply_filters, effective_filters
from pipelines.data.pack import (PackConfig, ShardWriter, TokenizerConfig, assign_validation,
                                 select_training_sample, token_dtype, tokenize_batch, unit_hash)
from pipelines.data.pii import PIIConfig, redact
from pipelines.data.readers import (BUILTIN, InputFile, ReadConfig, SkippedFile, builtin_parts, read_builtin_part,
                                    read_input_file, resolve_inputs)
from pipelines.data.records import DROPPED, DUPLICATE, KEPT, PII_KINDS, QUARANTINED, SCHEMA, to_table
from pipelines.rundir import RunDir, new_manifest

STAGE = "data"
STEP_TIME_COLUMNS = ("t_clean", "t_filter", "t_pii")


class Config(StageConfig):
    inputs: list[str] = Field(["builtin"], description="input paths, directories, globs, s3://, gs:// URIs, or 'builtin'")
    read: ReadConfig = ReadConfig()
    clean: CleanConfig = CleanConfig()
    filters: FiltersConfig = FiltersConfig()
    pii: PIIConfig = PIIConfig()
    dedup: DedupConfig = DedupConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    pack: PackConfig = PackConfig()
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a Ray started by this stage (default: all)")
    shuffle: Literal["sort", "ray_default"] = Field(
        "sort", description="shuffle for dedup's groupbys and the packing sort: Ray Data's task-based sort "
                            "shuffle, or whatever Ray Data's context says (its hash shuffle, with actors)")

    @field_validator("inputs", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


CLI_FLAGS = (
    Flag(("--input",), "inputs", "input paths/URIs or 'builtin'", {"nargs": "+"}),
    Flag(("--run",), "run", "run directory"),
    Flag(("--seed",), "seed", "seed for sampling, splits and order", {"type": int}),
    Flag(("--text-field",), "read.text_field", "JSONL/Parquet field holding the text"),
    Flag(("--vocab-size",), "tokenizer.vocab_size", "tokenizer vocabulary size", {"type": int}),
    Flag(("--tokenizer",), "tokenizer.path", "reuse this tokenizer.model instead of training one"),
    Flag(("--sequence-length",), "pack.sequence_length", "tokens per training row (+1 for the target)", {"type": int}),
)


# ---------------------------------------------------------------- per-document processing (Ray tasks)

def _read_file(row: dict[str, Any], cfg: ReadConfig) -> list[dict[str, Any]]:
    return list(read_input_file(InputFile(**row["file"]), cfg))


def _read_builtin(row: dict[str, Any]) -> list[dict[str, Any]]:
    stdlib = row["stdlib"]
    return read_builtin_part({"stdlib": None if stdlib is None else [str(p) for p in stdlib]})


class ProcessBatch:
    """Clean, filter and redact every readable document of a batch; record why anything is dropped.

    With a ``dedup`` config it also signs every document it keeps (exact hash, MinHash signature,
    band keys: :data:`dedup.SIGNED_COLUMNS`), so dedup needs no pass of its own over the texts.
    """

    def __init__(self, clean: CleanConfig, filters: FiltersConfig, pii: PIIConfig, dedup: DedupConfig | None = None):
        self.clean, self.filters, self.pii, self.dedup = clean, filters, pii, dedup
        # Built here and shipped with the UDF, so the permutations are not rebuilt (or datasketch
        # imported) inside the timed signing of a worker's first batch.
        self._prototype = new_minhash(dedup) if dedup is not None else None

    def _process(self, row: dict[str, Any], timing: dict[str, float]) -> None:
        t0 = time.perf_counter()
        is_html = '"format": "html"' in row["meta"] and json.loads(row["meta"]).get("format") == "html"
        text, reason = clean_document(row["text"], is_html, self.clean)
        t1 = time.perf_counter()
        timing["t_clean"] += t1 - t0
        if reason:
            row["status"], row["reason"] = DROPPED, reason
            return
        text, reason = apply_filters(text, self.filters)
        t2 = time.perf_counter()
        timing["t_filter"] += t2 - t1
        if reason:
            row["status"], row["reason"] = DROPPED, reason
            return
        text, counts = redact(text, self.pii)
        timing["t_pii"] += time.perf_counter() - t2
        row["text"] = text
        for kind, n in counts.items():
            row[f"pii_{kind}"] = n

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        timing = dict.fromkeys(STEP_TIME_COLUMNS, 0.0)
        for row in rows:
            if row["status"] != KEPT:
                continue
            try:
                self._process(row, timing)
            except Exception as err:  # hostile content must never take the job down
                row["status"], row["reason"] = QUARANTINED, f"quarantine:processing_error:{type(err).__name__}"
        if not self.pii.keep_raw_in_rejects:
            mask_rejected(rows, self.pii)
        table = to_table(rows)
        n = max(len(rows), 1)
        for name in STEP_TIME_COLUMNS:
            table = table.append_column(name, pa.array([timing[name] / n] * len(rows), pa.float64()))
        return self._sign(table, rows) if self.dedup is not None else table

    def _sign(self, table: pa.Table, rows: list[dict[str, Any]]) -> pa.Table:
        started = time.perf_counter()
        kept = [row["status"] == KEPT for row in rows]
        signed = [sign_document(row["text"], self.dedup, self._prototype) if k else None for row, k in zip(rows, kept)]
        share = (time.perf_counter() - started) / max(sum(kept), 1)  # summed over kept rows only
        columns = {
            "exact_hash": pa.array([s[0] if s else None for s in signed], pa.string()),
            "signature": pa.array([s[1] if s else None for s in signed], pa.binary()),
            "band_keys": pa.array([s[2] if s else None for s in signed], pa.list_(pa.int64())),
            "t_dedup": pa.array([share if k else 0.0 for k in kept], pa.float64()),
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


def _summarize(batch: pa.Table) -> pa.Table:
    """Per-batch counts by (status, reason); summed on the driver."""
    frame = batch.to_pandas()
    frame["bytes_out"] = [len(t.encode("utf-8")) if s in (KEPT, DUPLICATE) else 0
                          for t, s in zip(frame["text"], frame["status"])]
    frame["n"] = 1
    columns = ["n", "bytes_in", "bytes_out", *[f"pii_{k}" for k in PII_KINDS],
               *[c for c in STEP_TIME_COLUMNS if c in frame.columns]]
    grouped = frame.groupby(["status", "reason"], as_index=False)[columns].sum()
    return pa.Table.from_pandas(grouped, preserve_index=False)


# ---------------------------------------------------------------- the job

def _processing_blocks() -> int:
    """Blocks for the per-document work: a few per CPU, so every core is busy and tasks stay few."""
    import ray

    return max(8, 4 * int(ray.cluster_resources().get("CPU", 1)))


def _build_records(cfg: Config, files: list[InputFile]):
    import ray

    parts = []
    if files:
        items = [{"file": asdict(f)} for f in files]
        # One read task per file; the records are then spread over a few blocks per CPU, since a
        # single large file would otherwise be cleaned and filtered by one task on one core.
        parts.append(ray.data.from_items(items, override_num_blocks=len(items)).flat_map(
            _read_file, fn_kwargs={"cfg": cfg.read}).repartition(_processing_blocks()))
    if BUILTIN in cfg.inputs:
        # Parsing the standard library is seconds of work: a few read tasks per CPU share it.
        pieces = builtin_parts(_processing_blocks())
        parts.append(ray.data.from_items(pieces, override_num_blocks=len(pieces)).flat_map(_read_builtin))
    ds = parts[0]
    for part in parts[1:]:
        ds = ds.union(part)
    return ds


def _ids_and_sample(batch: pa.Table, seed: int, rate: float) -> pa.Table:
    """Every kept id, with the text only for documents drawn into the tokenizer's sample."""
    ids = batch.column("id").to_pylist()
    drawn = [unit_hash(i, seed, "tokenizer") < rate for i in ids] if rate > 0 else [False] * len(ids)
    texts = [t if d else None for t, d in zip(batch.column("text").to_pylist(), drawn)]
    return pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string())})


def _aggregate_counts(final) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
    """(counts, totals by (status, reason), CPU seconds of each per-document step) in one pass."""
    totals: dict[tuple[str, str], dict[str, int]] = {}
    seconds = dict.fromkeys(STEP_TIME_COLUMNS, 0.0)
    for row in final.map_batches(_summarize, batch_format="pyarrow").take_all():
        key = (row["status"], row["reason"])
        bucket = totals.setdefault(key, {})
        for name, value in row.items():
            if name in seconds:
                seconds[name] += float(value)
            elif name not in ("status", "reason"):
                bucket[name] = bucket.get(name, 0) + int(value)

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


def _pack(cfg: Config, kept, run: RunDir, model_bytes: bytes, validation_ids: set[str]) -> tuple[dict, float]:

    from model.tokenizer import Tokenizer

    vocab = Tokenizer.from_bytes(model_bytes).vocab_size
    dtype = token_dtype(vocab)
    # Plain tasks: the sentencepiece processor is cached per worker process (see pack.tokenize_batch),
    # so there is no actor pool to start and scale.
    tokenized = kept.select_columns(["id", "text"]).map_batches(
        tokenize_batch, fn_kwargs={"model_bytes": model_bytes, "seed": cfg.seed, "validation_ids": validation_ids},
        batch_format="numpy", batch_size=128,
    ).sort(["order", "id"])

    def write(relpath: str, data: bytes) -> None:
        run.write_bytes(f"{STAGE}/{relpath}", data)

    writers = {split: ShardWriter(split, cfg.pack.sequence_length, cfg.pack.rows_per_shard, dtype, write,
                                  cfg.pack.last_row) for split in ("train", "validation")}
    cpu_seconds = 0.0
    for batch in tokenized.iter_batches(batch_size=256, batch_format="numpy"):
        cpu_seconds += float(np.sum(batch["t_tokenize"]))
        for split, tokens, n_bytes in zip(batch["split"], batch["tokens"], batch["n_bytes"]):
            writers[str(split)].add(np.frombuffer(tokens, dtype=np.uint32), int(n_bytes))
    splits = {split: writer.finish() for split, writer in writers.items()}
    return {"splits": splits, "vocab_size": vocab, "dtype": dtype.name}, cpu_seconds


def run(config: Config) -> dict[str, Any]:
    started = time.time()
    phase: dict[str, float] = {}
    skipped: list[SkippedFile] = []
    files = resolve_inputs(config.inputs, config.read, skipped)  # bad paths fail here, before Ray starts
    if config.tokenizer.path and not (Path(config.tokenizer.path).is_file()
                                      or (Path(config.tokenizer.path) / "tokenizer.model").is_file()):
        raise ConfigError(f"config field 'tokenizer.path': {config.tokenizer.path} not found")
    preset = config.filters.preset
    if preset == "auto":
        preset = "code_docs" if config.inputs == [BUILTIN] else "published"
    filters = effective_filters(config.filters, preset)
    run_dir = RunDir(config.run)
    run_dir.check_writable(STAGE)  # a bad --run fails here in one line, not after the whole job

    import ray
    from ray.data.context import ShuffleStrategy

    from pipelines.ray_env import ensure_ray

    ensure_ray(config.num_cpus)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shard bytes must not depend on task timing
    if config.shuffle == "sort":
        # Ray Data's default hash shuffle starts a pool of aggregator actors for every groupby and
        # sort: about 4 s each, 10-15 s of a job on two cores. The task-based sort shuffle starts
        # nothing and gives the same groups and the same order; the hash shuffle may pay off on
        # large clusters, hence the option.
        ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED

    mark = time.perf_counter()
    # Plain tasks, not actors: the processor holds nothing costly to build, and tasks start faster.
    dedup_on = config.dedup.exact or config.dedup.near
    processor = ProcessBatch(config.clean, filters, config.pii, config.dedup if dedup_on else None)
    processed = _build_records(config, files).map_batches(
        processor, batch_format="pyarrow", batch_size=32).materialize()
    phase["read_clean_filter_pii_sign"] = time.perf_counter() - mark

    mark = time.perf_counter()
    survivors = _status_rows(processed, KEPT)
    removed: dict[str, tuple[str, str]] = {}
    dedup_stats: dict[str, Any] = {}
    if dedup_on:
        removed, dedup_stats = dedup_dataset(survivors, config.dedup, signed=True)
    # The per-step timing columns ride along until the one summary pass below has summed them.
    final = processed.map_batches(_mark_duplicates, fn_kwargs={"removed": removed},
                                  batch_format="pyarrow").materialize()
    phase["dedup"] = time.perf_counter() - mark

    counts, _, step_seconds = _aggregate_counts(final)
    if counts["documents_in"] != counts["kept"] + counts["dropped"] + counts["duplicates"] + counts["quarantined"]:
        raise RuntimeError("data stage: document counts do not add up")  # a bug, not a user error
    step_cpu = {name[2:]: round(step_seconds[name], 3) for name in STEP_TIME_COLUMNS}
    if "cpu_seconds_signatures" in dedup_stats:
        step_cpu["dedup"] = dedup_stats.pop("cpu_seconds_signatures")

    rejects_dir = run_dir.path(STAGE, "rejects")
    run_dir.fs.delete_dir_contents(rejects_dir, missing_dir_ok=True)
    rejected = _status_rows(final, KEPT, keep=False).select_columns(SCHEMA.names)
    if counts["documents_in"] - counts["kept"]:
        rejected.repartition(1).write_parquet(rejects_dir, filesystem=run_dir.fs)

    kept = _status_rows(final, KEPT).select_columns(["id", "text"]).materialize()
    if kept.count() == 0:
        raise ConfigError("no documents survived cleaning and dedup (see data/rejects/; "
                          "relax config field 'filters' or check the inputs)")

    mark = time.perf_counter()
    # One pass gives every kept id (for the split) and the tokenizer's over-sample.
    rows = kept.map_batches(_ids_and_sample, fn_kwargs={"seed": config.seed,
                                                        "rate": _sample_rate(config, counts["bytes_out"])},
                            batch_format="pyarrow").take_all()
    kept_ids = [r["id"] for r in rows]
    sampled = [r for r in rows if r["text"] is not None]
    del rows
    model_bytes, tok_info = _train_or_load_tokenizer(config, sampled)
    run_dir.write_bytes(f"{STAGE}/tokenizer/tokenizer.model", model_bytes)
    phase["tokenizer"] = time.perf_counter() - mark

    mark = time.perf_counter()
    validation_ids = assign_validation(kept_ids, config.seed, config.pack.validation_fraction)
    run_dir.fs.delete_dir_contents(run_dir.path(STAGE, "shards"), missing_dir_ok=True)
    packed, tokenize_cpu = _pack(config, kept, run_dir, model_bytes, validation_ids)
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
        inputs={"inputs": config.inputs, "files": len(files), "filters_preset": preset,
                "skipped_files": [{"path": f.path, "reason": f.reason} for f in skipped],
                "effective_filters": filters.model_dump(mode="json")},
        outputs=outputs, counts=counts,
        figures={"tokenizer": tok_info, "dedup": {**dedup_stats, "duplicates": duplicates},
                 "cpu_seconds_by_step": step_cpu},
        timings={"phases_s": {k: round(v, 3) for k, v in phase.items()}},
    )
    from pipelines.data.report import funnel_png, summary_text

    run_dir.write_bytes(f"{STAGE}/funnel.png", funnel_png(counts, f"data funnel — {config.run}"))
    run_dir.write_manifest(STAGE, manifest)
    print(summary_text(manifest), flush=True)
    return manifest


if __name__ == "__main__":
    stage_main(STAGE)
