"""The generation core: batched prefill, sampling, stopping and finish reasons with per-token
log-probabilities — one implementation for everything that generates text.

- :func:`generate` / :func:`generate_stream` decode a list of prompts together (quickstart samples,
  evaluation, PPO rollouts), also on a DeepSpeed engine, and with ``synced=True`` under ZeRO-3;
- ``serving/engine.py`` runs continuous batching on a :class:`Decoder`: sequences join and leave its
  KV-cache rows between steps;
- :class:`BeamSearch` / :func:`beam_search` decode one prompt with ``width`` beams.

The pieces, bottom up:

- :func:`sample` turns logits [rows, vocab] into next tokens on the model's device: repetition penalty,
  temperature, top-k, top-p and min-p per row; greedy rows take the argmax, sampled rows invert their
  CDF at one uniform number drawn from the row's own seeded generator. Every operation works within a
  row, so a row's token depends only on its own logits, settings and random number — not on what
  shares the batch — and a NaN in one row cannot reach another. Settings are clamped into ranges where
  the arithmetic stays finite (a temperature below :data:`GREEDY_BELOW` decodes greedily).
- :class:`Decoder` owns the KV-cache rows of one model. :meth:`Decoder.step` runs one forward pass per
  kind of work (prefill of newly admitted sequences, one token for running ones), samples all their rows
  at once, copies the result to the host once, and advances every sequence: stop tokens, stop strings,
  length, text. A forward pass that raises is retried on halves of the batch, so a failure ends only
  the sequence that causes it; a row whose logits are not finite ends with an error on its own.
- :class:`IncrementalDetokenizer` turns tokens into text deltas in time linear in the answer's length.

Log-probabilities: every token comes with log p(token | prefix) under the **raw model distribution**
(the log-softmax of the logits, before penalty, temperature and filters), as OpenAI's and vLLM's
``logprobs`` report it: what the model itself believes, comparable across sampling settings and equal to
:mod:`model.scoring`'s numbers for the same text. Training code (PPO) recomputes log-probabilities with
gradients from its own forward pass (and its own temperature); from here it needs the token ids.

Finish reasons are ``"stop"`` (a stop token or stop string) and ``"length"`` (``max_new_tokens`` or the
context). A sequence that fails ends with ``finish_reason="error"`` and an ``error`` message: callers
report it as an error (the API as a 5xx), never as a finish reason.
"""
from __future__ import annotations

import contextlib
import heapq
import math
import random
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from model.llama import KVCache
from model.tokenizer import END_OF_TURN, EOS_ID, SPECIAL_IDS, Tokenizer

DEFAULT_STOP_IDS = (EOS_ID, SPECIAL_IDS[END_OF_TURN])
GREEDY_BELOW = 1e-5  # temperatures below this decode greedily (dividing logits by them overflows fp32)
MAX_TEMPERATURE = 1e6
PENALTY_RANGE = (1e-6, 1e6)  # repetition penalties are clamped here; beyond, penalised logits overflow fp32
MAX_TOP_LOGPROBS = 20
DETOKENIZE_CONTEXT = 6  # prompt tokens decoded before an answer, so that its first word keeps its space
_FLOAT_MAX = torch.finfo(torch.float32).max


