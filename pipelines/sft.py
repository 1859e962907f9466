"""``groundup sft``: supervised fine-tuning on conversations, a Task of the one training core.

The loss is next-token cross entropy on the assistant's tokens only (the chat template's assistant
mask: each reply and its closing ``<|end|>``); system and user tokens are context, never targets.
Conversations are padded per row, rows of similar length batched together (see
``pipelines/train/conversations.py`` for why padding rather than packing). Starts from
``<run>/pretrain/model`` (or ``--from``), keeps its tokenizer, writes ``<run>/sft/model``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.cli import stage_main
from pipelines.posttrain import (
    LoraSettings,
    ModelSource,
    PostTrainConfig,
    common_flags,
    data_dir,
    describe_data,
    epochs,
    load_examples,
    loop_spec,
    plan_training,
    require_examples,
    resolve_model,
    save_sequences,
    tokenize,
    write_rejects,
)
from pipelines.rundir import RunDir
from pipelines.train.conversations import (
    PaddedBatch,
    TokenizedSequences,
    encode_conversation,
    length_grouped,
    pad_batch,
    parse_conversation,
)
from pipelines.train.data import BatchOrder
from pipelines.train.task import Figures, StepContext, TaskDefaults, TaskLoss

STAGE = "sft"


class Config(PostTrainConfig):
    TRAIN_DEFAULTS: ClassVar[dict[str, Any]] = {"optimizer": {"lr": 1e-4}, "length": {"steps": 200}}


CLI_FLAGS = common_flags("--data", "conversations: JSONL/Parquet file or directory (repeatable; default: built-in)")


def evaluation_rows(total: int, max_rows: int, rank: int, world: int) -> np.ndarray:
    """The first ``max_rows`` validation rows, dealt to ranks round-robin (counts may differ by one:
    the loop evens out forward passes)."""
    return np.arange(min(total, max_rows))[rank::world]


@dataclass
class SFTTask(TaskDefaults):
    source: ModelSource
    train_set: TokenizedSequences
    validation_set: TokenizedSequences
    order: BatchOrder
    lora: LoraSettings
    eval_max_rows: int
    seed: int
    name: str = STAGE

    def build_model(self) -> torch.nn.Module:
        return self.lora.apply(self.source.load_language_model())

    def train_micro_batches(self, step: int, rank: int, world: int, micro_batch_size: int) -> list[PaddedBatch]:
        rows = self.order.step_rows(step)
        groups = length_grouped(rows, self.train_set.lengths(), rank, world, micro_batch_size)
        return [pad_batch([self.train_set.get(int(i)) for i in group]) for group in groups]

    def count(self, batch: PaddedBatch) -> int:
        return batch.count

    def _loss_sum(self, model, batch: PaddedBatch, device: torch.device) -> torch.Tensor:
        logits = model(batch.tokens[:, :-1].to(device)).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.targets.to(device).reshape(-1),
                               ignore_index=-100, reduction="sum")

    def loss(self, ctx: StepContext, batch: PaddedBatch) -> TaskLoss:
        return TaskLoss(self._loss_sum(ctx.model, batch, ctx.device), tokens=batch.real_tokens)

    def eval_batches(self, rank: int, world: int, micro_batch_size: int) -> list[PaddedBatch]:
        rows = evaluation_rows(len(self.validation_set), self.eval_max_rows, rank, world)
        return [pad_batch([self.validation_set.get(int(i)) for i in rows[k:k + micro_batch_size]])
                for k in range(0, len(rows), micro_batch_size)]

    def eval_figures(self, ctx: StepContext, batch: PaddedBatch) -> Figures:
        return {"loss": (float(self._loss_sum(ctx.model, batch, ctx.device)), batch.count)}

    def eval_summary(self, means: dict[str, float]) -> dict[str, float]:
        return {"val_loss": means["loss"], "val_perplexity": math.exp(min(means["loss"], 50.0))}

    def export(self, state_dict: dict[str, torch.Tensor], directory: Path, figures: dict[str, float]) -> None:
        from model.checkpoint import save_checkpoint

        save_checkpoint(language_model_from(self.source, self.lora, state_dict), directory,
                        self.source.load_tokenizer(), metadata={"stage": self.name})

    def data_position(self, step: int) -> dict[str, int]:
        return self.order.position(step)


def language_model_from(source: ModelSource, lora: LoraSettings, state_dict: dict[str, torch.Tensor]):
    """The trained weights as a plain Transformer (LoRA adapters merged into the weights)."""
    from model.llama import Transformer

    if lora.rank:
        from model.lora import merged

        model = lora.apply(Transformer(source.model_config()))
        model.load_state_dict(state_dict, strict=False)
        return merged(model).eval()
    model = Transformer(source.model_config())
    model.load_state_dict(state_dict, strict=False)  # a tied output weight may be absent
    return model.eval()


def prepare(config: Config, stage: str = STAGE, defaults: tuple[str, ...] = ("pretrain",)):
    """Driver-side: model, examples (tokenized, written for the workers), plan, DeepSpeed config."""
    from pipelines.data.instructions import builtin_conversations
    from pipelines.train.trainer import decide_use_gpu

    run = RunDir(config.run)
    source = resolve_model(config, defaults)
    model_config = source.model_config()
    max_len = min(config.max_len or model_config.max_seq_len, model_config.max_seq_len)
    examples = load_examples(config, parse_conversation, key=lambda m: repr(m), builtin=builtin_conversations,
                             builtin_name="builtin:instructions")
    tokenizer = source.load_tokenizer()
    encode = lambda messages: encode_conversation(tokenizer, messages, max_len)
    train = tokenize(examples.train, encode, examples.rejects, "train")
    validation = tokenize(examples.validation, encode, examples.rejects, "validation")
    require_examples(train, validation, examples.rejects, "conversation")
    describe_data(stage, examples, len(train), len(validation))
    write_rejects(run, stage, examples.rejects)
    directory = data_dir(run, stage)
    train_set, validation_set = save_sequences(directory, "train", train), save_sequences(directory, "validation",
                                                                                         validation)
    has_gpu, gpu_bf16 = decide_use_gpu(config.train.use_gpu, config.num_cpus)
    plan = plan_training(config, len(train), model_config, max_len, has_gpu, gpu_bf16)
    order = BatchOrder(len(train), plan.global_batch_sequences, config.seed)
    task = SFTTask(source=source, train_set=train_set, validation_set=validation_set, order=order, lora=config.lora,
                   eval_max_rows=config.train.eval.max_rows, seed=config.seed, name=stage)
    return loop_spec(config, stage, task, plan), source, examples, has_gpu, (len(train), len(validation))


def run(config: Config) -> dict[str, Any]:
    from pipelines.train.stage import TrainingJob, check_resume, run_training

    started = time.time()
    check_resume(config, STAGE)
    spec, source, examples, use_gpu, (n_train, n_validation) = prepare(config)
    print(f"{STAGE}: from {source.path}: {source.model_config().describe()}", flush=True)
    print(f"{STAGE}: {spec.plan.describe()} ({epochs(spec.plan, n_train):.2f} epochs)", flush=True)
    job = TrainingJob(
        stage=STAGE, config=config, spec=spec, use_gpu=use_gpu, title=f"sft — {config.run}",
        inputs={"model": source.path, "data": examples.sources},
        counts={"train_examples": n_train, "validation_examples": n_validation,
                "rejected": dict(examples.rejects.counts), "epochs": epochs(spec.plan, n_train)},
        summary_figures=("final_train_loss", "start_val_loss", "val_loss"))
    return run_training(job, started)


if __name__ == "__main__":
    stage_main(STAGE)
