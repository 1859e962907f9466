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

import dataclasses
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
from pipelines.console import Progress
from pipelines.config import ConfigError, StageConfig
from pipelines.data.clean import CleanConfig
from pipelines.data.dedup import DedupConfig, dedup_dataset
from pipelines.data.filters import PRESETS, FiltersConfig, effective_filters
from pipelines.data.pack import (PackConfig, ShardWriter, TokenizerConfig, assign_validation,
                                 select_training_sample, token_dtype, tokenize_batch, unit_hash)
from pipelines.data.pii import PIIConfig, redact
from pipelines.data.steps import DEFAULT_STEPS, Doc, Pipeline, Rejection, SignStep, Step, build_steps
from pipelines.data.readers import (BUILTIN, InputFile, ReadConfig, SkippedFile, builtin_parts, read_builtin_part,
                                    read_input_file, resolve_inputs, split_ranges)
from pipelines.data.records import DROPPED, DUPLICATE, KEPT, PII_KINDS, QUARANTINED, SCHEMA, to_table
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
        "sort", description="shuffle for dedup's groupbys and the packing sort: Ray Data's task-based sort "
                            "shuffle, or whatever Ray Data's context says (its hash shuffle, with actors)")

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

def _read_files(row: dict[str, Any], cfg: ReadConfig) -> list[dict[str, Any]]:
    """The records of one read task: a group of small files, or one byte range of a large one."""
    records: list[dict[str, Any]] = []
    for item in row["files"]:
        f = InputFile(**item)
        start = len(records)
        records.extend(read_input_file(f, cfg))
        if f.preset:
            for record in records[start:]:
                record["preset"] = f.preset
    return records


def _file_sizes(files: list[InputFile]) -> list[int]:
    sizes = []
    for f in files:
        fs, path = resolve_filesystem(f.uri)
        sizes.append(fs.get_file_info(path).size or 0)
    return sizes


def balance_read_tasks(files: list[InputFile], sizes: list[int], tasks: int, cfg: ReadConfig) -> tuple[list[list[InputFile]], bool]:
    """Read tasks of about equal bytes: large uncompressed line files are cut into byte ranges, small
    files are grouped (in order). Returns (tasks, whether a task still holds much more than its
    share: one large compressed file, which only repartitioning the records can spread)."""
    total = sum(sizes)
    target = max(total // max(tasks, 1), 1 << 16)
    pieces: list[tuple[InputFile, int]] = []
    for f, size in zip(files, sizes):
        ranges = split_ranges(f, size, target, cfg)
        pieces.extend((r, (r.end - r.start) if r.end >= 0 else size) for r in ranges)
    groups: list[list[InputFile]] = []
    current: list[InputFile] = []
    held = 0
    for f, size in pieces:
        if current and held + size > target:
            groups.append(current)
            current, held = [], 0
        current.append(f)
        held += size
    if current:
        groups.append(current)
    uneven = any(size > 2 * target for _, size in pieces)
    return groups, uneven


def _read_builtin(row: dict[str, Any]) -> list[dict[str, Any]]:
    stdlib = row["stdlib"]
    return read_builtin_part({"stdlib": None if stdlib is None else [str(p) for p in stdlib]})


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
                     dedup: DedupConfig | None = None) -> "ProcessBatch":
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


def _summarize(batch: pa.Table) -> pa.Table:
    """Per-batch counts by (status, reason, preset, source), and the steps' seconds (a JSON object on
    the first row); summed on the driver."""
    frame = batch.select([c for c in batch.column_names if c not in ("signature", "band_keys")]).to_pandas()
    frame["bytes_out"] = [len(t.encode("utf-8")) if s in (KEPT, DUPLICATE) else 0
                          for t, s in zip(frame["text"], frame["status"])]
    frame["n"] = 1
    columns = ["n", "bytes_in", "bytes_out", *[f"pii_{k}" for k in PII_KINDS]]
    grouped = frame.groupby(["status", "reason", "preset", "source"], as_index=False)[columns].sum()
    seconds: dict[str, float] = {}
    if "step_seconds" in frame.columns:
        for value in frame["step_seconds"]:
            if value and value != "{}":
                for name, t in json.loads(value).items():
                    seconds[name] = seconds.get(name, 0.0) + t
    grouped["step_seconds"] = [json.dumps(seconds)] + ["{}"] * (len(grouped) - 1)
    return pa.Table.from_pandas(grouped, preserve_index=False)