class PromptTooLongError(ValueError):
    """The prompt leaves no room in the model's context for even one generated token."""


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is decoded. Every value accepted here decodes without NaN or overflow."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # below GREEDY_BELOW (0 included): greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    repetition_penalty: float = 1.0  # CTRL's penalty on tokens of the prompt and the answer so far
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = DEFAULT_STOP_IDS
    seed: int | None = None  # any integer; None: drawn from torch's global generator
    top_logprobs: int = 0  # also return this many most likely tokens (raw distribution) at each step

    def __post_init__(self) -> None:
        def finite(value) -> bool:
            return isinstance(value, (int, float)) and math.isfinite(value)

        checks = {
            "max_new_tokens": isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
            "temperature": finite(self.temperature) and self.temperature >= 0,
            "top_k": isinstance(self.top_k, int) and self.top_k >= 0,
            "top_p": finite(self.top_p) and 0 < self.top_p <= 1,
            "min_p": finite(self.min_p) and 0 <= self.min_p <= 1,
            "repetition_penalty": finite(self.repetition_penalty) and self.repetition_penalty > 0,
            "seed": self.seed is None or isinstance(self.seed, int),
            "top_logprobs": isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"sampling field '{name}' out of range: {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1


# ---- sampling: a batch of rows at once, on the model's device ----------------------------------------
@dataclass
class Sampled:
    """The device-side result of :func:`sample` for each row."""

    tokens: torch.Tensor  # [rows] int64
    logprobs: torch.Tensor  # [rows] fp32: log p(token) under the raw model distribution
    bad: torch.Tensor  # [rows] bool: the row's logits were not all finite (its token is meaningless)
    top_ids: torch.Tensor | None = None  # [rows, n] the n most likely tokens (raw distribution)
    top_logprobs: torch.Tensor | None = None  # [rows, n]

    def to_host(self) -> list[tuple[int, float, bool, list[tuple[int, float]]]]:
        """(token, logprob, bad, top [(id, logprob)]) per row, in ONE device-to-host copy."""
        columns = [self.tokens[:, None].double(), self.logprobs[:, None].double(), self.bad[:, None].double()]
        width = 0
        if self.top_ids is not None:
            width = self.top_ids.shape[1]
            columns += [self.top_ids.double(), self.top_logprobs.double()]
        rows = torch.cat(columns, dim=1).cpu().tolist()
        return [(int(r[0]), r[1], r[2] != 0, list(zip(map(int, r[3:3 + width]), r[3 + width:]))) for r in rows]


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], uniforms: Sequence[float],
           seen: torch.Tensor | None = None) -> Sampled:
    """Next tokens for logits [rows, vocab], one row per entry of ``params`` and ``uniforms``.

    ``uniforms`` are numbers in [0, 1), one per row, from each sequence's own generator: a sampled row
    picks the token where its CDF crosses that number. ``seen`` [rows, vocab] (bool) marks the tokens a
    repetition penalty applies to. Batch-level shortcuts (skipping a filter no row asks for) never change
    a row's result, so a row's token is the same whatever shares the batch.
    """
    rows, vocab = logits.shape
    raw = logits.float()
    bad = ~torch.isfinite(raw).all(dim=-1)
    raw = raw.masked_fill(bad[:, None], 0.0)  # a broken row samples something harmless and is reported
    log_norm = torch.logsumexp(raw, dim=-1)
    settings = torch.tensor([[p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.greedy, u]
                             for p, u in zip(params, uniforms, strict=True)], dtype=torch.float64)
    settings = settings.to(logits.device, non_blocking=True)
    scores = raw
    if seen is not None and any(p.repetition_penalty != 1.0 for p in params):
        penalty = settings[:, 4].clamp(*PENALTY_RANGE).float()[:, None]
        scores = torch.where(seen, torch.where(scores > 0, scores / penalty, scores * penalty), scores)
    greedy_tokens = scores.argmax(dim=-1)
    if all(p.greedy for p in params):
        tokens = greedy_tokens
    else:
        tokens = torch.where(settings[:, 5] != 0, greedy_tokens, _sample_rows(scores, settings, params))
    logprobs = raw.gather(1, tokens[:, None]).squeeze(1) - log_norm
    result = Sampled(tokens, logprobs, bad)
    top_n = min(max(p.top_logprobs for p in params), vocab)
    if top_n:
        values, result.top_ids = raw.topk(top_n, dim=-1)
        result.top_logprobs = values - log_norm[:, None]
    return result


