"""Reward model: the decoder with a scalar head that scores a conversation's last reply.

The head reads the final hidden state at the reply's closing ``<|end|>`` (the last token of the
encoded conversation), so one forward pass scores one conversation. The same network with its head
read at every position is PPO's critic (a value per token).

A reward checkpoint is a model checkpoint (``model.safetensors`` with the backbone and ``head.*``,
``config.json``, ``tokenizer.model``) plus ``reward.json`` (kind and the validation reward mean and
standard deviation, for normalising scores). ``model.checkpoint.load_model`` refuses it: a reward model
does not generate text. Pure PyTorch, no Ray.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model.checkpoint import (CONFIG_FILE, WEIGHTS_FILE, CheckpointError, _atomic_write, read_model_config,
                              state_dict_for_saving)
from model.config import ModelConfig
from model.llama import Transformer
from model.tokenizer import MODEL_FILE, Tokenizer

REWARD_FILE = "reward.json"


class RewardModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.backbone = Transformer(config)
        self.head = nn.Linear(config.dim, 1)
        nn.init.normal_(self.head.weight, 0.0, 1.0 / (config.dim + 1) ** 0.5)  # small scores at the start
        nn.init.zeros_(self.head.bias)

    @property
    def config(self) -> ModelConfig:
        return self.backbone.config

    @classmethod
    def from_language_model(cls, model: Transformer) -> "RewardModel":
        """A reward model whose backbone starts from ``model``'s weights (SFT or pretraining)."""
        reward = cls(model.config)
        reward.backbone.load_state_dict(model.state_dict())
        return reward

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [batch, time] -> a score per position [batch, time] (fp32)."""
        return self.head(self.backbone.hidden_states(tokens)).squeeze(-1).float()


def last_token_scores(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """values [batch, time], lengths [batch] (right padding) -> the value at each row's last token."""
    return values.gather(1, (lengths.to(values.device) - 1).clamp_min(0)[:, None]).squeeze(1)


def save_reward_model(model: RewardModel, directory: str | Path, tokenizer: Tokenizer | None = None,
                      stats: dict[str, Any] | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {f"backbone.{k}": v for k, v in state_dict_for_saving(model.backbone).items()}
    state.update({f"head.{k}": v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()})
    _atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata={"format": "groundup-reward"}))
    if tokenizer is not None:
        _atomic_write(directory / MODEL_FILE, lambda p: p.write_bytes(tokenizer.model_bytes))
    info = {"kind": "reward", "mean": 0.0, "std": 1.0, **(stats or {})}
    _atomic_write(directory / REWARD_FILE, lambda p: p.write_text(json.dumps(info, indent=2)))
    _atomic_write(directory / CONFIG_FILE, lambda p: p.write_text(model.config.model_dump_json(indent=2)))
    return directory


def is_reward_directory(directory: str | Path) -> bool:
    return (Path(directory) / REWARD_FILE).is_file()


def reward_stats(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / REWARD_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory}: not a reward model (no {REWARD_FILE})")
    return json.loads(path.read_text())


def load_reward_model(directory: str | Path, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> RewardModel:
    directory = Path(directory)
    reward_stats(directory)
    model = RewardModel(read_model_config(directory))
    state = load_file(str(directory / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (model.config.tie_embeddings and k == "backbone.output.weight")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {directory}: weights do not match a reward model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device=device, dtype=dtype).eval()


def encode_for_scoring(tokenizer: Tokenizer, conversation: Sequence[dict], max_len: int) -> list[int]:
    """A whole conversation (ending with the reply to score) as ids; a longer one keeps its last
    ``max_len`` tokens, so the reply and its closing ``<|end|>`` are always seen."""
    ids = tokenizer.apply_chat_template(conversation).ids
    return ids[-max_len:]


@torch.inference_mode()
def score(model: RewardModel, tokenizer: Tokenizer, conversations: Sequence[Sequence[dict]],
          batch_size: int = 16, normalise: bool = False, stats: dict[str, Any] | None = None) -> list[float]:
    """The reward of each conversation's last reply. ``normalise``: (score - mean) / std with the
    validation statistics stored with the model (``stats``, from :func:`reward_stats`)."""
    device = next(model.parameters()).device
    encoded = [encode_for_scoring(tokenizer, c, model.config.max_seq_len) for c in conversations]
    scores: list[float] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(len(ids) for ids in chunk)
        tokens = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, ids in enumerate(chunk):
            tokens[row, :len(ids)] = torch.tensor(ids)
        lengths = torch.tensor([len(ids) for ids in chunk])
        scores.extend(last_token_scores(model(tokens.to(device)), lengths).tolist())
    if normalise:
        stats = stats or {"mean": 0.0, "std": 1.0}
        scores = [(s - stats["mean"]) / max(stats["std"], 1e-6) for s in scores]
    return scores
