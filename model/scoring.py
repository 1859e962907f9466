"""Log-probabilities of given tokens under a model: one implementation for every stage that scores text.

- :func:`token_logprobs` — differentiable, from logits: what DPO and PPO train on.
- :func:`sequence_logprobs` — log p(token | prefix) for every token of every sequence, plus the top-n
  alternatives and whether each token was the greedy choice (no gradient): what the API's
  ``echo``/``logprobs`` and evaluation's sliding windows need.
- :func:`continuation_logprobs` — log p(continuation | context) summed, and whether it was the greedy
  choice, for (context, continuation) pairs: lm-evaluation-harness's ``loglikelihood``. Pairs that share a
  context (the choices of a multiple-choice question) run that context once and score each continuation
  on its keys and values (the KV cache of generation); the others go through :func:`sequence_logprobs`.

Pure PyTorch, no Ray. Works on our ``Transformer`` or anything whose call maps tokens [batch, time]
to logits [batch, time, vocab] and that exposes the config (``model.config`` or ``model.module.config``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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
            targets = tokens[:, 1:]
            # Position t predicts token t + 1: the last token is never an input (nothing scores what follows it).
            logits = model(tokens[:, :-1]).float() if width > 1 else torch.zeros(len(chunk), 0, 1, device=device)
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


def _model_with_cache(model):
    """The model itself when it runs on a KV cache (our Transformer), else None."""
    from model.llama import Transformer

    return model if isinstance(model, Transformer) else None


@torch.inference_mode()
def continuation_logprobs(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                          batch_size: int = 16) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the sum of log p(continuation token | everything before
    it) and whether every continuation token was the greedy choice. Contexts and continuations must be
    non-empty and fit the model's context together.

    Pairs that share a context run it once: it is prefilled into a KV cache, the cache is copied to one
    row per continuation and the continuations (less their last token) are scored on top of it, each at
    its own positions — the same numbers as scoring ``context + continuation`` whole, for a fraction of
    the work when four choices share a question. Results come back in the caller's order."""
    config = _config_of(model)
    for index, (context, continuation) in enumerate(pairs):
        if not context or not continuation:
            raise ValueError(f"pair {index}: context and continuation must both be non-empty")
        if len(context) + len(continuation) > config.max_seq_len:
            raise ValueError(f"pair {index} has {len(context) + len(continuation)} tokens; "
                             f"the context holds {config.max_seq_len}")
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, (context, _) in enumerate(pairs):
        groups.setdefault(tuple(int(t) for t in context), []).append(index)
    shared = ([(key, members) for key, members in groups.items() if len(members) > 1]
              if _model_with_cache(model) is not None else [])
    on_cache = {i for _, members in shared for i in members}
    alone = [i for i in range(len(pairs)) if i not in on_cache]
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    if alone:
        whole = sequence_logprobs(model, [list(pairs[i][0]) + list(pairs[i][1]) for i in alone], batch_size=batch_size)
        for i, scores in zip(alone, whole):
            start = len(pairs[i][0])
            results[i] = (scores.total(start), all(scores.is_greedy[start:]))
    if shared:
        was_training = model.training
        model.eval()
        try:
            # Contexts in waves whose keys and values stay bounded (one batch of full-context rows): longest
            # first, so a wave's first context sets the width of its rows.
            shared.sort(key=lambda g: -len(g[0]))
            budget, wave = batch_size * config.max_seq_len, []
            for group in shared:
                if wave and (len(wave) + 1) * len(wave[0][0]) > budget:
                    _score_shared(model, config, wave, pairs, batch_size, results)
                    wave = []
                wave.append(group)
            if wave:
                _score_shared(model, config, wave, pairs, batch_size, results)
        finally:
            model.train(was_training)
    return results  # type: ignore[return-value]


