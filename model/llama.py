"""A Llama-style decoder in one readable file.

Token embedding -> n × [RMSNorm -> grouped-query attention with rotary positions -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> output projection (optionally tied to the embedding).

Attention goes through ``scaled_dot_product_attention``: flash attention on GPUs in training (causal,
no mask) and a boolean mask when a KV cache holds sequences at different positions (generation).
Rotary embeddings use the "rotate half" layout, the one Hugging Face's Llama uses, so export is a
renaming of weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 for stability under bf16, then cast back (as Llama does).
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rotary_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, time, head_dim]; cos/sin: [batch, time, head_dim]."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


@dataclass
class KVCache:
    """Per-layer key/value buffers [rows, kv_heads, max_len, head_dim].

    Each row is an independent sequence (a slot): a forward pass writes keys and values at the
    positions it is given, so rows may sit at different lengths and new sequences can be prefilled
    into free rows while others decode (continuous batching).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def allocate(cls, config: ModelConfig, rows: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype = torch.float32) -> KVCache:
        shape = (rows, config.n_kv_heads, max_len, config.head_dim)
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)])

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        kv_dim = config.n_kv_heads * config.head_dim
        self.wq = nn.Linear(config.dim, config.dim, bias=False)
        self.wk = nn.Linear(config.dim, kv_dim, bias=False)
        self.wv = nn.Linear(config.dim, kv_dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                rows: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                span: int = 0) -> torch.Tensor:
        batch, time, _ = x.shape
        q = self.wq(x).view(batch, time, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, time, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, time, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gqa = self.n_heads != self.n_kv_heads
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            key_cache, value_cache = cache
            if rows is None:  # rows 0..batch-1: slices of the cache are views, where a row index copies
                key_cache, value_cache = key_cache[:batch], value_cache[:batch]
                index = torch.arange(batch, device=x.device)[:, None]
            else:
                index = rows[:, None]
            # Write this step's keys/values at each row's own positions, then attend to the prefix.
            key_cache[index, :, positions] = k.transpose(1, 2).to(key_cache.dtype)
            value_cache[index, :, positions] = v.transpose(1, 2).to(value_cache.dtype)
            keys = (key_cache[:, :, :span] if rows is None else key_cache[rows, :, :span]).to(q.dtype)
            values = (value_cache[:, :, :span] if rows is None else value_cache[rows, :, :span]).to(q.dtype)
            visible = torch.arange(span, device=x.device)[None, None, :] <= positions[:, :, None]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible[:, None], enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(batch, time, -1))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, cos, sin, cache=None, rows=None, positions=None, span=0):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, rows, positions, span)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.embedding.weight
        cos, sin = rotary_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, std) weights; residual output projections scaled by 1/sqrt(2·layers) (GPT-2),
        which keeps the residual stream's variance flat with depth so every preset trains stably."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight") or ".attention_norm." in name or ".mlp_norm." in name:
                nn.init.ones_(param)
            elif name.endswith("attention.wo.weight") or name.endswith("mlp.w2.weight"):
                nn.init.normal_(param, 0.0, residual_std)
            else:
                nn.init.normal_(param, 0.0, std)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, rows: torch.Tensor | None = None,
                span: int | None = None) -> torch.Tensor:
        """tokens [batch, time] -> logits [batch, time, vocab].

        Without a cache: a causal pass over positions 0..time-1 (training). With a cache: ``positions``
        [batch, time] gives each token's absolute position and ``rows`` [batch] the cache rows to use
        (None: rows 0..batch-1, read without copying them). ``span`` (the highest position + 1) spares
        the device sync of computing it here, for callers that know it.
        """
        batch, time = tokens.shape
        if positions is None:
            if time > self.config.max_seq_len:
                raise ValueError(f"sequence of {time} tokens exceeds max_seq_len {self.config.max_seq_len}")
            positions = torch.arange(time, device=tokens.device).expand(batch, time)
        if cache is None:
            span = 0
        else:
            if span is None:
                # One host sync per forward (not per layer): the cache prefix every row may attend to.
                span = int(positions.max()) + 1
            if span > min(self.config.max_seq_len, cache.max_len):
                raise ValueError(f"position {span - 1} exceeds the context ({min(self.config.max_seq_len, cache.max_len)})")
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x = self.embedding(tokens)
        for index, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.keys[index], cache.values[index])
            if self.activation_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin, layer_cache, rows, positions if cache is not None else None, span)
        return self.output(self.norm(x))

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [batch, time] -> the final normalised hidden states [batch, time, dim]: what a head other
        than the language-model output reads (the reward model's score, PPO's value)."""
        batch, time = tokens.shape
        if time > self.config.max_seq_len:
            raise ValueError(f"sequence of {time} tokens exceeds max_seq_len {self.config.max_seq_len}")
        positions = torch.arange(time, device=tokens.device).expand(batch, time)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x = self.embedding(tokens)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return self.norm(x)


IGNORE_INDEX = -100


def language_model_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy; targets equal to IGNORE_INDEX (masked prompt tokens) are skipped."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)
