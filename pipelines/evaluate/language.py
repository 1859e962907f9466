"""Language modelling figures: bits per byte and perplexity.

- **The run's validation split**: the data stage's packed rows, scored exactly as the training stage
  scores them (each row's tokens 1..T given the ones before, mean loss over tokens, converted to bits per
  byte with the split's tokens/bytes ratio), over the same first rows — so a model's figure here is the
  last point of its training curve. A model whose tokenizer differs from the run's is scored on the
  rows' decoded text instead (bits per byte stay comparable across tokenizers; perplexity does not).
- **Text corpora** (``--text``: ``.txt`` is one document, ``.jsonl`` one per line with a ``text``
  field): every token of every document with a sliding window of the model's context; bits per byte is
  the summed log-likelihood over the documents' UTF-8 bytes.

Standard errors treat rows (or documents) as the sampled units (ratio estimator for unequal sizes).
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import ConfigError


def ratio_stderr(numerators: Sequence[float], denominators: Sequence[float]) -> float | None:
    """Standard error of sum(x)/sum(y) over units (x_i, y_i), by the delta method."""
    x, y = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    n = len(x)
    if n < 2 or y.sum() <= 0:
        return None
    ratio = x.sum() / y.sum()
    residual = x - ratio * y
    return float(math.sqrt((residual ** 2).sum() / (n * (n - 1))) / y.mean())


def read_text_corpus(path: str) -> list[str]:
    """Documents of a ``.txt`` (one document) or ``.jsonl`` (``text`` per line) file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"text corpus {path}: not found")
    if file.suffix in (".jsonl", ".json"):
        documents = []
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"text corpus {path} line {number}: not valid JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ConfigError(f"text corpus {path} line {number}: field 'text' must be a string")
            documents.append(record["text"])
    else:
        documents = [file.read_text(encoding="utf-8", errors="replace")]
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise ConfigError(f"text corpus {path}: no text")
    return documents


def text_figures(scorer, documents: Sequence[str], stride: int | None = None) -> dict[str, Any]:
    scores = scorer.rolling(documents, stride)
    nats = [-s.logprob for s in scores]
    tokens = [s.tokens for s in scores]
    sizes = [len(d.encode("utf-8")) for d in documents]
    total_nats, total_tokens, total_bytes = sum(nats), sum(tokens), sum(sizes)
    bpb_se = ratio_stderr(nats, sizes)
    loss_se = ratio_stderr(nats, tokens)
    mean_loss = total_nats / max(total_tokens, 1)
    return {
        "bits_per_byte": {"value": total_nats / math.log(2) / max(total_bytes, 1),
                          "stderr": None if bpb_se is None else bpb_se / math.log(2)},
        "perplexity": {"value": math.exp(min(mean_loss, 50.0)),
                       "stderr": None if loss_se is None else math.exp(min(mean_loss, 50.0)) * loss_se},
        "loss": {"value": mean_loss, "stderr": loss_se},
        "documents": {"value": len(documents), "stderr": None},
        "tokens": {"value": total_tokens, "stderr": None},
        "bytes": {"value": total_bytes, "stderr": None},
    }


def validation_rows(split_uri_shards, rows: int | None):
    """The first ``rows`` validation rows (None: all), as the training stage reads them."""
    count = split_uri_shards.num_rows if not rows else min(rows, split_uri_shards.num_rows)
    return split_uri_shards.rows(np.arange(count))


def validation_figures(scorer, validation: dict[str, Any], same_tokenizer: bool, batch_size: int = 16) -> dict[str, Any]:
    """``validation``: {"shards": PackedShards, "rows": int | None, "tokens": int, "bytes": int,
    "tokenizer": Tokenizer} built by the stage from the data manifest."""
    rows = validation_rows(validation["shards"], validation["rows"])
    if not same_tokenizer:
        from model.tokenizer import EOS_ID

        data_tokenizer = validation["tokenizer"]
        documents = []
        for row in rows.tolist():
            pieces = [[]]
            for token in row:
                if token == EOS_ID:
                    pieces.append([])
                else:
                    pieces[-1].append(token)
            documents.extend(data_tokenizer.decode(p) for p in pieces if p)
        figures = text_figures(scorer, [d for d in documents if d.strip()])
        figures["method"] = {"value": "decoded text (the model's tokenizer differs from the run's)", "stderr": None}
        return figures
    if getattr(scorer, "model", None) is None:  # an endpoint: rows cut to its context, scored over HTTP
        spans = [(r[: scorer.max_len], 1) for r in rows.tolist()]
        scored = scorer.score(spans)
        row_nats = [-s.logprob for s in scored]
        row_tokens = [s.tokens for s in scored]
    else:
        row_nats, row_tokens = _row_losses(scorer.model, rows, batch_size)
    mean_loss = sum(row_nats) / max(sum(row_tokens), 1)
    per_byte = validation["tokens"] / max(validation["bytes"], 1) / math.log(2)
    loss_se = ratio_stderr(row_nats, row_tokens)
    return {
        "bits_per_byte": {"value": mean_loss * per_byte, "stderr": None if loss_se is None else loss_se * per_byte},
        "perplexity": {"value": math.exp(min(mean_loss, 50.0)),
                       "stderr": None if loss_se is None else math.exp(min(mean_loss, 50.0)) * loss_se},
        "loss": {"value": mean_loss, "stderr": loss_se},
        "rows": {"value": len(row_nats), "stderr": None},
        "tokens": {"value": int(sum(row_tokens)), "stderr": None},
    }


def _row_losses(model, rows, batch_size: int) -> tuple[list[float], list[int]]:
    """Summed next-token loss of each row, as the training stage's evaluation computes it."""
    import torch

    from model.scoring import token_logprobs

    device = next(model.parameters()).device
    context = model.config.max_seq_len
    rows = rows[:, : context + 1]
    nats, counts = [], []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size].to(device)
            logprobs = token_logprobs(model(batch[:, :-1]).float(), batch[:, 1:])
            nats.extend((-logprobs.sum(dim=1)).double().cpu().tolist())
            counts.extend([batch.shape[1] - 1] * len(batch))
    return nats, counts
