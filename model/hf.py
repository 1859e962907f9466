"""Export to and import from the Hugging Face Llama layout.

Our module names map one-to-one onto ``LlamaForCausalLM``'s and both use the "rotate half" rotary
layout, so the conversion is a renaming of tensors — no permutation. The export directory holds
``config.json``, ``model.safetensors``, ``generation_config.json`` and the tokenizer files
(``tokenizer.model``, ``tokenizer_config.json``, ``special_tokens_map.json``), which is what
``transformers.AutoModelForCausalLM.from_pretrained(dir)`` reads. ``transformers`` itself is not
needed here.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.llama import Transformer
from model.tokenizer import BOS_ID, EOS_ID, MODEL_FILE, PAD_ID, SPECIAL_IDS, UNK_ID, Tokenizer

HF_WEIGHTS = "model.safetensors"

_LAYER_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"embedding.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_LAYER_PATTERN = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_PATTERN = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def to_hf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = _LAYER_PATTERN.match(name)
    if not match or match.group(2) not in _LAYER_NAMES:
        raise KeyError(f"no Hugging Face name for parameter {name!r}")
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"


def from_hf_name(name: str) -> str:
    for ours, theirs in _TOP_NAMES.items():
        if name == theirs:
            return ours
    match = _HF_LAYER_PATTERN.match(name)
    inverse = {v: k for k, v in _LAYER_NAMES.items()}
    if not match or match.group(2) not in inverse:
        raise KeyError(f"unexpected tensor {name!r} in a Llama checkpoint")
    return f"layers.{match.group(1)}.{inverse[match.group(2)]}"


def hf_config(config: ModelConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": config.init_std,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "torch_dtype": "float32",
    }


def config_from_hf(data: dict) -> ModelConfig:
    rope = data.get("rope_parameters") or {}
    return ModelConfig(
        vocab_size=data["vocab_size"], dim=data["hidden_size"], ffn_dim=data["intermediate_size"],
        n_layers=data["num_hidden_layers"], n_heads=data["num_attention_heads"],
        n_kv_heads=data.get("num_key_value_heads") or data["num_attention_heads"],
        max_seq_len=data.get("max_position_embeddings", 2048), norm_eps=data.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", data.get("rope_theta", 10000.0)),
        tie_embeddings=data.get("tie_word_embeddings", False),
        init_std=data.get("initializer_range", 0.02),
    )


def _tokenizer_files(directory: Path, tokenizer: Tokenizer) -> None:
    tokenizer.save(directory)
    names = {v: k for k, v in SPECIAL_IDS.items()}
    added = {str(i): {"content": names[i], "special": True, "lstrip": False, "rstrip": False,
                      "normalized": False, "single_word": False} for i in sorted(names)}
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": names[BOS_ID], "eos_token": names[EOS_ID],
        "unk_token": names[UNK_ID], "pad_token": names[PAD_ID], "add_bos_token": True,
        "add_eos_token": False, "legacy": False, "added_tokens_decoder": added,
        "model_max_length": 1_000_000,
    }, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": names[BOS_ID], "eos_token": names[EOS_ID], "unk_token": names[UNK_ID],
        "pad_token": names[PAD_ID]}, indent=2))


def export_hf(model: Transformer, directory: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write ``model`` (and its tokenizer) in the Hugging Face Llama layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "output.weight" and model.config.tie_embeddings:
            continue  # tied: transformers re-ties lm_head to embed_tokens from the config
        state[to_hf_name(name)] = tensor.detach().to("cpu", torch.float32).contiguous()
    save_file(state, str(directory / HF_WEIGHTS), metadata={"format": "pt"})
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, SPECIAL_IDS["<|end|>"]], "pad_token_id": PAD_ID},
        indent=2))
    if tokenizer is not None:
        _tokenizer_files(directory, tokenizer)
    (directory / "config.json").write_text(json.dumps(hf_config(model.config), indent=2))
    return directory


def is_hf_directory(directory: str | Path) -> bool:
    path = Path(directory) / "config.json"
    return path.is_file() and "architectures" in json.loads(path.read_text())


def import_hf(directory: str | Path) -> tuple[Transformer, Tokenizer | None]:
    """Load a Llama-layout directory (ours or compatible) into our Transformer and tokenizer."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"Hugging Face directory {directory}: no config.json")
    data = json.loads(config_path.read_text())
    if data.get("model_type") != "llama":
        raise ValueError(f"Hugging Face directory {directory}: model_type {data.get('model_type')!r}, "
                         "only 'llama' is supported")
    config = config_from_hf(data)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"Hugging Face directory {directory}: no .safetensors weights")
    state = {}
    for file in files:
        state.update({from_hf_name(k): v for k, v in load_file(str(file)).items()})
    model = Transformer(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_embeddings and k == "output.weight")]
    if missing or unexpected:
        raise ValueError(f"Hugging Face directory {directory}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    tokenizer = Tokenizer.load(directory / MODEL_FILE) if (directory / MODEL_FILE).is_file() else None
    return model.eval(), tokenizer