def _sample_rows(scores: torch.Tensor, settings: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p as one keep-mask in vocabulary order, then inverse CDF."""
    rows, vocab = scores.shape
    temperature = settings[:, 0].clamp(GREEDY_BELOW, MAX_TEMPERATURE).float()[:, None]
    scores = torch.nan_to_num(scores / temperature, nan=0.0, posinf=_FLOAT_MAX, neginf=-_FLOAT_MAX)
    keep = torch.ones_like(scores, dtype=torch.bool)
    cuts = [p.top_k for p in params if 0 < p.top_k < vocab]
    if cuts:
        k = settings[:, 1].clamp(0, vocab).long()
        kth = scores.topk(max(cuts), dim=-1).values.gather(1, (k.clamp(1, max(cuts)) - 1)[:, None])
        keep &= (scores >= kth) | ((k == 0) | (k >= vocab))[:, None]
    wants_top_p = any(p.top_p < 1 for p in params)
    if wants_top_p or any(p.min_p > 0 for p in params):
        probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
        min_p = settings[:, 3].clamp(0, 1).float()[:, None]
        keep &= probs >= min_p * probs.amax(dim=-1, keepdim=True)  # min_p = 0 keeps everything
        if wants_top_p:
            top_p = settings[:, 2].clamp(0, 1).float()[:, None]
            ordered, order = probs.sort(dim=-1, descending=True)
            # Drop a token once the tokens before it cover top_p; rows at top_p = 1 drop nothing (their
            # cumulative sum may round past 1), and the most likely token always stays.
            drop = ((ordered.cumsum(dim=-1) - ordered) >= top_p) & (top_p < 1)
            drop[:, 0] = False
            keep &= ~torch.zeros_like(drop).scatter(1, order, drop)
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    cdf = probs.cumsum(dim=-1)
    target = settings[:, 6].float() * cdf[:, -1]
    picked = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1).clamp(max=vocab - 1)
    # A number rounding onto the CDF's end could land on a token with no mass: take the mode instead.
    possible = probs.gather(1, picked[:, None]).squeeze(1) > 0
    return torch.where(possible, picked, probs.argmax(dim=-1))


# ---- text ----------------------------------------------------------------------------------------------
class IncrementalDetokenizer:
    """Text deltas of a growing answer, each token costing a decode of a few tokens only.

    Sentencepiece decodes a piece differently at the start of a string (the word-boundary space goes),
    so each new token is decoded together with the few tokens before it and the new text is the
    difference; the window starts in the prompt (``context``) so the answer's first word keeps its
    space. A trailing incomplete UTF-8 character waits for its next byte, and a suffix that could still
    become a stop string is held back; stop strings are searched in the new text and the tail before it.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._longest_stop = max(map(len, self.stop), default=0)
        self._ids = [int(t) for t in context][-DETOKENIZE_CONTEXT:]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        self.text = ""  # the answer so far (cut before a stop string once one is found)
        self.stopped = False
        self._emitted = 0  # characters of text already returned

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append one token: (text now safe to show, whether a stop string has ended the answer)."""
        if self.stopped:
            return "", True
        self._ids.append(int(token_id))
        new = self._decode_new(final=False)
        if not new:
            return "", False
        searched_from = max(0, len(self.text) - self._longest_stop + 1)
        self.text += new
        hits = [i for i in (self.text.find(s, searched_from) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self._take(len(self.text)), True
        return self._take(len(self.text) - self._held_back()), False

    def flush(self) -> str:
        """The rest of the text (held-back characters included) once the answer has ended."""
        if not self.stopped:
            self.text += self._decode_new(final=True)
        return self._take(len(self.text))

    def _decode_new(self, final: bool) -> str:
        decode = self.tokenizer.decode
        before = decode(self._ids[self._prefix_offset:self._read_offset])
        after = decode(self._ids[self._prefix_offset:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""  # a special token, or the first bytes of a character: wait for more
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return after[len(before):]

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        return max((size for stop in self.stop for size in range(1, len(stop))
                    if self.text.endswith(stop[:size])), default=0)

    def _take(self, end: int) -> str:
        end = max(end, self._emitted)
        delta, self._emitted = self.text[self._emitted:end], end
        return delta


def answer_text(tokenizer: Tokenizer, prompt: Sequence[int], answer: Sequence[int],
                stop: Sequence[str] = ()) -> tuple[str, bool]:
    """The text of a whole answer (cut before the first stop string) and whether a stop string cut it."""
    detokenizer = IncrementalDetokenizer(tokenizer, stop, prompt)
    parts = [detokenizer.add(token)[0] for token in answer]
    return "".join(parts) + detokenizer.flush(), detokenizer.stopped


# ---- sequences and events ------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationEvent:
    """One step of one sequence. ``text`` is the new text; ``finish_reason`` is set on its last event."""

    sequence_id: int  # the caller's key (the prompt's index in generate, a request id in the engine)
    token_id: int | None  # None on an event that only ends the sequence (cancel, error)
    text: str
    finish_reason: str | None  # "stop" or "length"; "error" (with ``error``) or a caller's own ("cancelled")
    completion_tokens: int  # tokens of the answer so far (a stop token is not part of it)
    error: str | None = None
    logprob: float | None = None  # log p(token_id) under the raw model distribution
    top_logprobs: tuple[tuple[int, float], ...] | None = None  # (id, logprob), most likely first
    is_stop_token: bool = False  # token_id is the stop token that ended the answer (not part of it)


@dataclass(eq=False)
class SequenceState:
    key: int
    prompt: list[int]
    params: SamplingParams
    rng: random.Random
    detokenizer: IncrementalDetokenizer | None
    generated: list[int] = field(default_factory=list)  # the answer's tokens (a stop token is not one)
    row: int | None = None
    finish_reason: str | None = None
    uniform: float | None = None  # this step's random number, kept until its token is accepted

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.generated)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def sequence_rng(seed: int | None) -> random.Random:
    """A sequence's own random numbers: a seed fixes them whatever else is decoded alongside. Without
    one, the seed comes from torch's global generator (so ``torch.manual_seed`` makes runs repeatable)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    return random.Random(seed)


def _no_grad(model) -> contextlib.AbstractContextManager:
    # inference_mode is faster, but a DeepSpeed engine (ZeRO-3 gathers parameters in its hooks) wants
    # plain no_grad.
    return torch.no_grad() if hasattr(model, "module") else torch.inference_mode()


def _right_padded(sequences: Sequence[list[int]]) -> tuple[torch.Tensor, list[int]]:
    lengths = [len(s) for s in sequences]
    tokens = torch.zeros(len(sequences), max(lengths), dtype=torch.long)
    for row, ids in enumerate(sequences):
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return tokens, lengths


def check_prompt(prompt: Sequence[int], vocab_size: int, max_len: int) -> list[int]:
    """The prompt as a list of ints, or ValueError (PromptTooLongError when it fills the context)."""
    ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("the prompt is empty")
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size})")
    if len(ids) >= max_len:
        raise PromptTooLongError(f"the prompt has {len(ids)} tokens; this model's context holds {max_len}, "
                                 f"so at most {max_len - 1} fit")
    return ids


