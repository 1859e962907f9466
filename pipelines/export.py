"""``groundup export MODEL_DIR --format hf OUT`` (and back with ``--from-hf``).

The Hugging Face conversion of :mod:`model.hf`, reachable from the CLI, so that
``lm_eval --model hf --model_args pretrained=OUT`` and ``transformers`` users need no Python of ours.
``MODEL_DIR`` and ``OUT`` may be local paths or object-store URIs. The output is written next to its
final place and renamed into it (or uploaded whole), so an interrupted export never looks complete.

Also home of :func:`open_model`, which every consumer of "a model path" outside serving uses: our
checkpoint or a Hugging Face Llama directory, with one-line errors for anything else.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pipelines.cli import Flag, stage_main
from pipelines.config import ConfigError, StrictModel
from pipelines.rundir import is_local, local_copy, resolve_filesystem, upload

STAGE = "export"


class Config(StrictModel):
    source: str = Field(..., description="model directory to convert (our checkpoint, or a Hugging Face "
                        "Llama directory with --from-hf)")
    output: str = Field(..., description="directory to write")
    format: Literal["hf"] = Field("hf", description="export format: hf (Hugging Face LlamaForCausalLM)")
    from_hf: bool = Field(False, description="convert a Hugging Face Llama directory into our checkpoint format")
    overwrite: bool = Field(False, description="replace an existing non-empty output directory")


CLI_FLAGS = (
    Flag(("--format",), "format", "export format: hf"),
    Flag(("--from-hf",), "from_hf", "import a Hugging Face Llama directory into our checkpoint format",
         {"action": "store_const", "const": True}),
    Flag(("--overwrite",), "overwrite", "replace an existing output directory", {"action": "store_const", "const": True}),
)
# Positional arguments (in this order) for `groundup export MODEL_DIR OUT`: see pipelines.cli.run_stage.
POSITIONALS = ("source", "output")


def _local_dir(path: str, what: str) -> Path:
    try:
        directory = local_copy(path) if not is_local(path) else Path(path).expanduser()
    except ConfigError as err:
        raise ConfigError(f"{what} {path}: {err}") from None
    if not directory.is_dir():
        raise ConfigError(f"{what} {path}: no such directory")
    return directory


def open_model(path: str, device: Any = "cpu", dtype: Any = None):
    """(model, tokenizer, format) for our checkpoint or a Hugging Face Llama directory (local or URI).

    Anything else is a :class:`ConfigError` whose one line names the path and what is wrong."""
    import torch

    from model.checkpoint import CheckpointError, load_model, load_tokenizer
    from model.hf import import_hf, is_hf_directory

    directory = _local_dir(path, "model")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"model {path}: not a model (no config.json)")
    try:
        json.loads(config_path.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"model {path}: config.json is not valid JSON") from None
    dtype = dtype or torch.float32
    try:
        if is_hf_directory(directory):
            model, tokenizer = import_hf(directory)
            if tokenizer is None:
                raise ConfigError(f"model {path}: no tokenizer.model beside the weights")
            return model.to(device=device, dtype=dtype).eval(), tokenizer, "hf"
        return load_model(directory, device, dtype), load_tokenizer(directory), "groundup"
    except (CheckpointError, FileNotFoundError, KeyError, TypeError) as err:
        raise ConfigError(f"model {path}: not a model ({str(err).splitlines()[0]})") from None
    except ValueError as err:  # pydantic validation of config.json, mismatched weights, bad tokenizer
        raise ConfigError(f"model {path}: not a model ({str(err).splitlines()[0]})") from None


def _check_output(output: str, overwrite: bool) -> None:
    fs, where = resolve_filesystem(output)
    import pyarrow.fs as pafs

    info = fs.get_file_info(where)
    if info.type == pafs.FileType.File:
        raise ConfigError(f"output {output}: a file is in the way")
    if info.type == pafs.FileType.Directory and not overwrite:
        if fs.get_file_info(pafs.FileSelector(where, allow_not_found=True)):
            raise ConfigError(f"output {output}: exists and is not empty (add --overwrite to replace it)")


def run(config: Config) -> dict[str, Any]:
    started = time.time()
    from model.checkpoint import save_checkpoint
    from model.hf import export_hf, is_hf_directory

    directory = _local_dir(config.source, "model")
    if config.from_hf and not is_hf_directory(directory):
        raise ConfigError(f"model {config.source}: --from-hf needs a Hugging Face directory (config.json with "
                          "'architectures')")
    if not config.from_hf and is_hf_directory(directory):
        raise ConfigError(f"model {config.source}: already a Hugging Face directory (use --from-hf to import it)")
    _check_output(config.output, config.overwrite)
    model, tokenizer, _ = open_model(config.source)

    if is_local(config.output):
        target = Path(config.output).expanduser().resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
    else:
        target, staging = None, Path(tempfile.mkdtemp(prefix="groundup-export-"))
    try:
        if config.from_hf:
            save_checkpoint(model, staging, tokenizer, metadata={"stage": "export", "from": "hf"})
        else:
            export_hf(model, staging, tokenizer)
        if target is None:
            upload(staging, config.output, replace=True)
        else:
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    kind = "groundup checkpoint" if config.from_hf else "Hugging Face Llama"
    print(f"export: {config.source} -> {config.output} ({kind}, {model.config.num_parameters / 1e6:.2f}M "
          f"parameters, {time.time() - started:.1f} s)", flush=True)
    return {"stage": STAGE, "source": config.source, "output": config.output,
            "format": "groundup" if config.from_hf else config.format}


if __name__ == "__main__":
    stage_main(STAGE)