# ---------------------------------------------------------------- the job

def _bytes_in(batch: pa.Table) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(batch.column("bytes_in")).as_py() or 0)


def _materialize_with_progress(ds, progress: Progress, expected_blocks: int):
    """``ds.materialize()`` with a progress line: documents (block metadata), input MB (a tiny task per
    block) and an ETA from the share of the expected blocks done. Same blocks, same order."""
    import ray

    try:
        from ray.data._internal.logical.interfaces import LogicalPlan
        from ray.data._internal.logical.operators.input_data_operator import InputData
        from ray.data.dataset import MaterializedDataset
    except ImportError:  # another Ray Data layout: no progress, same result
        return ds.materialize()
    # A sliver of a CPU, not zero: a zero-CPU task runs beside the busy workers and so makes Ray start
    # a new worker process (seconds of CPU each); this one waits for a worker between two batches.
    count_bytes = ray.remote(num_cpus=0.001)(_bytes_in)
    bundles, pending, done = [], [], 0
    for bundle in ds.iter_internal_ref_bundles():
        bundles.append(dataclasses.replace(bundle, owns_blocks=False))  # our list keeps the blocks
        for entry in bundle.blocks:
            ref, meta = (entry.ref, entry.metadata) if hasattr(entry, "ref") else entry
            pending.append(count_bytes.remote(ref))
            done += 1
            progress.update(meta.num_rows or 0, 0, min(done / max(expected_blocks, 1), 0.99))
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
        progress.update(0, sum(ray.get(ready)))
    progress.update(0, sum(ray.get(pending)))
    if not bundles:
        return ds.materialize()
    output = MaterializedDataset(LogicalPlan(InputData(input_data=bundles), ds.context), ds.context,
                                 ds._raw_stats())
    output._execute()
    return output


def _processing_blocks() -> int:
    """Blocks for the per-document work: a few per CPU, so every core is busy and tasks stay few."""
    import ray

    return max(8, 4 * int(ray.cluster_resources().get("CPU", 1)))


def _build_records(cfg: Config, files: list[InputFile]):
    import ray

    parts, blocks = [], 0
    if files:
        # Read tasks balanced by bytes (large line files in byte ranges, small files grouped): each
        # task then reads, cleans, filters and signs its share in one fused Ray Data task. Only a large
        # file that cannot be cut (compressed) has its records spread over blocks by a repartition.
        groups, uneven = balance_read_tasks(files, _file_sizes(files), _processing_blocks(), cfg.read)
        items = [{"files": [asdict(f) for f in group]} for group in groups]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).flat_map(_read_files, fn_kwargs={"cfg": cfg.read})
        parts.append(ds.repartition(_processing_blocks()) if uneven else ds)
        blocks += _processing_blocks() if uneven else len(items)
    if BUILTIN in cfg.inputs:
        # Parsing the standard library is seconds of work: a few read tasks per CPU share it.
        pieces = builtin_parts(_processing_blocks())
        parts.append(ray.data.from_items(pieces, override_num_blocks=len(pieces)).flat_map(_read_builtin))
        blocks += len(pieces)
    ds = parts[0]
    for part in parts[1:]:
        ds = ds.union(part)
    return ds, blocks


def _ids_and_sample(batch: pa.Table, seed: int, rate: float) -> pa.Table:
    """Every kept id, with the text only for documents drawn into the tokenizer's sample."""
    ids = batch.column("id").to_pylist()
    drawn = [unit_hash(i, seed, "tokenizer") < rate for i in ids] if rate > 0 else [False] * len(ids)
    texts = [t if d else None for t, d in zip(batch.column("text").to_pylist(), drawn)]
    return pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string())})


