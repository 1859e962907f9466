"""``groundup data inspect --run RUN [--reason R] [--n K]``: audit the filters of a data run in a minute.

For every rule that removed documents (``<step>:<rule>``, quarantine reasons and dedup included) it
prints how many it removed and K examples, each with where it came from and the part of the text that
triggered the rule (the line, the n-gram, the character, the ratio) as the step recorded it.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from pipelines.config import ConfigError
from pipelines.rundir import RunDir

STAGE = "data"


def _parser() -> argparse.ArgumentParser:
    from pipelines.cli import _Parser

    parser = _Parser(prog="groundup data inspect",
                     description="per filter rule of a data run: the documents it removed and examples with "
                                 "the part of the text that triggered it")
    parser.add_argument("--run", required=True, help="run directory of a finished data stage")
    parser.add_argument("--reason", default=None, help="only rules whose name starts with this (e.g. fineweb, c4:curly_bracket)")
    parser.add_argument("--n", type=int, default=3, help="examples per rule (default 3)")
    return parser


def load_rejects(run: RunDir) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    if not run.exists(STAGE, "rejects"):
        return []
    wanted = ["id", "reason", "detail", "location", "preset", "text", "duplicate_of"]
    table = pq.read_table(run.path(STAGE, "rejects"), filesystem=run.fs)
    rows = table.select([c for c in wanted if c in table.column_names]).to_pylist()
    for row in rows:  # runs written before the detail and preset columns existed
        for name in wanted:
            row.setdefault(name, "")
    return rows


def report(run_uri: str, reason: str | None = None, n: int = 3) -> str:
    if n < 0:
        raise ConfigError("--n: give 0 or more examples per rule")
    run = RunDir(run_uri)
    manifest = run.read_manifest(STAGE)  # one-line ConfigError when the stage has not run there
    counts = manifest["counts"]
    by_reason = {r: c for r, c in counts["by_reason"].items() if reason is None or r.startswith(reason)}
    if not by_reason:
        known = ", ".join(sorted(counts["by_reason"])) or "none"
        raise ConfigError(f"--reason {reason}: no document was removed by such a rule (rules that removed: {known})")
    examples: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(load_rejects(run), key=lambda r: r["id"]):
        bucket = examples.setdefault(row["reason"], [])
        if row["reason"] in by_reason and len(bucket) < n:
            bucket.append(row)
    lines = [f"data inspect: {run_uri} — {counts['documents_in']:,} documents in, {counts['kept']:,} kept, "
             f"{sum(counts['by_reason'].values()):,} removed"]
    for rule, count in sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0])):
        share = 100.0 * count / max(counts["documents_in"], 1)
        lines.append("")
        lines.append(f"{rule}: {count:,} removed ({share:.1f}% of the input)")
        for row in examples.get(rule, []):
            detail = row["detail"] or (f"duplicate of {row['duplicate_of']}" if row["duplicate_of"] else "")
            preset = f" [{row['preset']}]" if row["preset"] else ""
            lines.append(f"  - {row['location']}{preset}")
            if detail:
                lines.append(f"      triggered by: {detail}")
            snippet = " ".join(row["text"].split())[:160]
            lines.append(f"      text: {snippet!r}")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    args = _parser().parse_args(list(argv))
    print(report(args.run, args.reason, args.n))
