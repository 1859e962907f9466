"""Preference pairs for reward modelling and DPO: where they come from, their tokenized form, batches.

Inputs, in order: ``--pairs`` files; else ``<run>/prefs/`` (what ``groundup prefs export --run RUN``
writes from the rating app's votes); else the built-in rule-labelled pairs
(``pipelines.data.instructions.builtin_preference_pairs``). A batch holds the chosen rows then the
rejected rows of its pairs, padded together, so one forward pass scores both sides.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from pipelines.posttrain import (ModelSource, PostTrainConfig, data_dir, describe_data, load_examples, loop_spec,
                                 plan_training, require_examples, resolve_model, tokenize, write_rejects)
from pipelines.rundir import RunDir
from pipelines.train.conversations import (PaddedBatch, Pair, TokenizedSequences, encode_reply, length_grouped,
                                           pad_batch, parse_pair)
from pipelines.train.data import BatchOrder


@dataclass
class PairBatch:
    both: PaddedBatch  # rows 0..n-1 chosen, n..2n-1 rejected
    margins: torch.Tensor  # [n]

    @property
    def pairs(self) -> int:
        return len(self.margins)


@dataclass
class PairSet:
    """Tokenized pairs on disk (chosen and rejected sequences with reply masks, margins). Picklable."""

    chosen: TokenizedSequences
    rejected: TokenizedSequences
    margins_path: str

    def __len__(self) -> int:
        return len(self.chosen)

    def lengths(self) -> np.ndarray:
        return np.maximum(self.chosen.lengths(), self.rejected.lengths())

    def batch(self, indices) -> PairBatch:
        indices = [int(i) for i in indices]
        margins = np.load(self.margins_path, mmap_mode="r")
        both = pad_batch([self.chosen.get(i) for i in indices] + [self.rejected.get(i) for i in indices])
        return PairBatch(both, torch.tensor([float(margins[i]) for i in indices], dtype=torch.float32))


def default_pair_files(config: PostTrainConfig) -> PostTrainConfig:
    """``config`` with ``<run>/prefs/{train,validation}.*`` as inputs when no ``--pairs`` were given and
    the rating app's votes were exported there."""
    if config.data:
        return config
    run = RunDir(config.run)
    for suffix in ("jsonl", "parquet"):
        if run.exists("prefs", f"train.{suffix}"):
            validation = [run.uri_of("prefs", f"validation.{suffix}")] if run.exists("prefs", f"validation.{suffix}") \
                else []
            return config.model_copy(update={"data": [run.uri_of("prefs", f"train.{suffix}")], "validation": validation})
    return config


def write_pairs(directory, name: str, pairs: list[tuple[Any, Any, float]]) -> PairSet:
    chosen = TokenizedSequences.write(directory / f"{name}.chosen", [c for c, _, _ in pairs])
    rejected = TokenizedSequences.write(directory / f"{name}.rejected", [r for _, r, _ in pairs])
    margins_path = directory / f"{name}.margins.npy"
    np.save(margins_path, np.array([m for _, _, m in pairs], dtype=np.float32))
    return PairSet(chosen, rejected, str(margins_path))


def prepare_pairs(config: PostTrainConfig, stage: str, source: ModelSource, max_len: int):
    """Read, check and tokenize the pairs; write them for the workers. Returns (train, validation, examples)."""
    from pipelines.data.instructions import builtin_preference_pairs

    config = default_pair_files(config)
    examples = load_examples(config, parse_pair, key=lambda p: repr(p.prompt), builtin=builtin_preference_pairs,
                             builtin_name="builtin:rule-pairs")
    tokenizer = source.load_tokenizer()

    def encode(pair: Pair):
        return (encode_reply(tokenizer, pair.prompt, pair.chosen, max_len),
                encode_reply(tokenizer, pair.prompt, pair.rejected, max_len), pair.margin)

    train = tokenize(examples.train, encode, examples.rejects, "train")
    validation = tokenize(examples.validation, encode, examples.rejects, "validation")
    require_examples(train, validation, examples.rejects, "pair")
    run = RunDir(config.run)
    describe_data(stage, examples, len(train), len(validation))
    write_rejects(run, stage, examples.rejects)
    directory = data_dir(run, stage)
    return write_pairs(directory, "train", train), write_pairs(directory, "validation", validation), examples


@dataclass
class PairBatches:
    """The batching part of a pair Task: seeded order, length-grouped micro-batches, evaluation rows."""

    train_set: PairSet
    validation_set: PairSet
    order: BatchOrder
    eval_max_rows: int

    def train_micro_batches(self, step: int, rank: int, world: int, micro_batch_size: int) -> list[PairBatch]:
        groups = length_grouped(self.order.step_rows(step), self.train_set.lengths(), rank, world, micro_batch_size)
        return [self.train_set.batch(group) for group in groups]

    def eval_batches(self, rank: int, world: int, micro_batch_size: int) -> list[PairBatch]:
        rows = np.arange(min(len(self.validation_set), self.eval_max_rows))[rank::world]
        return [self.validation_set.batch(rows[k:k + micro_batch_size]) for k in range(0, len(rows), micro_batch_size)]

    def count(self, batch: PairBatch) -> int:
        return batch.pairs

    def data_position(self, step: int) -> dict[str, int]:
        return self.order.position(step)


def prepare_pair_stage(config: PostTrainConfig, stage: str, make_task: Callable[..., Any], allow_reward: bool = False):
    """Driver-side set-up shared by the reward and DPO stages: the starting model (SFT, else pretraining),
    the pairs, the plan and the LoopSpec. ``make_task(train_set, validation_set, order, source)``."""
    from pipelines.train.trainer import decide_use_gpu

    source = resolve_model(config, ("sft", "pretrain"), allow_reward=allow_reward)
    model_config = source.model_config()
    max_len = min(config.max_len or model_config.max_seq_len, model_config.max_seq_len)
    train_set, validation_set, examples = prepare_pairs(config, stage, source, max_len)
    has_gpu, gpu_bf16 = decide_use_gpu(config.train.use_gpu, config.num_cpus)
    plan = plan_training(config, len(train_set), model_config, max_len, has_gpu, gpu_bf16)
    task = make_task(train_set, validation_set, BatchOrder(len(train_set), plan.global_batch_sequences, config.seed),
                     source)
    return loop_spec(config, stage, task, plan), source, examples, has_gpu