def _aggregate_counts(final) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
    """(counts, totals by (status, reason), CPU seconds of each per-document step) in one pass."""
    totals: dict[tuple[str, str], dict[str, int]] = {}
    seconds: dict[str, float] = {}
    presets: dict[str, dict[str, int]] = {}
    by_source: dict[str, dict[str, int]] = {}
    for row in final.map_batches(_summarize, batch_format="pyarrow").take_all():
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
    with Progress("data: tokenize, pack", total=kept.count()) as progress:
        for batch in tokenized.iter_batches(batch_size=256, batch_format="numpy"):
            cpu_seconds += float(np.sum(batch["t_tokenize"]))
            for split, tokens, n_bytes in zip(batch["split"], batch["tokens"], batch["n_bytes"]):
                writers[str(split)].add(np.frombuffer(tokens, dtype=np.uint32), int(n_bytes))
            progress.update(len(batch["split"]), int(np.sum(batch["n_bytes"])))
    splits = {split: writer.finish() for split, writer in writers.items()}
    return {"splits": splits, "vocab_size": vocab, "dtype": dtype.name}, cpu_seconds


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
    from ray.data.context import ShuffleStrategy

    from pipelines.ray_env import ensure_ray

    mark = time.perf_counter()
    ensure_ray(config.num_cpus)
    phase["ray_start"] = time.perf_counter() - mark
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
    processor = ProcessBatch(steps, config.pii, config.filters.preset)
    records, expected_blocks = _build_records(config, files)
    with Progress("data: read, clean, filter, PII, sign") as progress:
        processed = _materialize_with_progress(records.map_batches(processor, batch_format="pyarrow", batch_size=32),
                                               progress, expected_blocks)
    phase["read_clean_filter_pii_sign"] = time.perf_counter() - mark

    mark = time.perf_counter()
    survivors = _status_rows(processed, KEPT)
    removed: dict[str, tuple[str, str]] = {}
    dedup_stats: dict[str, Any] = {}
    with Progress("data: dedup") as progress:
        if dedup_on:
            removed, dedup_stats = dedup_dataset(survivors, config.dedup, signed=True)
            progress.update(dedup_stats.get("documents", 0))
        # The per-step timing columns ride along until the one summary pass below has summed them.
        # Not materialised: marking is cheap, so each pass below (summary, rejects, kept) marks the
        # processed blocks itself, in its own job, instead of a job of its own writing a copy.
        final = processed.map_batches(_mark_duplicates, fn_kwargs={"removed": removed}, batch_format="pyarrow")
    phase["dedup"] = time.perf_counter() - mark

    mark = time.perf_counter()
    counts, _, step_seconds = _aggregate_counts(final)
    if counts["documents_in"] != counts["kept"] + counts["dropped"] + counts["duplicates"] + counts["quarantined"]:
        raise RuntimeError("data stage: document counts do not add up")  # a bug, not a user error
    step_cpu = {name: round(value, 3) for name, value in step_seconds.items()}
    dedup_stats.pop("cpu_seconds_signatures", None)  # the signing is the pipeline's "dedup" step

    rejects_dir = run_dir.path(STAGE, "rejects")
    run_dir.fs.delete_dir_contents(rejects_dir, missing_dir_ok=True)
    rejected = _status_rows(final, KEPT, keep=False).select_columns(SCHEMA.names)
    if counts["documents_in"] - counts["kept"]:
        rejected.repartition(1).write_parquet(rejects_dir, filesystem=run_dir.fs)

    kept = _status_rows(final, KEPT).select_columns(["id", "text"]).materialize()
    if kept.count() == 0:
        raise ConfigError("no documents survived cleaning and dedup (see data/rejects/; "
                          "relax config field 'filters' or check the inputs)")

    phase["counts_rejects"] = time.perf_counter() - mark
    mark = time.perf_counter()
    # One pass gives every kept id (for the split) and the tokenizer's over-sample.
    rows = kept.map_batches(_ids_and_sample, fn_kwargs={"seed": config.seed,
                                                        "rate": _sample_rate(config, counts["bytes_out"])},
                            batch_format="pyarrow").take_all()
    kept_ids = [r["id"] for r in rows]
    sampled = [r for r in rows if r["text"] is not None]
    del rows
    with Progress("data: tokenizer" + (" (reused)" if config.tokenizer.path else " training"), unit="docs") as progress:
        model_bytes, tok_info = _train_or_load_tokenizer(config, sampled)
        progress.update(tok_info.get("sample_documents", 0), tok_info.get("sample_bytes", 0))
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
    from pipelines.data.report import funnel_png, summary_text

    run_dir.write_bytes(f"{STAGE}/funnel.png", funnel_png(counts, f"data funnel — {config.run}"))
    run_dir.write_manifest(STAGE, manifest)
    print(summary_text(manifest), flush=True)
    return manifest


if __name__ == "__main__":
    stage_main(STAGE)
