"""``groundup prefs export``: stored votes -> preference pairs for reward modelling.

Each vote yields one pair per (better, worse) answer: every answer in a better group against every
answer in a worse group. Ties and "all bad" votes yield none. A pair is

    {"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message], ...provenance}

(TRL's conversational preference format) with provenance: models and versions, the rater, the time of
the vote, its uid. Pairs are split into train and validation *by prompt* — a hash of the prompt
messages and the seed decides — so the same prompt never lands in both splits, however often it
was rated. Files go to ``<output>/train.{jsonl,parquet}`` and ``<output>/validation.{...}``, written
atomically; the manifest (with the Bradley–Terry leaderboard of the same votes, and its plot
``leaderboard.png``) goes to ``<run>/prefs/``.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any, Literal

from pydantic import Field, field_validator

from pipelines.cli import Flag
from pipelines.config import ConfigError, StageConfig
from pipelines.rundir import RunDir, is_local
from ui.ratings import compute_ratings, leaderboard_png
from ui.store import PreferenceStore, VoteRecord

STAGE = "prefs"
SPLITS = ("train", "validation")


class Config(StageConfig):
    database: str | None = Field(None, description="SQLAlchemy URL or SQLite file"
                                 " (default: <run>/ui/preferences.db)")
    output: str | None = Field(None, description="folder (path or URI) for the pair files"
                               " (default: <run>/prefs)")
    format: Literal["jsonl", "parquet"] = "jsonl"
    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of prompts held out")
    rater: str | None = Field(None, description="export only this rater's votes")
    exclude_flags: list[str] = Field(default_factory=list,
                                     description="skip votes carrying any of these flags")

    @field_validator("exclude_flags", mode="before")
    @classmethod
    def _split_flags(cls, value: Any) -> Any:
        return [f for f in value.split(",") if f] if isinstance(value, str) else value

    def database_url(self) -> str:
        if self.database:
            return self.database
        if not is_local(self.run):
            raise ConfigError("database: required when the run directory is not local")
        return str(RunDir(self.run).local_path("ui", "preferences.db"))

    def output_dir(self) -> str:
        return self.output or RunDir(self.run).uri_of(STAGE)


CLI_FLAGS: tuple[Flag, ...] = (
    Flag(("--run",), "run", "run directory: votes default to <run>/ui/preferences.db, pairs go to <run>/prefs/"),
    Flag(("--database",), "database", "SQLAlchemy URL or SQLite file of the preference store"),
    Flag(("--output",), "output", "folder (path or s3://, gs:// URI) for train/validation files"),
    Flag(("--format",), "format", "jsonl or parquet", {"choices": ["jsonl", "parquet"]}),
    Flag(("--validation-fraction",), "validation_fraction", "share of prompts held out", {"type": float}),
    Flag(("--rater",), "rater", "export only this rater's votes"),
)


def prompt_id(messages: Iterable[Any]) -> str:
    """A stable id of a prompt conversation: sha256 of its canonical JSON."""
    canonical = [m.model_dump() if hasattr(m, "model_dump") else dict(m) for m in messages]
    data = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(data.encode("utf-8")).hexdigest()[:32]


def split_of(prompt: str, seed: int, validation_fraction: float) -> str:
    """'validation' for a seeded-hash share of prompts, else 'train' (the same for every rating of it)."""
    digest = hashlib.sha256(f"{seed}:{prompt}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    return "validation" if position < validation_fraction else "train"


def vote_pairs(vote: VoteRecord) -> list[dict[str, Any]]:
    """The preference pairs one vote implies, with provenance; none for ties and "all bad"."""
    if vote.outcome != "ranked":
        return []
    prompt = [m.model_dump() for m in vote.messages]
    pid = prompt_id(vote.messages)
    pairs = []
    for rank, group in enumerate(vote.ranking):
        for gap, worse_group in enumerate(vote.ranking[rank + 1:], start=1):
            for better in group:
                for worse in worse_group:
                    chosen, rejected = vote.candidates[better], vote.candidates[worse]
                    pairs.append({
                        "prompt": prompt,
                        "chosen": [{"role": "assistant", "content": chosen.content}],
                        "rejected": [{"role": "assistant", "content": rejected.content}],
                        "prompt_id": pid,
                        "vote_uid": vote.uid,
                        "chosen_model": chosen.model,
                        "chosen_model_version": chosen.model_version,
                        "rejected_model": rejected.model,
                        "rejected_model_version": rejected.model_version,
                        "rank_gap": gap,  # 1: adjacent groups; larger: a clearer preference
                        "rater": vote.rater,
                        "created_at": vote.created_at.isoformat(),
                        "queue_entry": vote.queue_entry,  # a pair queued by groundup evaluate (None: the app's own)
                    })
    return pairs


def _encode(rows: list[dict[str, Any]], fmt: str) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([
        ("prompt", pa.list_(message)), ("chosen", pa.list_(message)), ("rejected", pa.list_(message)),
        ("prompt_id", pa.string()), ("vote_uid", pa.string()),
        ("chosen_model", pa.string()), ("chosen_model_version", pa.string()),
        ("rejected_model", pa.string()), ("rejected_model_version", pa.string()),
        ("rank_gap", pa.int32()), ("rater", pa.string()), ("created_at", pa.string()),
        ("queue_entry", pa.int64()),
    ])
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
    return buffer.getvalue()


def run(config: Config) -> dict[str, Any]:
    started = time.time()
    from pipelines.rundir import new_manifest

    database = config.database_url()
    with PreferenceStore(database, create=False) as store:
        votes = store.votes(rater=config.rater)

    counts = {"votes": len(votes), "votes_tied": 0, "votes_not_rankable": 0, "votes_excluded_by_flag": 0,
              "pairs_train": 0, "pairs_validation": 0, "prompts_train": 0, "prompts_validation": 0}
    rows: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    prompts: dict[str, set[str]] = {split: set() for split in SPLITS}
    excluded = set(config.exclude_flags)
    for vote in votes:
        if excluded & set(vote.flags):
            counts["votes_excluded_by_flag"] += 1
            continue
        if vote.outcome == "not_rankable":
            counts["votes_not_rankable"] += 1
        elif len(vote.ranking) == 1:
            counts["votes_tied"] += 1
        for pair in vote_pairs(vote):
            split = split_of(pair["prompt_id"], config.seed, config.validation_fraction)
            rows[split].append(pair)
            prompts[split].add(pair["prompt_id"])
    for split in SPLITS:
        counts[f"pairs_{split}"] = len(rows[split])
        counts[f"prompts_{split}"] = len(prompts[split])

    out = RunDir(config.output_dir())
    outputs = {split: out.write_bytes(f"{split}.{config.format}", _encode(rows[split], config.format))
               for split in SPLITS}
    # The leaderboard of the same votes, so a run records how its models compared.
    board = compute_ratings(votes, bootstrap=200, seed=config.seed)
    figures = {}
    if board:
        figures["leaderboard"] = RunDir(config.run).write_bytes(f"{STAGE}/leaderboard.png", leaderboard_png(board))
    manifest = new_manifest(STAGE, config, started, inputs={"database": _redact(database)}, outputs=outputs,
                            counts=counts, figures=figures, ratings=[asdict(r) for r in board])
    manifest["outputs"]["manifest"] = RunDir(config.run).write_manifest(STAGE, manifest)
    print(f"prefs export: {counts['votes']} votes -> {counts['pairs_train']} train pairs "
          f"({counts['prompts_train']} prompts), {counts['pairs_validation']} validation pairs "
          f"({counts['prompts_validation']} prompts); {counts['votes_tied']} ties and "
          f"{counts['votes_not_rankable']} 'all bad' votes give no pairs")
    for split, path in outputs.items():
        print(f"  {split:10s} {path}")
    return manifest


def _redact(url: str) -> str:
    """Never write a database password into a manifest."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True) if "://" in url else url
    except Exception:
        return url


if __name__ == "__main__":
    from pipelines.cli import stage_main

    stage_main("prefs export")
