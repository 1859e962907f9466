"""The whole data stage on the session's two-node Ray cluster, and the CLI's handling of bad input."""
from __future__ import annotations

import gzip
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.config import build_config
from pipelines.data.builtin import iter_builtin_documents

DECONTAMINATE = "benchmark question: what is the airspeed of an unladen swallow"


def write_corpus(root: Path) -> dict[str, str]:
    """Built-in docs as JSONL plus planted duplicates, hostile lines, a truncated archive and HTML."""
    docs = [d for d in iter_builtin_documents() if d["id"].startswith("pydoc:")][:60]
    lines = [json.dumps({"text": d["text"], "origin": d["id"]}) for d in docs]
    lines.append(json.dumps({"text": docs[0]["text"].upper()}))           # exact duplicate of line 1
    words = docs[1]["text"].split(" ")
    words[len(words) // 2] = "CHANGED"
    lines.append(json.dumps({"text": " ".join(words)}))                   # near duplicate of line 2
    lines.append(json.dumps({"text": docs[7]["text"] + "\n\n" + DECONTAMINATE.capitalize() + "?"}))
    lines += ["{broken json mail jane.doe@example.org", json.dumps({"no_text": 1}), "[1]"]
    (root / "docs.jsonl").write_bytes("\n".join(lines).encode() + b"\n\xff\xfe\n")
    more = b"".join(json.dumps({"text": d["text"]}).encode() + b"\n" for d in docs[:3])
    (root / "cut.jsonl.gz").write_bytes(gzip.compress(more * 4)[:-40])   # truncated archive
    (root / ".hidden.jsonl").write_text(json.dumps({"text": docs[0]["text"]}) + "\n")
    (root / "gone.jsonl").symlink_to(root / "missing.jsonl")
    (root / "page.html").write_text(
        f"<html><body><nav>Home | Login</nav><article><p>{docs[5]['text'][:2000]}</p></article></body></html>")
    return {"exact": "docs.jsonl:61", "near": "docs.jsonl:62"}


def run_stage(inputs: list[str], run: Path, *extra: str):
    from pipelines.data.stage import Config
    from pipelines.data.stage import run as run_data
    from pipelines.data.steps import DEFAULT_STEPS

    user_step = "pipelines.data.steps:Decontaminate"  # a step given as module:Class in the config
    config = build_config(Config, values={"inputs": inputs, "run": str(run), "steps": [*DEFAULT_STEPS, user_step],
                                          "step_config": {user_step: {"phrases": [DECONTAMINATE]}}}, overrides=[
        "filters.preset=code_docs", "tokenizer.vocab_size=512", "pack.sequence_length=64",
        "pack.rows_per_shard=200", "pack.validation_fraction=0.1", *extra])
    return run_data(config)


@pytest.mark.ray
def test_stage_end_to_end_counts_rejects_and_byte_identical_rerun(ray_cluster, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    planted = write_corpus(corpus)
    first = run_stage([str(corpus)], tmp_path / "run1")
    # The re-run dedups by Ray Data's shuffles, not on the driver: the same bytes either way.
    second = run_stage([str(corpus)], tmp_path / "run2", "dedup.local_max_documents=0")

    counts = first["counts"]
    assert counts["documents_in"] == counts["kept"] + counts["dropped"] + counts["duplicates"] + counts["quarantined"]
    assert sum(counts["by_reason"].values()) == counts["documents_in"] - counts["kept"]
    for reason in ("quarantine:malformed_json", "quarantine:missing_text_field", "quarantine:not_a_json_object",
                   "quarantine:invalid_utf8", "quarantine:truncated_archive"):
        assert counts["by_reason"].get(reason) == 1, reason
    dups = first["figures"]["dedup"]["duplicates"]
    # The archive repeats documents 1-3; the smallest id of each group is kept.
    assert dups[f"corpus/{planted['exact']}"] == dups["corpus/docs.jsonl:1"]
    assert dups[f"corpus/{planted['near']}"] == dups["corpus/docs.jsonl:2"]
    assert dups["corpus/docs.jsonl:1"].startswith("corpus/cut.jsonl.gz:")

    data = tmp_path / "run1" / "data"
    rejects = pq.read_table(data / "rejects").to_pylist()
    assert len(rejects) == counts["documents_in"] - counts["kept"]
    assert {r["reason"] for r in rejects} == set(counts["by_reason"])
    assert all(r["location"] for r in rejects)
    assert not any("jane.doe@example.org" in r["text"] for r in rejects)  # PII masked in rejects too
    assert counts["files_skipped_by_reason"] == {"dangling_symlink": 1, "hidden": 1}
    assert counts["by_reason"]["decontaminate:contains_phrase"] == 1  # the user step's rejection, counted
    assert first["figures"]["cpu_seconds_by_step"].keys() >= {"clean", "c4", "pii", "decontaminate", "dedup"}
    assert counts["by_preset"]["code_docs"]["documents"] > 60

    # groundup data inspect: per rule, how many it removed and examples with what triggered it.
    from pipelines.data.inspect import report

    audit = report(str(tmp_path / "run1"), "decontaminate", 2)
    assert "decontaminate:contains_phrase: 1 removed" in audit and "triggered by:" in audit and DECONTAMINATE in audit.lower()
    shown = subprocess.run([sys.executable, "-m", "pipelines.cli", "data", "inspect", "--run", str(tmp_path / "run1"),
                            "--n", "1"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    for rule in counts["by_reason"]:
        assert f"{rule}: {counts['by_reason'][rule]:,} removed" in shown.stdout
    reason_of = {r["id"]: r["reason"] for r in rejects}
    assert reason_of[f"corpus/{planted['exact']}"] == "dedup:exact"
    assert reason_of[f"corpus/{planted['near']}"] == "dedup:near"

    out = first["outputs"]
    assert out["eos_id"] == 3 and out["dtype"] == "uint16" and out["tokenizer"] == "tokenizer/tokenizer.model"
    assert (data / out["tokenizer"]).is_file() and (data / out["funnel_png"]).read_bytes()[:4] == b"\x89PNG"
    documents = 0
    for split in ("train", "validation"):
        info = out["splits"][split]
        assert info["documents"] > 0 and info["bytes"] > 0
        rows = [np.load(data / shard["path"]) for shard in info["shards"]]
        assert all(r.shape[1] == 65 and r.dtype == np.uint16 for r in rows)
        assert sum(len(r) for r in rows) == info["rows"]
        stream = np.concatenate(rows).reshape(-1)
        assert int((stream == 3).sum()) == info["documents"] + info["padding_tokens"]
        assert info["tokens"] == len(stream) - info["padding_tokens"]
        documents += info["documents"]
        shard_bytes = [(data / s["path"]).read_bytes() for s in info["shards"]]
        again = [(tmp_path / "run2" / "data" / s["path"]).read_bytes() for s in second["outputs"]["splits"][split]["shards"]]
        assert shard_bytes == again
    assert documents == counts["kept"]
    assert (data / out["tokenizer"]).read_bytes() == (tmp_path / "run2" / "data" / out["tokenizer"]).read_bytes()
    assert second["counts"] == counts and second["figures"]["dedup"]["duplicates"] == dups


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.data", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, timeout=120)


@pytest.mark.parametrize("args, needle", [
    (["--input", "/definitely/missing.jsonl", "--run", "RUN"], "/definitely/missing.jsonl"),
    (["--input", "builtin", "--run", "RUN", "dedup.bands=100"], "dedup"),
    (["--input", "builtin", "--run", "RUN", "filters.c4.no_such_rule=1"], "filters.c4.no_such_rule"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, args, needle):
    result = _cli(*[a.replace("RUN", str(tmp_path / "run")) for a in args], cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr


@pytest.mark.ray
def test_a_large_compressed_file_is_processed_in_chunks_in_input_order(ray_cluster, tmp_path, monkeypatch):
    """A compressed file cannot be cut into byte ranges: one task reads it in chunks that other tasks
    process. The blocks hold exactly the file's records, in order, each processed as in one process."""
    import io

    import pyarrow as pa
    import ray

    from pipelines.console import Progress
    from pipelines.data import stage
    from pipelines.data.readers import read_input_file, resolve_inputs
    from pipelines.data.records import to_table
    from pipelines.data.stage import Config, ProcessBatch, _process_all, plan_read_units
    from pipelines.data.steps import build_steps

    monkeypatch.setattr(stage, "MIN_CHUNK_BYTES", 100_000)

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = list(itertools.islice(iter_builtin_documents(), 150))  # about 0.5 MB: several chunks
    (corpus / "big.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps({"text": d["text"]}) + "\n"
                                                                for d in docs).encode(), compresslevel=1))
    (corpus / "small.jsonl").write_text(json.dumps({"text": docs[0]["text"]}) + "\n")
    config = build_config(Config, values={"inputs": [str(corpus)], "run": str(tmp_path / "run")}, overrides=[])
    files = resolve_inputs(config.inputs, config.read, [])
    assert [u.chunked for u in plan_read_units(config, files)] == [True, False]

    processor = ProcessBatch(build_steps(config.steps, config, sign=True), config.pii, config.filters.preset)
    with Progress("test", stream=io.StringIO()) as progress:
        blocks, metas = _process_all(config, files, processor, progress)
    assert len(blocks) >= 3  # the big file's chunks, then the small file
    got = pa.concat_tables(ray.get(blocks))
    expected = processor(to_table([r for f in files for r in read_input_file(f, config.read)]))
    columns = ["id", "status", "reason", "text", "exact_hash"]
    assert got.select(columns).to_pylist() == expected.select(columns).to_pylist()
    assert [sum(m[k] for m in metas) for k in ("documents", "kept")] == [len(docs) + 1, got.column("status").to_pylist().count("kept")]


def test_an_empty_block_finishes_and_tokenizes_to_nothing(builtin_tokenizer):
    """A read unit can hold no document (a built-in part without modules, a file of blank lines): its
    block adds no count, no kept document, no reject and no token."""
    from pipelines.data.clean import CleanConfig
    from pipelines.data.dedup import DedupConfig
    from pipelines.data.filters import FiltersConfig
    from pipelines.data.pii import PIIConfig
    from pipelines.data.records import to_table
    from pipelines.data.stage import ProcessBatch, _aggregate_counts, _finish_block, _tokenize_block

    empty = ProcessBatch.from_configs(CleanConfig(), FiltersConfig(), PIIConfig(), DedupConfig())(to_table([]))
    small, kept, rejects = _finish_block(empty, {}, 0, 1.0)
    assert small == {"summary": [], "ids": [], "sampled": []} and kept.num_rows == rejects.num_rows == 0
    assert _aggregate_counts(small["summary"])[0]["documents_in"] == 0
    tokens = _tokenize_block(kept, builtin_tokenizer.model_bytes, 0, set())
    assert all(len(values) == 0 for values in tokens.values())
