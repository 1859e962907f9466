"""What SFT, reward modelling and DPO share: the config, where the starting model comes from, reading and
tokenizing the examples (bad rows set aside), and building the training job. Each stage module adds
only its Task (``pipelines/sft.py``, ``reward.py``, ``dpo.py``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import ConfigDict, Field, model_validator

from pipelines.cli import Flag
from pipelines.config import ConfigError, StageConfig, StrictModel
from pipelines.rundir import RunDir, local_copy
from pipelines.train.config import TrainConfig
from pipelines.train.conversations import REJECTS_FILE, Rejects, RowError, TokenizedSequences, read_rows

# Stage defaults for the training settings (a user's partial `train.*` overrides keep the rest).
POSTTRAIN_DEFAULTS: dict[str, Any] = {
    "optimizer": {"lr": 1e-4, "weight_decay": 0.0},
    "schedule": {"kind": "cosine", "warmup_fraction": 0.05},
    "batch": {"micro_batch_size": 8, "global_batch_sequences": 32},
    "length": {"steps": 100},
    "eval": {"every_steps": 50, "max_rows": 256, "samples": 0, "at_start": True},
    "checkpoint": {"every_steps": 100},
}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


class LoraSettings(StrictModel):
    rank: int = Field(0, ge=0, description="LoRA rank (0 = full fine-tuning)")
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"],
                               description="linear layers that get adapters")

    def apply(self, model):
        """``model`` with adapters on the target layers (only they train), or ``model`` itself at rank 0."""
        if not self.rank:
            return model
        from model.lora import add_lora

        return add_lora(model, self.rank, self.alpha, self.dropout, self.targets)


class PostTrainConfig(StageConfig):
    model_from: str | None = Field(None, alias="from", description="starting checkpoint (ours or a Hugging Face "
                                   "Llama directory); default: the previous stage's model in the run")
    data: list[str] = Field(default_factory=list, description="input files or directories (default: built-in)")
    validation: list[str] = Field(default_factory=list, description="validation files (default: held out from data)")
    validation_share: float = Field(0.05, ge=0, lt=1, description="share of the rows held out when no validation "
                                    "files are given (by content hash)")
    max_len: int | None = Field(None, ge=8, description="longest sequence in tokens (default: the model's context)")
    train: TrainConfig = TrainConfig()
    lora: LoraSettings = LoraSettings()
    resume: bool = Field(False, description="continue the run's latest complete checkpoint")
    show_replies: bool = Field(True, description="print the starting and trained models' replies to held-out "
                               "questions at the end (the manifest keeps them either way)")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a Ray started by this stage (default: all)")

    model_config = ConfigDict(populate_by_name=True)
    TRAIN_DEFAULTS: ClassVar[dict[str, Any]] = {}  # each stage's own defaults over POSTTRAIN_DEFAULTS

    @model_validator(mode="before")
    @classmethod
    def _stage_train_defaults(cls, values: Any) -> Any:
        if isinstance(values, dict):
            defaults = deep_merge(POSTTRAIN_DEFAULTS, cls.TRAIN_DEFAULTS)
            train = values.get("train")
            values = {**values, "train": deep_merge(defaults, train if isinstance(train, dict) else {})}
        return values


def common_flags(data_flag: str, data_help: str) -> tuple[Flag, ...]:
    return (
        Flag(("--run",), "run", "run directory (outputs go to <run>/<stage>/)"),
        Flag(("--from",), "model_from", "starting checkpoint or Hugging Face Llama directory"),
        Flag((data_flag,), "data", data_help, {"action": "append"}),
        Flag(("--seed",), "seed", "seed for data order and sampling", {"type": int}),
        Flag(("--workers",), "train.num_workers", "Ray Train workers", {"type": int}),
        Flag(("--steps",), "train.length.steps", "optimizer steps", {"type": int}),
        Flag(("--zero",), "train.zero.stage", "DeepSpeed ZeRO stage 0-3", {"type": int}),
        Flag(("--precision",), "train.precision.dtype", "auto, bf16, fp16 or fp32"),
        Flag(("--lr",), "train.optimizer.lr", "peak learning rate", {"type": float}),
        Flag(("--lora-rank",), "lora.rank", "train LoRA adapters of this rank instead of all weights", {"type": int}),
        Flag(("--resume",), "resume", "continue from the latest complete checkpoint",
             {"action": "store_const", "const": True}),
    )


# ---- the starting model ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSource:
    path: str  # a local directory (object-store checkpoints are copied to this node first)
    kind: str  # "groundup" | "hf" | "reward"
    model_fields: dict[str, Any]

    def model_config(self):
        from model.config import ModelConfig

        return ModelConfig(**self.model_fields)

    def load_language_model(self):
        import torch

        if self.kind == "hf":
            from model.hf import import_hf

            return import_hf(self.path)[0].float()
        if self.kind == "reward":  # a reward model's backbone (PPO's critic starts from it)
            from model.reward import load_reward_model

            return load_reward_model(self.path).backbone
        from model.checkpoint import load_model

        return load_model(self.path, dtype=torch.float32)

    def load_tokenizer(self):
        from model.checkpoint import load_tokenizer

        return load_tokenizer(self.path)


def resolve_model(config: PostTrainConfig, defaults: Sequence[str], allow_reward: bool = False) -> ModelSource:
    """The starting model: ``--from`` or the first of ``defaults`` (stage names) the run holds."""
    from model.checkpoint import CheckpointError, read_model_config
    from model.hf import config_from_hf, is_hf_directory
    from model.reward import is_reward_directory

    run = RunDir(config.run)
    if config.model_from:
        uri, field_name = config.model_from, "from"
    else:
        found = [s for s in defaults if run.exists(s, "model", "config.json")]
        if not found:
            first = defaults[-1]
            raise ConfigError(f"no model at {run.uri_of(first, 'model')}: run `groundup {first} --run {config.run}` "
                              f"first, or give --from PATH")
        uri, field_name = run.uri_of(found[0], "model"), "run"
    try:
        path = local_copy(uri)
    except ConfigError:
        raise ConfigError(f"config field '{field_name}': no checkpoint at {uri}") from None
    if not path.is_dir():
        raise ConfigError(f"config field '{field_name}': {uri} is not a checkpoint directory")
    try:
        if is_hf_directory(path):
            import json

            fields = config_from_hf(json.loads((path / "config.json").read_text())).model_dump()
            kind = "hf"
        else:
            if is_reward_directory(path) and not allow_reward:
                raise ConfigError(f"config field '{field_name}': {uri} is a reward model; this stage needs a "
                                  "language model (an SFT or pretraining checkpoint)")
            fields = read_model_config(path).model_dump()
            kind = "reward" if is_reward_directory(path) else "groundup"
        if not (path / "tokenizer.model").is_file():
            raise CheckpointError(f"checkpoint {uri}: no tokenizer.model")
    except CheckpointError as err:
        raise ConfigError(f"config field '{field_name}': {err}") from None
    return ModelSource(str(path), kind, fields)


# ---- examples -------------------------------------------------------------------------------------
@dataclass
class Examples:
    train: list[Any]
    validation: list[Any]
    rejects: Rejects
    sources: list[str]


def load_examples(config: PostTrainConfig, parse: Callable[[Any], Any], key: Callable[[Any], str],
                  builtin: Callable[[str], list[dict]], builtin_name: str) -> Examples:
    """Parse every row of the inputs (``config.data``, else the built-in set); bad rows are counted and
    kept for ``rejects.jsonl``. Validation: ``config.validation`` files, else a share held out by content
    hash (the built-in set has its own split)."""
    from pipelines.train.conversations import split_for_validation

    rejects = Rejects()

    def parsed(uri: str) -> list[Any]:
        good = []
        for where, row in read_rows(uri):
            try:
                good.append(parse(row))
            except RowError as err:
                rejects.add(where, err, row)
        return good

    inputs = list(config.data)
    if not inputs:
        train_rows, validation_rows = [], []
        for split, target in (("train", train_rows), ("validation", validation_rows)):
            for index, row in enumerate(builtin(split)):
                try:
                    target.append(parse(row))
                except RowError as err:
                    rejects.add(f"{builtin_name}/{split}:{index + 1}", err, row)
        return Examples(train_rows, validation_rows, rejects, [builtin_name])
    everything = [example for uri in inputs for example in parsed(uri)]
    if config.validation:
        validation = [example for uri in config.validation for example in parsed(uri)]
        train = everything
    else:
        held = [split_for_validation(key(e), config.validation_share) for e in everything]
        train = [e for e, h in zip(everything, held) if not h]
        validation = [e for e, h in zip(everything, held) if h]
    return Examples(train, validation, rejects, [*inputs, *config.validation])


def tokenize(examples: Sequence[Any], encode: Callable[[Any], Any], rejects: Rejects, split: str) -> list[Any]:
    """Encoded examples; one too long for the context is a reject (``too_long``), not a crash."""
    out = []
    for index, example in enumerate(examples):
        try:
            out.append(encode(example))
        except RowError as err:
            rejects.add(f"{split}:{index + 1}", err, example.__dict__ if hasattr(example, "__dict__") else example)
    return out


def require_examples(train: Sequence[Any], validation: Sequence[Any], rejects: Rejects, what: str) -> None:
    """One line naming the field when nothing usable is left for training or validation."""
    if not train:
        raise ConfigError(f"config field 'data': no usable training {what} ({rejects.total} set aside: "
                          f"{dict(rejects.counts)})")
    if not validation:
        raise ConfigError(f"config field 'validation': no validation {what} (give validation files or raise "
                          "validation_share)")


def loop_spec(config: PostTrainConfig, stage: str, task: Any, plan: Any, train: TrainConfig | None = None):
    """The workers' LoopSpec for a stage of the run (logs under ``<run>/<stage>/``)."""
    from pipelines.train.deepspeed_config import deepspeed_config
    from pipelines.train.loop import LoopSpec

    run = RunDir(config.run)
    train = train or config.train
    return LoopSpec(task=task, train=train, plan=plan, deepspeed=deepspeed_config(train, plan),
                    out_dir=str(run.working_path(stage)), seed=config.seed,
                    publish_uri=None if run.is_local else run.uri_of(stage))