# ---- the decoder -------------------------------------------------------------------------------------
class Decoder:
    """Decoding over the KV-cache rows of one model; no threads, no queues of requests (callers add those).

    ``model`` is our Transformer or a DeepSpeed engine wrapping one. ``rows`` sequences decode together;
    more wait and are admitted as rows free up (continuous batching). ``max_len`` bounds the cache
    (default: the model's context). With ``use_cache=False`` every step is a full forward over each
    sequence (a reference for the cache). ``synced``: see :func:`generate_stream`.
    """

    def __init__(self, model, rows: int, tokenizer: Tokenizer | None = None, max_len: int | None = None,
                 use_cache: bool = True, synced: bool = False):
        if rows < 1:
            raise ValueError("a decoder needs at least one row")
        module = getattr(model, "module", model)
        self.model, self.config, self.tokenizer = model, module.config, tokenizer
        parameter = next(module.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.max_len = min(self.config.max_seq_len, max_len or self.config.max_seq_len)
        self.cache = KVCache.allocate(self.config, rows, self.max_len, self.device, self.dtype) if use_cache else None
        self.synced, self.rows = synced, rows
        self.free_rows = list(range(rows))
        self.waiting: deque[SequenceState] = deque()
        self.running: list[SequenceState] = []
        self._seen: torch.Tensor | None = None  # [rows, vocab]: tokens a repetition penalty applies to

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def check_prompt(self, prompt: Sequence[int]) -> list[int]:
        return check_prompt(prompt, self.vocab_size, self.max_len)

    def add(self, key: int, prompt: Sequence[int], params: SamplingParams) -> SequenceState:
        """Queue a sequence (checked here); it is prefilled at the next step with a free row."""
        ids = self.check_prompt(prompt)
        detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop, ids) if self.tokenizer else None
        sequence = SequenceState(key, ids, params, sequence_rng(params.seed), detokenizer)
        self.waiting.append(sequence)
        return sequence

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def cancel(self, sequence: SequenceState, reason: str = "cancelled", error: str | None = None) -> GenerationEvent:
        """End a waiting or running sequence now; its row is free for the next step."""
        if sequence in self.waiting:
            self.waiting.remove(sequence)
        if sequence in self.running:
            self.running.remove(sequence)
            heapq.heappush(self.free_rows, sequence.row)
        sequence.finish_reason = reason
        text = sequence.detokenizer.flush() if sequence.detokenizer else ""
        return GenerationEvent(sequence.key, None, text, reason, len(sequence.generated), error)

    def step(self) -> list[GenerationEvent]:
        """Admit waiting sequences into free rows, then one forward per kind of work (prefill of the
        admitted, one token for the running), one sampling of all rows and one copy to the host."""
        admitted = []
        while self.waiting and self.free_rows:
            sequence = self.waiting.popleft()
            sequence.row = heapq.heappop(self.free_rows)  # the lowest free row: the busy ones stay a prefix
            self._mark_seen(sequence)
            admitted.append(sequence)
        # Rows in ascending order: when they are 0..n-1 the model reads the cache without copying it.
        work = [(s, True) for s in admitted] + [(s, False) for s in sorted(self.running, key=lambda s: s.row)]
        self.running.extend(admitted)
        if not work:
            if self.synced:
                self.dummy_forward()
            return []
        events = self._run(work)
        for sequence in [s for s in self.running if s.finished]:
            self.running.remove(sequence)
            heapq.heappush(self.free_rows, sequence.row)
        return events

    def dummy_forward(self) -> None:
        """A forward pass on one throw-away token: under ZeRO-3 every rank must join every forward."""
        self.model(torch.zeros(1, 1, dtype=torch.long, device=self.device))

    # -- internals
    def _mark_seen(self, sequence: SequenceState) -> None:
        if sequence.params.repetition_penalty != 1.0 and self._seen is None:
            self._seen = torch.zeros(self.rows, self.vocab_size, dtype=torch.bool, device=self.device)
        if self._seen is not None:
            self._seen[sequence.row] = False
            self._seen[sequence.row, torch.tensor(sequence.prompt, device=self.device)] = True

    def _run(self, work: list[tuple[SequenceState, bool]]) -> list[GenerationEvent]:
        """Forward, sample and advance ``work`` ((sequence, needs prefill)); a forward or sampling failure
        is retried on each half, down to the one sequence that fails, which alone ends with an error."""
        sequences = [s for s, _ in work]
        try:
            logits = self._logits(work)
            for sequence in sequences:
                if sequence.uniform is None:
                    sequence.uniform = sequence.rng.random()
            seen = None
            rows = torch.tensor([s.row for s in sequences], device=self.device)
            if self._seen is not None and any(s.params.repetition_penalty != 1.0 for s in sequences):
                seen = self._seen[rows]
            sampled = sample(logits, [s.params for s in sequences], [s.uniform for s in sequences], seen)
            if self._seen is not None:
                self._seen[rows, sampled.tokens] = True
            results = sampled.to_host()
        except Exception as err:
            if self.synced:  # every rank must run the same forward passes: no retrying part of the batch
                raise
            if len(work) == 1:
                return [self._fail(sequences[0], f"{type(err).__name__}: {err}")]
            half = len(work) // 2
            return self._run(work[:half]) + self._run(work[half:])
        return [self._advance(s, *result) for s, result in zip(sequences, results)]

    def _logits(self, work: list[tuple[SequenceState, bool]]) -> torch.Tensor:
        """The last position's logits [len(work), vocab] of each sequence; ``work`` lists the sequences
        to prefill before those to decode (as :meth:`step` builds it and halving keeps it)."""
        if self.cache is None:  # reference path: the whole sequence every step
            return self._last_logits([s.prompt + s.generated for s, _ in work])
        prefill = [s for s, needs in work if needs]
        decode = [s for s, needs in work if not needs]
        parts = []
        if prefill:
            parts.append(self._last_logits([s.prompt for s in prefill], [s.row for s in prefill]))
        if decode:
            device = self.device
            tokens = torch.tensor([[s.generated[-1]] for s in decode]).to(device, non_blocking=True)
            positions = torch.tensor([[s.length - 1] for s in decode]).to(device, non_blocking=True)
            logits = self.model(tokens, positions=positions, cache=self.cache, rows=self._rows([s.row for s in decode]),
                                span=max(s.length for s in decode))
            parts.append(logits[:, -1])
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _rows(self, rows: list[int]) -> torch.Tensor | None:
        """The cache rows for the model: None when they are 0..n-1 in order (read as views, not copies)."""
        return None if rows == list(range(len(rows))) else torch.tensor(rows).to(self.device, non_blocking=True)

    def _last_logits(self, sequences: list[list[int]], rows: list[int] | None = None) -> torch.Tensor:
        tokens, lengths = _right_padded(sequences)
        tokens = tokens.to(self.device, non_blocking=True)
        if rows is None:
            logits = self.model(tokens)
        else:
            # Padding positions write junk keys past each prompt's end; the mask hides them and decoding
            # overwrites them position by position, so they are never attended to.
            positions = torch.arange(tokens.shape[1], device=self.device).expand_as(tokens)
            logits = self.model(tokens, positions=positions, cache=self.cache, rows=self._rows(rows),
                                span=tokens.shape[1])
        last = torch.tensor([n - 1 for n in lengths]).to(self.device, non_blocking=True)
        return logits[torch.arange(len(sequences), device=self.device), last]

    def _advance(self, sequence: SequenceState, token: int, logprob: float, bad: bool,
                 top: list[tuple[int, float]]) -> GenerationEvent:
        if bad:
            return self._fail(sequence, "the model's logits were not finite")
        params = sequence.params
        sequence.uniform = None
        top_logprobs = tuple(top[: params.top_logprobs]) if params.top_logprobs else None
        try:
            text, finish_reason, is_stop = "", None, token in params.stop_token_ids
            if is_stop:
                finish_reason = "stop"  # the stop token ends the answer; it is not part of it
            else:
                sequence.generated.append(token)
                if sequence.detokenizer is not None:
                    text, hit_stop = sequence.detokenizer.add(token)
                    finish_reason = "stop" if hit_stop else None
                if finish_reason is None and (len(sequence.generated) >= params.max_new_tokens
                                              or sequence.length >= self.max_len):
                    finish_reason = "length"
            if finish_reason is not None and sequence.detokenizer is not None:
                text += sequence.detokenizer.flush()
        except Exception as err:  # e.g. a tokenizer that cannot decode this token: this sequence only
            return self._fail(sequence, f"{type(err).__name__}: {err}")
        sequence.finish_reason = finish_reason
        return GenerationEvent(sequence.key, token, text, finish_reason, len(sequence.generated), None,
                               logprob, top_logprobs, is_stop)

    def _fail(self, sequence: SequenceState, error: str) -> GenerationEvent:
        sequence.finish_reason = "error"
        return GenerationEvent(sequence.key, None, "", "error", len(sequence.generated), error)


