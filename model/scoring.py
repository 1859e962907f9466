"""Log-probabilities of given tokens under a model: one implementation for every stage that scores text.

- :func:`token_logprobs` — differentiable, from logits: what DPO and PPO train on.
- :func:`sequence_logprobs` — log p(token | prefix) for every token of every sequence, plus the top-n
  alternatives and whether each token was the greedy choice (no gradient): what evaluation's
  log-likelihoods, the API's ``echo``/``logprobs`` and lm-evaluation-harness's ``loglikelihood`` need.

Pure PyTorch, no Ray. Works on our ``Transformer`` or anything whose call maps tokens [batch, time]
to logits [batch, time, vocab] and that exposes the config (``model.config`` or ``model.module.config``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] for each position: logits [..., vocab], targets [...] -> [...] (fp32).

    Computed as ``logit[target] - logsumexp(logits)``, which never materialises the full log-softmax
    (a [batch, time, vocab] fp32 copy) — the same value as ``log_softmax(...).gather(...)``.
    """
    logits = logits.float()
    picked = logits.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


@dataclass
class SequenceScores:
    """Per-token scores of one sequence. Index ``i`` describes token ``i``; token 0 has no prefix, so
    its entries are None (OpenAI's ``echo`` reports ``null`` there too)."""

    token_ids: list[int]
    logprobs: list[float | None]
    is_greedy: list[bool | None]
    top: list[list[tuple[int, float]] | None] = field(default_factory=list)  # top-n (id, logprob), best first

    def total(self, start: int, end: int | None = None) -> float:
        """Sum of log p over tokens ``start:end`` (``start`` >= 1): a continuation's log-likelihood."""
        if start < 1:
            raise ValueError("token 0 has no log-probability: start must be at least 1")
        return float(sum(v for v in self.logprobs[start:end]))


def _config_of(model):
    return getattr(model, "config", None) or model.module.config


@torch.inference_mode()
def sequence_logprobs(model, sequences: Sequence[Sequence[int]], top_n: int = 0,
                      batch_size: int = 16) -> list[SequenceScores]:
    """Score every token of every sequence given its prefix. Sequences longer than the model's context
    raise ValueError (callers that need longer text slide a window, as evaluation does)."""
    config = _config_of(model)
    device = next(model.parameters()).device
    for index, ids in enumerate(sequences):
        if not ids:
            raise ValueError(f"sequence {index} is empty")
        if len(ids) > config.max_seq_len:
            raise ValueError(f"sequence {index} has {len(ids)} tokens; the context holds {config.max_seq_len}")
    was_training = model.training
    model.eval()
    results: list[SequenceScores] = []
    try:
        # Longest first within each batch keeps padding small; results go back in the caller's order.
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        scored: dict[int, SequenceScores] = {}
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(sequences[i]) for i in chunk)
            tokens = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, i in enumerate(chunk):
                tokens[row, :len(sequences[i])] = torch.tensor([int(t) for t in sequences[i]], dtype=torch.long)
            tokens = tokens.to(device)
            logits = model(tokens).float()[:, :-1]  # position t predicts token t + 1
            targets = tokens[:, 1:]
            picked = token_logprobs(logits, targets).cpu()
            greedy = (logits.argmax(-1) == targets).cpu()
            if top_n:
                top_values, top_ids = torch.topk(torch.log_softmax(logits, dim=-1), min(top_n, logits.shape[-1]), dim=-1)
                top_values, top_ids = top_values.cpu(), top_ids.cpu()
            for row, i in enumerate(chunk):
                n = len(sequences[i])
                scores = SequenceScores(
                    token_ids=[int(t) for t in sequences[i]],
                    logprobs=[None, *picked[row, :n - 1].tolist()],
                    is_greedy=[None, *greedy[row, :n - 1].tolist()],
                )
                if top_n:
                    scores.top = [None, *[list(zip(top_ids[row, t].tolist(), top_values[row, t].tolist()))
                                          for t in range(n - 1)]]
                scored[i] = scores
        results = [scored[i] for i in range(len(sequences))]
    finally:
        model.train(was_training)
    return results