def write_rejects(run: RunDir, stage: str, rejects: Rejects) -> None:
    if rejects.total:
        run.write_text(f"{stage}/{REJECTS_FILE}", rejects.jsonl())


def data_dir(run: RunDir, stage: str) -> Path:
    """Where the tokenized examples are written for the workers (on a shared or local path)."""
    return run.working_path(stage, "examples")


def save_sequences(directory: Path, name: str, sequences: list) -> TokenizedSequences:
    return TokenizedSequences.write(directory / name, sequences)


def plan_training(config: PostTrainConfig, rows_per_epoch: int, model_config, seq_len: int, has_gpu: bool,
                  gpu_bf16: bool):
    """The plan: the global batch is ``global_batch_tokens / seq_len`` sequences (or pairs); at least one
    epoch's worth of rows must fill it."""
    from pipelines.train.plan import make_plan, resolve_precision

    precision = resolve_precision(config.train.precision.dtype, has_gpu, gpu_bf16)
    plan = make_plan(config.train, seq_len, model_config.flops_per_token(seq_len), model_config.num_parameters,
                     precision)
    if rows_per_epoch < plan.global_batch_sequences:
        raise ConfigError(f"config field 'train.batch.global_batch_tokens': one global batch needs "
                          f"{plan.global_batch_sequences} examples, the training set holds {rows_per_epoch}")
    return plan