# ---- whole batches of prompts ----------------------------------------------------------------------------
@dataclass
class Completion:
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)  # the answer (a stop token is not part of it)
    text: str = ""
    finish_reason: str | None = None  # "stop", "length", or "error" (then ``error`` says why)
    logprobs: list[float] = field(default_factory=list)  # per sampled token: token_ids, then stop_token_id
    stop_token_id: int | None = None  # the stop token that ended the answer, if one did
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per sampled token, if asked
    error: str | None = None

    @property
    def sampled_ids(self) -> list[int]:
        """Every token the model produced: the answer, then the stop token (what ``logprobs`` covers)."""
        return self.token_ids + ([] if self.stop_token_id is None else [self.stop_token_id])


def generate_stream(model, prompts: Sequence[Sequence[int]],
                    params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                    tokenizer: Tokenizer | None = None, use_cache: bool = True, synced: bool = False,
                    max_batch_size: int | None = None) -> Iterator[list[GenerationEvent]]:
    """Decode all prompts together; after each step yield that step's events (``sequence_id`` is the
    prompt's index). ``model`` may be a DeepSpeed engine wrapping our Transformer.

    ``max_batch_size`` bounds the rows decoded at once (the rest wait for a free row). ``synced=True``
    with torch.distributed initialised: every rank keeps running forward passes — on a dummy token once
    its own prompts are done — until every rank is done (an all_reduce of the unfinished count per step),
    as Hugging Face's ``synced_gpus``: under ZeRO-3 each forward is a collective. Ranks may have
    different numbers of prompts (none included); every prompt is admitted at the first step.
    """
    per_row = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(per_row) != len(prompts):
        raise ValueError("give one SamplingParams, or one per prompt")
    synced = synced and torch.distributed.is_available() and torch.distributed.is_initialized()
    rows = max(1, len(prompts) if max_batch_size is None else min(max_batch_size, len(prompts)))
    if synced and rows < len(prompts):
        raise ValueError("synced generation admits every prompt at once: max_batch_size must cover them all")
    config = getattr(model, "module", model).config
    span = max((min(config.max_seq_len, len(p) + sp.max_new_tokens) for p, sp in zip(prompts, per_row)),
               default=1)
    decoder = Decoder(model, rows, tokenizer, max_len=span, use_cache=use_cache, synced=synced)
    for index, (prompt, sampling) in enumerate(zip(prompts, per_row)):
        try:
            decoder.add(index, prompt, sampling)
        except PromptTooLongError as err:
            raise PromptTooLongError(f"prompt {index}: {err}") from None
        except ValueError as err:
            raise ValueError(f"prompt {index}: {err}") from None
    was_training = model.training
    model.eval()
    try:
        while True:
            with _no_grad(model):  # per step: a context held across `yield` would leak to the caller
                events = decoder.step()
            if events:
                yield events
            if not (_any_rank_has_work(decoder) if synced else decoder.has_work()):
                break
    finally:
        model.train(was_training)


