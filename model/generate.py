"""Generation with a KV cache: batched prompts of different lengths, sampling controls, stop
sequences, reproducible seeds and token-by-token streaming.

``generate_stream`` yields, after every decoding step, one :class:`TokenEvent` per sequence that
produced a token; ``generate`` collects them. Each sequence has its own sampling settings and its own
seeded random generator, so its output does not depend on what else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from model.llama import KVCache, Transformer
from model.tokenizer import EOS_ID, SPECIAL_IDS, END_OF_TURN, Tokenizer

DEFAULT_STOP_IDS = (EOS_ID, SPECIAL_IDS[END_OF_TURN])


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = DEFAULT_STOP_IDS
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = {
            "max_new_tokens": self.max_new_tokens >= 1,
            "temperature": self.temperature >= 0,
            "top_k": self.top_k >= 0,
            "top_p": 0 < self.top_p <= 1,
            "repetition_penalty": self.repetition_penalty > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"sampling field '{name}' out of range: {getattr(self, name)!r}")


def sample_next_token(logits: torch.Tensor, params: SamplingParams, history: Sequence[int],
                      generator: torch.Generator | None) -> int:
    """Pick the next token from one row of logits [vocab] under ``params``."""
    logits = logits.float().clone()
    if params.repetition_penalty != 1.0 and history:
        seen = torch.tensor(sorted(set(history)), device=logits.device)
        scores = logits[seen]
        # CTRL's penalty: shrink positive logits, push negative ones further down.
        logits[seen] = torch.where(scores > 0, scores / params.repetition_penalty,
                                   scores * params.repetition_penalty)
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token once the tokens before it already cover top_p (always keep the first).
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p
        logits[order[drop]] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back text that might still
    become a stop string or is an incomplete UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.emitted = ""
        self.text = ""

    def update(self, token_ids: Sequence[int]) -> tuple[str, bool]:
        """New text since the last call, and whether a stop string was found (text then ends before it)."""
        full = self.tokenizer.decode(token_ids)
        hits = [full.find(s) for s in self.stop if s in full]
        if hits:
            self.text = full[: min(hits)]
            delta, self.emitted = self.text[len(self.emitted):], self.text
            return delta, True
        self.text = full
        safe = len(full)
        if full.endswith("\ufffd"):
            safe -= 1
        for stop in self.stop:  # hold back a suffix that is a prefix of a stop string
            for size in range(min(len(stop) - 1, safe), 0, -1):
                if full[safe - size:safe] == stop[:size]:
                    safe -= size
                    break
        safe = max(safe, len(self.emitted))
        delta, self.emitted = full[len(self.emitted):safe], full[:safe]
        return delta, False

    def flush(self) -> str:
        delta, self.emitted = self.text[len(self.emitted):], self.text
        return delta


@dataclass
class TokenEvent:
    index: int  # which prompt of the batch
    token_id: int
    text: str = ""  # text delta (when a tokenizer was given)
    finish_reason: str | None = None  # "stop" or "length" on a sequence's last event
    is_stop_token: bool = False  # the token that ended the sequence; not part of the answer


@dataclass
class Completion:
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


@dataclass
class _Sequence:
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    detok: IncrementalDetokenizer | None
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.generated)


def seeded_generator(seed: int | None) -> torch.Generator | None:
    """A per-sequence random generator (None: torch's global one), so a seed fixes one sequence's samples."""
    if seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def _right_padded(sequences: Sequence[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    tokens = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, ids in enumerate(sequences):
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in sequences])
    return tokens.to(device), lengths.to(device)


@torch.inference_mode()
def generate_stream(model: Transformer, prompts: Sequence[Sequence[int]],
                    params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                    tokenizer: Tokenizer | None = None, use_cache: bool = True) -> Iterator[list[TokenEvent]]:
    """Decode all prompts together; after each step yield the tokens produced in that step."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    per_row = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(per_row) != len(prompts):
        raise ValueError("give one SamplingParams, or one per prompt")
    config, device = model.config, next(model.parameters()).device
    too_long = [i for i, p in enumerate(prompts) if len(p) >= config.max_seq_len]
    if too_long:
        raise ValueError(f"prompt {too_long[0]} has {len(prompts[too_long[0]])} tokens; "
                         f"the context holds {config.max_seq_len}")
    seqs = [_Sequence(list(map(int, p)), sp, seeded_generator(sp.seed),
                      IncrementalDetokenizer(tokenizer, sp.stop) if tokenizer else None)
            for p, sp in zip(prompts, per_row)]
    was_training = model.training
    model.eval()
    try:
        cache = None
        if use_cache:
            span = max(min(config.max_seq_len, s.length + s.params.max_new_tokens) for s in seqs)
            dtype = next(model.parameters()).dtype
            cache = KVCache.allocate(config, len(seqs), span, device, dtype)
            tokens, lengths = _right_padded([s.prompt for s in seqs], device)
            positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
            logits = model(tokens, positions=positions, cache=cache)
            last = logits[torch.arange(len(seqs), device=device), lengths - 1]
            active = list(range(len(seqs)))
        else:
            active = list(range(len(seqs)))
            tokens, lengths = _right_padded([s.prompt for s in seqs], device)
            logits = model(tokens)
            last = logits[torch.arange(len(seqs), device=device), lengths - 1]
        while active:
            last = last.float().cpu()  # one device sync per step; sampling runs on the host
            events = []
            for slot, index in enumerate(active):
                events.append(_advance(seqs[index], index, last[slot], config.max_seq_len))
            yield events
            active = [i for i in active if seqs[i].finish_reason is None]
            if not active:
                break
            if use_cache:
                rows = torch.tensor(active, device=device)
                step = torch.tensor([[seqs[i].generated[-1]] for i in active], device=device)
                positions = torch.tensor([[seqs[i].length - 1] for i in active], device=device)
                last = model(step, positions=positions, cache=cache, rows=rows)[:, -1]
            else:
                tokens, lengths = _right_padded([seqs[i].prompt + seqs[i].generated for i in active], device)
                logits = model(tokens)
                last = logits[torch.arange(len(active), device=device), lengths - 1]
    finally:
        model.train(was_training)


def _advance(seq: _Sequence, index: int, logits: torch.Tensor, max_seq_len: int) -> TokenEvent:
    token = sample_next_token(logits, seq.params, seq.prompt + seq.generated, seq.generator)
    seq.generated.append(token)
    event = TokenEvent(index, token)
    if token in seq.params.stop_token_ids:
        seq.finish_reason = "stop"
        seq.generated.pop()  # the stop token ends the answer; it is not part of it
        event.is_stop_token = True
    if seq.detok is not None:
        delta, hit_stop = seq.detok.update(seq.generated)
        event.text = delta
        if hit_stop:
            seq.finish_reason = "stop"
    if seq.finish_reason is None and (len(seq.generated) >= seq.params.max_new_tokens
                                      or seq.length >= max_seq_len):
        seq.finish_reason = "length"
    if seq.finish_reason is not None and seq.detok is not None:
        event.text += seq.detok.flush()
    event.finish_reason = seq.finish_reason
    return event


def generate(model: Transformer, prompts: Sequence[Sequence[int]],
             params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
             tokenizer: Tokenizer | None = None, use_cache: bool = True) -> list[Completion]:
    """Generate for every prompt; returns each completion's tokens, text and finish reason."""
    results = [Completion(prompt_tokens=len(p)) for p in prompts]
    for events in generate_stream(model, prompts, params, tokenizer, use_cache):
        for event in events:
            result = results[event.index]
            if not event.is_stop_token:
                result.token_ids.append(event.token_id)
            result.text += event.text
            result.finish_reason = event.finish_reason
    return results
