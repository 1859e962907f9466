"""Model configuration, named presets, and parameter / FLOP accounting computed from the config."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelConfig(BaseModel):
    """Shape of the Llama-style decoder. Every count (parameters, FLOPs) derives from these fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(4096, ge=16)
    dim: int = Field(384, ge=8)
    n_layers: int = Field(6, ge=1)
    n_heads: int = Field(6, ge=1)
    n_kv_heads: int = Field(2, ge=1)
    ffn_dim: int | None = Field(None, description="SwiGLU hidden size; default 8/3·dim rounded to multiple_of")
    multiple_of: int = Field(64, ge=1)
    max_seq_len: int = Field(512, ge=8)
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = True
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        return self

    def get(self, key: str, default=None):
        """Dict-style lookup with Hugging Face's names, for libraries that read a model's config that way
        (peft asks for ``tie_word_embeddings`` before merging adapters)."""
        return getattr(self, {"tie_word_embeddings": "tie_embeddings"}.get(key, key), default)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        hidden = int(8 * self.dim / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    # ---- accounting -------------------------------------------------------------------------
    @property
    def params_per_layer(self) -> int:
        d, kv = self.dim, self.n_kv_heads * self.head_dim
        attention = d * d + 2 * d * kv + d * d  # wq, wk, wv, wo (no biases)
        mlp = 3 * d * self.hidden_dim  # w1 (gate), w3 (up), w2 (down)
        norms = 2 * d
        return attention + mlp + norms

    @property
    def num_parameters(self) -> int:
        """Trainable parameters, counting a tied embedding once."""
        embedding = self.vocab_size * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.n_layers * self.params_per_layer + self.dim + embedding + head

    @property
    def num_non_embedding_parameters(self) -> int:
        return self.n_layers * self.params_per_layer + self.dim

    @property
    def matmul_parameters(self) -> int:
        """Parameters used in matrix multiplies per token: all layers plus the output projection.

        The input embedding is a lookup (no FLOPs); the output projection costs 2·dim·vocab per token
        whether or not its weight is tied to the embedding.
        """
        return self.n_layers * self.params_per_layer + self.vocab_size * self.dim

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6·N plus the attention term 12·L·d·T.

        N counts the matmul parameters; the attention scores and weighted sum cost 2·2·d·T per layer
        forward for a context of T (PaLM appendix B; causal masking is not subtracted, as is usual).
        """
        seq_len = seq_len or self.max_seq_len
        return 6.0 * self.matmul_parameters + 12.0 * self.n_layers * self.dim * seq_len

    def inference_flops_per_token(self, context: int) -> float:
        return 2.0 * self.matmul_parameters + 4.0 * self.n_layers * self.dim * context

    def describe(self) -> str:
        return (f"{self.num_parameters / 1e6:.2f}M parameters ({self.n_layers} layers, dim {self.dim}, "
                f"{self.n_heads} heads / {self.n_kv_heads} kv, ffn {self.hidden_dim}, vocab {self.vocab_size}, "
                f"context {self.max_seq_len})")


PresetName = Literal["1m", "10m", "125m", "350m", "1.3b"]

PRESETS: dict[str, dict] = {
    # Tests: about 1M parameters with a 4k vocabulary.
    "1m": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256, vocab_size=4096),
    # The CPU quickstart: about 10M.
    "10m": dict(dim=384, n_layers=6, n_heads=6, n_kv_heads=2, max_seq_len=512, vocab_size=4096),
    # GPU sizes with the GPT-2/GPT-3 shapes and a 32k vocabulary.
    "125m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, max_seq_len=2048, vocab_size=32000,
                 tie_embeddings=False),
    "350m": dict(dim=1024, n_layers=24, n_heads=16, n_kv_heads=16, max_seq_len=2048, vocab_size=32000,
                 tie_embeddings=False),
    "1.3b": dict(dim=2048, n_layers=24, n_heads=16, n_kv_heads=16, max_seq_len=2048, vocab_size=32000,
                 tie_embeddings=False),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named preset, optionally with fields changed (e.g. the tokenizer's ``vocab_size``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