def _any_rank_has_work(decoder: Decoder) -> bool:
    import torch.distributed as dist

    device = decoder.device if dist.get_backend() == "nccl" else torch.device("cpu")
    unfinished = torch.tensor([len(decoder.waiting) + len(decoder.running)], device=device)
    dist.all_reduce(unfinished)
    return int(unfinished.item()) > 0


def generate(model, prompts: Sequence[Sequence[int]],
             params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
             tokenizer: Tokenizer | None = None, use_cache: bool = True, synced: bool = False,
             max_batch_size: int | None = None) -> list[Completion]:
    """Generate for every prompt (see :func:`generate_stream`): each completion's tokens, text, finish
    reason and per-token log-probabilities."""
    results = [Completion(prompt_tokens=len(p)) for p in prompts]
    for events in generate_stream(model, prompts, params, tokenizer, use_cache, synced, max_batch_size):
        for event in events:
            result = results[event.sequence_id]
            if event.token_id is not None:
                if event.is_stop_token:
                    result.stop_token_id = event.token_id
                else:
                    result.token_ids.append(event.token_id)
                result.logprobs.append(event.logprob)
                if event.top_logprobs is not None:
                    result.top_logprobs.append(list(event.top_logprobs))
            result.text += event.text
            result.finish_reason, result.error = event.finish_reason, event.error
    return results


