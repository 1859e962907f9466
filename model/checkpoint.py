"""Model checkpoints: weights as safetensors plus the config as JSON — never pickle.

A checkpoint directory holds ``model.safetensors``, ``config.json`` (the ModelConfig) and, when
given, ``tokenizer.model``. ``config.json`` is written last, so a directory without it is incomplete
and is never loaded.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.llama import Transformer
from model.tokenizer import MODEL_FILE, Tokenizer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or does not match its config."""


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def state_dict_for_saving(model: Transformer) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, with a tied output weight stored once (under the embedding)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("output.weight", None)
    return state


def save_checkpoint(model: Transformer, directory: str | Path, tokenizer: Tokenizer | None = None,
                    metadata: dict | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = state_dict_for_saving(model)
    meta = {"format": "groundup", **{k: str(v) for k, v in (metadata or {}).items()}}
    _atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata=meta))
    if tokenizer is not None:
        _atomic_write(directory / MODEL_FILE, lambda p: p.write_bytes(tokenizer.model_bytes))
    config_json = model.config.model_dump_json(indent=2)
    _atomic_write(directory / CONFIG_FILE, lambda p: p.write_text(config_json))
    return directory


def read_config(directory: str | Path) -> ModelConfig:
    """The config of a language-model checkpoint (a reward model's directory is refused: it scores, it
    does not generate)."""
    if (Path(directory) / "reward.json").is_file():
        raise CheckpointError(f"checkpoint {directory}: a reward model (it scores replies and cannot generate); "
                              "load it with model.reward.load_reward_model")
    return read_model_config(directory)


def read_model_config(directory: str | Path) -> ModelConfig:
    """The ModelConfig of any checkpoint directory of ours (language or reward model)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory}: no {CONFIG_FILE} (missing or incomplete)")
    data = json.loads(path.read_text())
    if "architectures" in data:  # a Hugging Face export
        raise CheckpointError(f"checkpoint {directory}: a Hugging Face directory; use model.hf.import_hf")
    return ModelConfig(**data)


def load_model(directory: str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> Transformer:
    directory = Path(directory)
    config = read_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {directory}: no {WEIGHTS_FILE}")
    state = load_file(str(weights))
    model = Transformer(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_embeddings and k == "output.weight")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {directory}: weights do not match config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device=device, dtype=dtype).eval()


def load_tokenizer(directory: str | Path) -> Tokenizer:
    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory}: no {MODEL_FILE}")
    return Tokenizer.load(path)


def copy_checkpoint(source: str | Path, target: str | Path) -> Path:
    """Copy a checkpoint directory, config last (so a partial copy is never loadable)."""
    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for item in sorted(source.iterdir(), key=lambda p: p.name == CONFIG_FILE):
        if item.is_file():
            shutil.copy2(item, target / item.name)
    return target