def describe_data(stage: str, examples: Examples, train_n: int, validation_n: int) -> None:
    rejected = ", ".join(f"{reason} {n}" for reason, n in examples.rejects.counts.most_common()) or "none"
    print(f"{stage}: data from {', '.join(examples.sources)}: {train_n} train, {validation_n} validation examples; "
          f"set aside: {rejected}", flush=True)


def epochs(plan, rows: int) -> float:
    return plan.total_steps * plan.global_batch_sequences / max(rows, 1)



def compare_replies(models: dict[str, str | Path], questions: Sequence[str], max_new_tokens: int = 48,
                    seed: int = 0, show: bool = True) -> list[dict[str, str]]:
    """Each model's greedy reply to each question (repeatable), printed side by side."""
    from model.checkpoint import load_model, load_tokenizer
    from model.generate import SamplingParams, generate

    replies: dict[str, list[str]] = {}
    for name, directory in models.items():
        model, tokenizer = load_model(directory), load_tokenizer(directory)
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True).ids
                   for q in questions]
        completions = generate(model, prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                                                              seed=seed), tokenizer)
        replies[name] = [c.text.strip() for c in completions]
    rows = [{"question": q, **{name: replies[name][i] for name in models}} for i, q in enumerate(questions)]
    if show:
        width = max(len(name) for name in models)
        for row in rows:
            print(f"  ? {row['question']}")
            for name in models:
                print(f"    {name:>{width}}: {row[name]}")
    return rows


def add_reply_comparison(config: PostTrainConfig, stage: str, before: dict[str, str], manifest: dict[str, Any],
                         questions: int = 5) -> dict[str, Any]:
    """End of a chat stage: the starting model's and the trained model's replies to the same held-out
    questions, printed and kept in the manifest."""
    from pipelines.data.instructions import held_out_questions

    run = RunDir(config.run)
    if config.show_replies:
        print(f"{stage}: replies before and after, to questions about modules never seen in training", flush=True)
    rows = compare_replies({**before, stage: local_copy(run.uri_of(stage, "model"))}, held_out_questions(questions),
                           seed=config.seed, show=config.show_replies)
    manifest["outputs"]["replies"] = rows
    run.write_manifest(stage, manifest)
    return manifest