# ---- beam search ---------------------------------------------------------------------------------------
@dataclass
class _Beam:
    tokens: list[int]
    score: float  # sum of the tokens' log-probabilities
    logprobs: list[float]


class BeamSearch:
    """Beam search for one prompt with ``width`` beams in KV-cache rows of its own; each :meth:`step` is
    one forward pass (so a server can interleave it with other work). Scores are sums of raw log-probs;
    finished answers rank by score / length**length_penalty. Sampling settings other than
    ``max_new_tokens``, ``stop`` and ``stop_token_ids`` do not apply."""

    def __init__(self, model, prompt: Sequence[int], params: SamplingParams, width: int, n: int = 1,
                 tokenizer: Tokenizer | None = None, length_penalty: float = 1.0):
        if not 1 <= n <= width:
            raise ValueError(f"beam search returns n answers from width beams: need 1 <= n <= width, got "
                             f"n={n}, width={width}")
        module = getattr(model, "module", model)
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.width, self.n, self.length_penalty = width, n, length_penalty
        context = module.config.max_seq_len
        self.max_len = min(context, len(prompt) + params.max_new_tokens)
        self.prompt = check_prompt(prompt, module.config.vocab_size, context)
        parameter = next(module.parameters())
        self.device = parameter.device
        self.cache = KVCache.allocate(module.config, width, self.max_len, self.device, parameter.dtype)
        self.beams = [_Beam([], 0.0, [])]
        self.finished: list[tuple[float, _Beam, int | None, str]] = []  # (normalised score, beam, stop, reason)
        self.done = False

    def _normalised(self, score: float, length: int) -> float:
        return score / max(1, length) ** self.length_penalty

    def step(self) -> bool:
        """One forward pass and beam update; returns True once the search is done."""
        if self.done:
            return True
        with _no_grad(self.model):
            logprobs = self._next_logprobs()
            vocab = logprobs.shape[1]
            scores = torch.tensor([b.score for b in self.beams], device=self.device)[:, None] + logprobs
            values, flat = scores.view(-1).topk(min(2 * self.width, scores.numel()))
            picked = logprobs.view(-1)[flat]
            candidates = torch.stack([values.double(), flat.double(), picked.double()], 1).cpu().tolist()
            beams, parents = [], []
            for rank, (value, index, logprob) in enumerate(candidates):
                if not math.isfinite(value):
                    break
                parent, token = divmod(int(index), vocab)
                beam = _Beam(self.beams[parent].tokens + [token], value, self.beams[parent].logprobs + [logprob])
                if token in self.params.stop_token_ids:
                    if rank < self.width:  # a stop token among the best: that answer is complete
                        beam.tokens.pop()
                        self._finish(beam, token, "stop")
                    continue
                beams.append(beam)
                parents.append(parent)
                if len(beams) == self.width:
                    break
            if beams:
                order = torch.tensor(parents, device=self.device)
                for layer in range(len(self.cache.keys)):  # each beam continues its parent's cache
                    self.cache.keys[layer][: len(beams)] = self.cache.keys[layer][order]
                    self.cache.values[layer][: len(beams)] = self.cache.values[layer][order]
        self.beams = beams
        length = len(beams[0].tokens) if beams else 0
        if beams and (length >= self.params.max_new_tokens or len(self.prompt) + length >= self.max_len):
            for beam in beams:
                self._finish(beam, None, "length")
            self.beams = []
        best_live = max((self._normalised(b.score, len(b.tokens)) for b in self.beams), default=-math.inf)
        worst_kept = (sorted(f[0] for f in self.finished)[-self.width] if len(self.finished) >= self.width
                      else -math.inf)
        self.done = not self.beams or best_live <= worst_kept
        return self.done

    def _next_logprobs(self) -> torch.Tensor:
        if not self.beams[0].tokens:  # the prompt, in row 0 (the first reorder copies it to every beam)
            tokens = torch.tensor([self.prompt], device=self.device)
            positions = torch.arange(len(self.prompt), device=self.device)[None]
            span = len(self.prompt)
        else:
            position = len(self.prompt) + len(self.beams[0].tokens) - 1
            tokens = torch.tensor([[b.tokens[-1]] for b in self.beams], device=self.device)
            positions = torch.full((len(self.beams), 1), position, device=self.device)
            span = position + 1
        # rows None: the beams sit in rows 0..width-1
        logits = self.model(tokens, positions=positions, cache=self.cache, span=span)[:, -1].float()
        return torch.log_softmax(logits, dim=-1).nan_to_num(nan=float("-inf"))

    def _finish(self, beam: _Beam, stop_token: int | None, reason: str) -> None:
        length = len(beam.tokens) + (stop_token is not None)
        self.finished.append((self._normalised(beam.score, length), beam, stop_token, reason))

    def results(self) -> list[Completion]:
        """The ``n`` best answers, best first."""
        best = sorted(self.finished, key=lambda f: -f[0])[: self.n]
        completions = []
        for _, beam, stop_token, reason in best:
            completion = Completion(len(self.prompt), list(beam.tokens), finish_reason=reason,
                                    logprobs=list(beam.logprobs), stop_token_id=stop_token)
            if self.tokenizer is not None:
                completion.text, hit_stop = answer_text(self.tokenizer, self.prompt, beam.tokens, self.params.stop)
                completion.finish_reason = "stop" if hit_stop else reason
            completions.append(completion)
        return completions


def beam_search(model, prompt: Sequence[int], params: SamplingParams, width: int, n: int = 1,
                tokenizer: Tokenizer | None = None, length_penalty: float = 1.0) -> list[Completion]:
    """The ``n`` best of ``width`` beams for one prompt (see :class:`BeamSearch`), best first."""
    search = BeamSearch(model, prompt, params, width, n, tokenizer, length_penalty)
    was_training = model.training
    model.eval()
    try:
        while not search.step():
            pass
    finally:
        model.train(was_training)
    return search.results()