def _score_shared(model, config, groups, pairs, batch_size: int, results: list) -> None:
    """Score the continuations of ``groups`` ((context, pair indices), longest context first): each context
    is prefilled once into a KV cache (in batches, longest first); then the continuations, sorted by length
    over all the contexts so each batch pads little, run on copies of their contexts' keys and values."""
    from model.llama import KVCache

    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    lengths = [len(key) for key, _ in groups]
    longest = max(lengths)
    store = KVCache.allocate(config, len(groups), longest, device, dtype)  # every context's keys and values
    first: dict[int, tuple[float, bool]] = {}  # pair index -> its first token's log p and greediness
    for begin in range(0, len(groups), batch_size):
        part = range(begin, min(begin + batch_size, len(groups)))
        width = max(lengths[g] for g in part)
        tokens = torch.zeros(len(part), width, dtype=torch.long)
        for row, g in enumerate(part):
            tokens[row, :lengths[g]] = torch.tensor(groups[g][0], dtype=torch.long)
        tokens = tokens.to(device)
        view = KVCache([k[part.start:part.stop, :, :width] for k in store.keys],
                       [v[part.start:part.stop, :, :width] for v in store.values])  # the model writes through
        positions = torch.arange(width, device=device).expand(len(part), width)
        logits = model(tokens, positions=positions, cache=view, span=width)
        last = logits[torch.arange(len(part), device=device),
                      torch.tensor([lengths[g] - 1 for g in part], device=device)].float()
        normaliser, best = torch.logsumexp(last, dim=-1).cpu(), last.argmax(-1).cpu()
        for row, g in enumerate(part):  # each continuation's first token, predicted by its context's last position
            members = groups[g][1]
            heads = [int(pairs[i][1][0]) for i in members]
            values = (last[row, torch.tensor(heads, device=device)].cpu() - normaliser[row]).tolist()
            for i, head, value in zip(members, heads, values):
                first[i] = (value, int(best[row]) == head)

    # Continuations less their first token (scored above) run at positions after their context; a row's
    # padding sits after its real tokens (clamped to the cache), where no real token can see it.
    members = sorted(((g, i) for g, (_, indices) in enumerate(groups) for i in indices),
                     key=lambda m: -len(pairs[m[1]][1]))
    for begin in range(0, len(members), batch_size):
        part = members[begin:begin + batch_size]
        span = max(len(pairs[i][1]) - 1 for _, i in part)
        scored = torch.zeros(len(part), 0)
        greedy = torch.zeros(len(part), 0, dtype=torch.bool)
        if span:
            cache_len = max(lengths[g] + len(pairs[i][1]) for g, i in part)
            rows = torch.tensor([g for g, _ in part], device=device)
            keep = min(longest, cache_len)
            copy = KVCache.allocate(config, len(part), cache_len, device, dtype)
            for target, source in zip(copy.keys + copy.values, store.keys + store.values):
                target[:, :, :keep] = source[rows, :, :keep]
            inputs = torch.zeros(len(part), span, dtype=torch.long)
            targets = torch.zeros(len(part), span, dtype=torch.long)
            for row, (_, i) in enumerate(part):
                continuation = [int(t) for t in pairs[i][1]]
                inputs[row, :len(continuation) - 1] = torch.tensor(continuation[:-1], dtype=torch.long)
                targets[row, :len(continuation) - 1] = torch.tensor(continuation[1:], dtype=torch.long)
            offsets = torch.tensor([lengths[g] for g, _ in part])[:, None]
            where = torch.clamp(offsets + torch.arange(span)[None, :], max=cache_len - 1)
            inputs, targets, where = inputs.to(device), targets.to(device), where.to(device)
            out = model(inputs, positions=where, cache=copy, span=cache_len).float()
            scored = token_logprobs(out, targets).cpu()
            greedy = (out.argmax(-1) == targets).cpu()
        for row, (_, i) in enumerate(part):
            n = len(pairs[i][1]) - 1
            value, is_greedy = first[i]
            results[i] = (value + float(scored[row, :n].double().sum()), is_greedy and bool(greedy[row, :n].all()))
