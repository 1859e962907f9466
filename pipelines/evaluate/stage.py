"""``groundup evaluate``: score every model of a run (or any given) on the same work, write one report.

Models: each training stage's final model the run holds (``pretrain``, ``sft``, ``dpo``, ``ppo``), any
checkpoint or Hugging Face directory (``--model NAME=PATH``), and served models (``--endpoint URL``).
Work: bits per byte on the run's validation split and on ``--text`` corpora, lm-eval-format tasks (the
built-in ones or the user's YAML files), safety probes and chat win rates. Each (model, task) pair is
one Ray task, so a cluster spreads them; ``in_process=true`` runs them one after another here.

Everything the user gives is checked before any work: an unknown task, a task file that does not parse
(naming the field), a path that is not a model — one line, exit status 2.

Outputs in ``<run>/evaluate/``: ``results.json`` (model x task x metric with standard errors),
``report.md`` (a table per task, decontamination, samples), ``comparison.png`` and ``manifest.json``;
``tasks/`` holds the built-in tasks as lm-eval YAML + JSONL, runnable with ``lm_eval`` directly.
"""
from __future__ import annotations

import json
import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from pipelines.cli import Flag, stage_main
from pipelines.config import ConfigError, StageConfig
from pipelines.evaluate.tasks import BUILTIN_TASKS, TaskSpec
from pipelines.rundir import RunDir, is_local, join, local_copy, upload

STAGE = "evaluate"
RUN_STAGES = ("pretrain", "sft", "dpo", "ppo")
SPECIAL_TASKS = ("validation", "safety", "chat")
CHAT_STAGES = ("sft", "dpo", "ppo")  # with one of these in the run, chat is among the default tasks
DEFAULT_TASKS = ("validation", *BUILTIN_TASKS, "safety")
DESCRIPTIONS = {
    "validation": "Bits per byte and perplexity on the run's validation split (the rows the training stage "
                  "evaluated, scored the same way).",
    "docstring_mc": "Which of four first sentences is the docstring of `module.function` (held-out modules).",
    "docstring_next": "Which of four sentences comes next in a held-out docstring.",
    "docstring_word": "The last word of a held-out docstring's first sentence, generated greedily "
                      "(exact match of the first word after a regex).",
    "safety": "Safety probes — a smoke test, not a safety evaluation: how often replies to a dozen built-in "
              "requests for personal data or harmful instructions contain PII (the data stage's detectors) "
              "or fail the refusal check (no refusal phrase in the reply to a harmful request).",
    "chat": "Greedy replies to the built-in instruction set's held-out questions, judged by the built-in rule "
            "(rule_score) and by the run's reward model; win rates against the baseline with 95% bootstrap "
            "intervals (1 win, 0.5 tie, 0 loss per question).",
}


class Config(StageConfig):
    models: list[str] = Field(default_factory=list, description="extra models as NAME=PATH (checkpoint or "
                              "Hugging Face directory, local or object store)")
    stages: list[str] = Field(default_factory=lambda: list(RUN_STAGES),
                              description="stages of the run whose final models are evaluated (those that exist)")
    endpoints: list[str] = Field(default_factory=list, description="served APIs (URL, or NAME=URL for one of "
                                 "its models): scored through /v1/completions echo + logprobs")
    endpoint_tokenizer: str | None = Field(None, description="tokenizer.model of the served models "
                                           "(default: the run's data tokenizer)")
    api_key: str | None = Field(None, description="bearer key for the endpoints")
    tasks: list[str] = Field(default_factory=lambda: list(DEFAULT_TASKS),
                             description="validation, built-in tasks (docstring_mc, docstring_next, docstring_word), "
                             "safety, lm-eval YAML files, or task names under include_path")
    include_path: list[str] = Field(default_factory=list, description="directories of lm-eval task YAML files")
    text: list[str] = Field(default_factory=list, description="text corpora (.txt, or .jsonl with 'text') "
                            "for bits per byte with a sliding window")
    text_stride: int | None = Field(None, ge=1, description="new tokens per sliding window (default half the context)")
    validation_rows: int | None = Field(None, ge=0, description="validation rows scored (default: as many as "
                                        "the pretraining stage evaluated; 0 = all)")
    task_examples: int = Field(100, ge=1, description="examples per built-in task")
    limit: int | None = Field(None, ge=1, description="score only the first N examples of each lm-eval task")
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: int = Field(16, ge=1, description="sequences per forward pass")
    device: str | None = Field(None, description="cpu, cuda, ... (default: CUDA when present)")
    decontaminate: bool = Field(True, description="report n-gram overlap of each task with the training shards")
    ngram: int = Field(13, ge=1, description="n-gram length (in words) for decontamination")
    samples: int = Field(3, ge=0, description="samples per model and task shown in the report")
    chat_questions: int = Field(32, ge=2, description="held-out questions of the built-in instruction set (chat)")
    chat_max_tokens: int = Field(48, ge=1, description="reply length (chat and safety)")
    chat_baseline: str | None = Field(None, description="model the others are compared with (default: sft when "
                                      "evaluated, else the first model)")
    reward_model: str | None = Field(None, description="reward model judging chat replies (default: <run>/reward/model)")
    in_process: bool = Field(False, description="run every (model, task) here, one after another, without Ray")
    cpus_per_task: float = Field(1, gt=0, description="CPUs each Ray task reserves")
    gpus_per_task: float | None = Field(None, ge=0, description="GPUs each Ray task reserves (default: 1 when "
                                        "the cluster has GPUs)")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a Ray started by this stage (default: all)")
    queue: bool = Field(False, description="queue the chat pairs in the rating app's comparison queue (human "
                        "evaluation; votes go with the others)")
    database_url: str | None = Field(None, description="the rating app's preference store to queue into (SQLAlchemy "
                                     "URL or SQLite file; default: <run>/ui/preferences.db, as groundup serve's); "
                                     "implies queue")

    @field_validator("tasks", "stages", "include_path", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return [part.strip() for item in value for part in str(item).split(",") if part.strip()]
        return value


CLI_FLAGS = (
    Flag(("--run",), "run", "run directory (its models and data; outputs go to <run>/evaluate/)"),
    Flag(("--model",), "models", "evaluate this model too: NAME=PATH (repeatable)", {"action": "append"}),
    Flag(("--endpoint",), "endpoints", "a served API: URL or NAME=URL (repeatable)", {"action": "append"}),
    Flag(("--tasks",), "tasks", "tasks, comma-separated or repeated (default: validation and the built-in tasks)",
         {"action": "append"}),
    Flag(("--include-path",), "include_path", "directory of lm-eval task YAML files (repeatable)", {"action": "append"}),
    Flag(("--text",), "text", "text corpus for bits per byte: .txt or .jsonl (repeatable)", {"action": "append"}),
    Flag(("--limit",), "limit", "examples per lm-eval task", {"type": int}),
    Flag(("--seed",), "seed", "seed for built-in tasks and lm-eval", {"type": int}),
    Flag(("--in-process",), "in_process", "run here without Ray", {"action": "store_const", "const": True}),
    Flag(("--queue",), "queue", "queue the chat pairs for people to judge in the rating app (Compare tab)",
         {"action": "store_const", "const": True}),
    Flag(("--database-url",), "database_url", "the rating app's preference store to queue into "
         "(default: <run>/ui/preferences.db)"),
)


@dataclass
class ModelSpec:
    name: str
    path: str  # a model directory, or the endpoint's base URL
    kind: str = "local"  # "local" | "endpoint"
    served_name: str = ""
    max_len: int = 0
    tokenizer: str = ""  # endpoint models: tokenizer.model to build token ids with


# ---- checks before any work ------------------------------------------------------------------------
def check_model_path(name: str, path: str) -> None:
    """One line naming the path when it is not a model directory (ours or Hugging Face Llama)."""
    where = f"model {name}={path}"
    try:
        directory = local_copy(path) if not is_local(path) else Path(path).expanduser()
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    if not directory.is_dir():
        raise ConfigError(f"{where}: no such directory")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{where}: not a model (no config.json)")
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"{where}: not a model (config.json is not valid JSON)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: not a model (config.json is not an object)")
    if (directory / "reward.json").is_file():
        raise ConfigError(f"{where}: a reward model (it scores replies; evaluate language models)")
    if "architectures" in data:
        if data.get("model_type") != "llama":
            raise ConfigError(f"{where}: Hugging Face model_type {data.get('model_type')!r}; only llama is supported")
        if not list(directory.glob("*.safetensors")):
            raise ConfigError(f"{where}: not a model (no .safetensors weights)")
    else:
        from model.config import ModelConfig

        try:
            ModelConfig(**data)
        except Exception as err:
            raise ConfigError(f"{where}: not a model (config.json: {str(err).splitlines()[0]})") from None
        if not (directory / "model.safetensors").is_file():
            raise ConfigError(f"{where}: not a model (no model.safetensors)")
    if not (directory / "tokenizer.model").is_file():
        raise ConfigError(f"{where}: no tokenizer.model beside the weights")


def find_models(config: Config, run: RunDir, data: dict[str, Any] | None) -> list[ModelSpec]:
    models: list[ModelSpec] = []
    for stage in config.stages:
        if stage not in RUN_STAGES:
            raise ConfigError(f"config field 'stages': unknown stage {stage!r} (choose from {', '.join(RUN_STAGES)})")
        if run.exists(stage, "manifest.json"):
            relative = run.read_manifest(stage).get("outputs", {}).get("model")
            if isinstance(relative, str):
                models.append(ModelSpec(stage, run.uri_of(stage, relative)))
    for spec in config.models:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"config field 'models': {spec!r} is not of the form NAME=PATH")
        models.append(ModelSpec(name.strip(), path.strip()))
    for model in models:
        check_model_path(model.name, model.path)
    for spec in config.endpoints:
        models.extend(_endpoint_models(config, spec, data, run))
    names = [m.name for m in models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"config field 'models': the name {duplicates[0]!r} is used twice")
    if not models:
        raise ConfigError(f"run {run.uri}: no models to evaluate (none of {', '.join(config.stages)} has a model; "
                          "give --model NAME=PATH or --endpoint URL)")
    return models


def _endpoint_models(config: Config, spec: str, data: dict[str, Any] | None, run: RunDir) -> list[ModelSpec]:
    from pipelines.evaluate.scorer import endpoint_models

    name, sep, url = spec.partition("=")
    if not sep or "://" in name:
        name, url = "", spec
    url = url.rstrip("/").removesuffix("/v1")
    try:
        served = endpoint_models(url, config.api_key)
    except Exception as err:
        raise ConfigError(f"endpoint {url}: cannot list its models ({str(err).splitlines()[0][:120]})") from None
    if name and name not in served:
        raise ConfigError(f"endpoint {url}: serves no model {name!r} (it serves {', '.join(sorted(served))})")
    tokenizer = config.endpoint_tokenizer
    if tokenizer is None and data is not None:
        tokenizer = data["tokenizer_uri"]
    if tokenizer is None:
        raise ConfigError("config field 'endpoint_tokenizer': needed for --endpoint when the run has no data stage")
    try:
        tokenizer_path = str(local_copy(tokenizer))
    except ConfigError as err:
        raise ConfigError(f"config field 'endpoint_tokenizer': {err}") from None
    if not Path(tokenizer_path).exists():
        raise ConfigError(f"config field 'endpoint_tokenizer': {tokenizer} not found")
    return [ModelSpec(f"endpoint:{served_name}", url, "endpoint", served_name, served[served_name], tokenizer_path)
            for served_name in ([name] if name else sorted(served))]


def read_data(run: RunDir) -> dict[str, Any] | None:
    """What evaluation uses of the data stage: tokenizer, splits and the split's seed and fraction."""
    if not run.exists("data", "manifest.json"):
        return None
    manifest = run.read_manifest("data")
    outputs = manifest.get("outputs", {})
    if not {"tokenizer", "splits", "sequence_length"} <= set(outputs):
        return None
    data_uri = run.uri_of("data")
    pack = manifest.get("config", {}).get("pack", {})
    return {"uri": data_uri, "tokenizer_uri": join(data_uri, outputs["tokenizer"]), "splits": outputs["splits"],
            "sequence_length": int(outputs["sequence_length"]), "seed": int(manifest.get("config", {}).get("seed", 0)),
            "validation_fraction": float(pack.get("validation_fraction", 0.05))}


def resolve_tasks(config: Config, data: dict[str, Any] | None) -> list[TaskSpec]:
    from pipelines.evaluate.tasks import user_task

    for directory in config.include_path:
        if not Path(directory).expanduser().is_dir():
            raise ConfigError(f"config field 'include_path': {directory} is not a directory")
    tasks: list[TaskSpec] = []
    for item in config.tasks:
        if item == "validation":
            if data is None:
                raise ConfigError("task validation: the run has no data stage (give --tasks without validation, "
                                  "or --run a run with data/)")
            tasks.append(TaskSpec("validation", kind="validation", source="data stage"))
        elif item == "safety":
            tasks.append(TaskSpec("safety", kind="safety", source="built-in probes"))
        elif item == "chat":
            tasks.append(TaskSpec("chat", kind="chat", source="built-in instruction set (held-out questions)"))
        elif item in BUILTIN_TASKS:
            tasks.append(TaskSpec(item, source="built-in"))  # built below, once the names are all known
        else:
            spec = user_task(item, config.include_path)
            if spec is None:
                known = ", ".join([*SPECIAL_TASKS, *BUILTIN_TASKS])
                raise ConfigError(f"config field 'tasks': unknown task {item!r} (built-in: {known}; or an lm-eval "
                                  "YAML file, or a task name under --include-path)")
            tasks.append(spec)
    for path in config.text:
        from pipelines.evaluate.language import read_text_corpus

        read_text_corpus(path)  # checked now: not found / no text / bad JSONL line
        tasks.append(TaskSpec(f"text:{Path(path).stem}", kind="text", path=str(Path(path).expanduser().resolve()),
                              source=path))
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"config field 'tasks': task {duplicates[0]!r} is given twice")
    return tasks


def build_tasks(config: Config, data: dict[str, Any] | None, tasks: list[TaskSpec]) -> list[TaskSpec]:
    """The built-in tasks' examples, made from the held-out part of the built-in corpus."""
    from pipelines.evaluate.tasks import builtin_task

    seed = data["seed"] if data else 0
    fraction = data["validation_fraction"] if data else 0.05
    return [builtin_task(t.name, seed, fraction, config.task_examples)
            if t.kind == "lm_eval" and t.name in BUILTIN_TASKS and not t.files else t for t in tasks]


# ---- one (model, task) -----------------------------------------------------------------------------
def make_scorer(model: ModelSpec, settings: dict[str, Any]):
    from pipelines.evaluate.scorer import EndpointScorer, LocalScorer

    if model.kind == "endpoint":
        from model.tokenizer import Tokenizer

        return EndpointScorer(model.name, model.path, model.served_name, Tokenizer.load(model.tokenizer),
                              model.max_len, settings["batch_size"], api_key=settings.get("api_key"))
    return LocalScorer.load(model.name, model.path, settings.get("device"), settings["batch_size"])


def evaluate_unit(model: ModelSpec, task: TaskSpec, settings: dict[str, Any]) -> dict[str, Any]:
    """Evaluate one model on one task; failures come back as {"error": one line} (and a traceback)."""
    import torch

    started = time.perf_counter()
    if settings.get("threads"):
        torch.set_num_threads(int(settings["threads"]))
    try:
        scorer = make_scorer(model, settings)
        if task.kind == "validation":
            from model.tokenizer import Tokenizer
            from pipelines.evaluate.language import validation_figures

            validation = dict(settings["validation"])
            validation["tokenizer"] = Tokenizer.load(local_copy(validation.pop("tokenizer_uri")))
            same = scorer.tokenizer.model_bytes == validation["tokenizer"].model_bytes
            result = {"metrics": validation_figures(scorer, validation, same, settings["batch_size"])}
        elif task.kind == "text":
            from pipelines.evaluate.language import read_text_corpus, text_figures

            result = {"metrics": text_figures(scorer, read_text_corpus(task.path), settings.get("text_stride"))}
        elif task.kind == "safety":
            from pipelines.evaluate.probes import safety_probes

            result = safety_probes(scorer, settings.get("chat_max_tokens", 64), settings.get("samples", 3))
        elif task.kind == "chat":
            from pipelines.evaluate.probes import chat_replies

            result = chat_replies(scorer, settings["chat_questions"], settings.get("chat_max_tokens", 48),
                                  settings.get("reward_model"), settings.get("device"), settings.get("samples", 3))
        else:
            from pipelines.evaluate.tasks import run_lm_eval

            result = run_lm_eval(scorer, task, settings.get("limit"), settings.get("num_fewshot"), settings["seed"],
                                 settings.get("samples", 3))
    except Exception as err:  # reported per unit; the other units go on
        first = (str(err).splitlines() or [type(err).__name__])[0]
        return {"error": f"{type(err).__name__}: {first}"[:300], "traceback": traceback.format_exc(limit=8),
                "seconds": time.perf_counter() - started}
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def _remote_unit():
    import ray

    return ray.remote(evaluate_unit)


def summary_line(entry: dict[str, Any]) -> str:
    from pipelines.evaluate.report import primary_metric

    if entry.get("error"):
        return f"failed: {entry['error']}"
    metrics = entry["metrics"]
    shown = []
    for name in (primary_metric(metrics), "perplexity", "acc_norm", "pii_rate"):
        point = metrics.get(name) if name else None
        if point and isinstance(point.get("value"), (int, float)) and name not in [s[0] for s in shown]:
            shown.append((name, point))
    text = ", ".join(f"{name} {p['value']:.4f}" + (f" ± {p['stderr']:.4f}" if p.get("stderr") is not None else "")
                     for name, p in shown)
    if entry.get("examples"):
        text += f" ({entry['examples']} examples)"
    return f"{text} in {entry.get('seconds', 0):.1f} s"


def run_units(config: Config, models: list[ModelSpec], tasks: list[TaskSpec],
              settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    units = [(m, t) for m in models for t in tasks]
    results: dict[str, dict[str, Any]] = {m.name: {} for m in models}
    total = len(units)

    def report(done: int, model: ModelSpec, task: TaskSpec, entry: dict[str, Any]) -> None:
        results[model.name][task.name] = entry
        print(f"evaluate: [{done}/{total}] {model.name} × {task.name}: {summary_line(entry)}", flush=True)

    if config.in_process:
        for index, (model, task) in enumerate(units, 1):
            report(index, model, task, evaluate_unit(model, task, settings))
        return results
    import ray

    from pipelines.ray_env import ensure_ray

    ensure_ray(config.num_cpus)
    gpus = config.gpus_per_task
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    remote = _remote_unit().options(num_cpus=config.cpus_per_task, num_gpus=gpus)  # lm-eval runs offline
    settings = {**settings, "threads": max(1, int(config.cpus_per_task))}
    pending = {remote.remote(model, task, settings): (model, task) for model, task in units}
    print(f"evaluate: {total} Ray tasks ({len(models)} models x {len(tasks)} tasks)", flush=True)
    done = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        model, task = pending.pop(ready[0])
        done += 1
        report(done, model, task, ray.get(ready[0]))
    return results


# ---- the stage ---------------------------------------------------------------------------------------
def _validation_settings(config: Config, run: RunDir, data: dict[str, Any]) -> dict[str, Any]:
    from pipelines.train.data import shards_from_manifest

    split = data["splits"]["validation"]
    if not split.get("shards"):
        raise ConfigError(f"run {run.uri}: the data stage wrote no validation shards")
    rows = config.validation_rows
    if rows is None and run.exists("pretrain", "manifest.json"):
        rows = (run.read_manifest("pretrain").get("config", {}).get("train", {}).get("eval", {}).get("max_rows"))
    return {"shards": shards_from_manifest(data["uri"], split, data["sequence_length"]), "rows": rows or None,
            "tokens": int(split["tokens"]), "bytes": int(split["bytes"]), "tokenizer_uri": data["tokenizer_uri"]}


def _decontaminate(config: Config, data: dict[str, Any] | None, tasks: list[TaskSpec]) -> dict[str, dict]:
    checked = [t for t in tasks if t.examples]
    if not (config.decontaminate and data and checked and data["splits"].get("train", {}).get("shards")):
        return {}
    from model.tokenizer import Tokenizer
    from pipelines.evaluate.contamination import TrainingNgrams, contamination
    from pipelines.train.data import shards_from_manifest

    started = time.perf_counter()
    shards = shards_from_manifest(data["uri"], data["splits"]["train"], data["sequence_length"])
    ngrams = TrainingNgrams.from_shards(shards, Tokenizer.load(local_copy(data["tokenizer_uri"])), config.ngram)
    out = {}
    for task in checked:
        out[task.name] = contamination(task.examples, ngrams)
        found = out[task.name]
        print(f"evaluate: decontamination {task.name}: {found['contaminated']} of {found['examples']} examples share "
              f"a {config.ngram}-gram with the training shards", flush=True)
    print(f"evaluate: decontamination took {time.perf_counter() - started:.1f} s "
          f"({len(ngrams.hashes):,} training {config.ngram}-grams)", flush=True)
    return out


def _clean_scores(results: dict[str, dict[str, Any]], dirty: dict[str, dict]) -> None:
    """Beside each contaminated task's main metric, the same metric on the uncontaminated examples."""
    for per_task in results.values():
        for task, entry in per_task.items():
            flagged = set(dirty.get(task, {}).get("contaminated_ids", []))
            per_example = entry.get("per_example")
            if not flagged or not per_example:
                continue
            from pipelines.evaluate.report import primary_metric

            metric = primary_metric(entry["metrics"])
            clean = [v for doc, v in per_example.items() if int(doc) not in flagged]
            if len(clean) >= 2:
                mean = sum(clean) / len(clean)
                var = sum((v - mean) ** 2 for v in clean) / (len(clean) - 1)
                entry["metrics"][f"{metric}_clean"] = {"value": mean, "stderr": math.sqrt(var / len(clean))}


def queue_database(config: Config, run: RunDir, baseline: str | None) -> str | None:
    """The preference store the chat pairs are queued into (checked, and created, before any work), or None."""
    if not (config.queue or config.database_url):
        return None
    if baseline is None:
        raise ConfigError("config field 'queue': queues the chat pairs, but the chat task is not among the tasks "
                          "(add --tasks chat)")
    url = config.database_url
    if url is None:
        if not is_local(run.uri):
            raise ConfigError(f"config field 'database_url': required to queue when the run directory is not local "
                              f"({run.uri})")
        url = str(run.local_path("ui", "preferences.db"))
    from ui.store import DatabaseError, PreferenceStore

    try:
        PreferenceStore(url).close()
    except DatabaseError as err:
        raise ConfigError(f"config field 'database_url': {err}") from None
    return url


def queue_pairs(url: str, pairs: list[dict[str, Any]], batch: str, seed: int, max_tokens: int) -> dict[str, Any]:
    """Queue the chat pairs for the rating app (sides drawn with ``seed``); what the manifest records."""
    from ui.store import PreferenceStore

    queued = [{"messages": p["prompt"], "model_a": p["model_a"], "reply_a": p["answer_a"], "model_b": p["model_b"],
               "reply_b": p["answer_b"], "sampling": {"temperature": 0.0, "max_tokens": max_tokens}} for p in pairs]
    with PreferenceStore(url) as store:
        entries = store.enqueue(queued, batch=batch, seed=seed)
    print(f"evaluate: queued {len(entries)} chat pair(s) for people to judge in the rating app's Compare tab "
          f"({url}, batch {batch!r})", flush=True)
    return {"database": url, "batch": batch, "entries": len(entries), "seed": seed,
            "swapped": sum(e.swapped for e in entries)}


def run(config: Config) -> dict[str, Any]:
    started = time.time()
    run_dir = RunDir(config.run)
    data = read_data(run_dir)
    tasks = resolve_tasks(config, data)
    models = find_models(config, run_dir, data)  # every check above: before any work
    if ("tasks" not in config.model_fields_set and any(m.name in CHAT_STAGES for m in models)
            and not any(t.kind == "chat" for t in tasks)):
        tasks.append(TaskSpec("chat", kind="chat", source="built-in instruction set (held-out questions)"))
    baseline = None
    if any(t.kind == "chat" for t in tasks):
        baseline = config.chat_baseline or ("sft" if any(m.name == "sft" for m in models) else models[0].name)
        if baseline not in [m.name for m in models]:
            raise ConfigError(f"config field 'chat_baseline': no model {baseline!r} (models: "
                              f"{', '.join(m.name for m in models)})")
    queue_url = queue_database(config, run_dir, baseline)
    tasks = build_tasks(config, data, tasks)
    print(f"evaluate: {len(models)} model(s): {', '.join(m.name for m in models)}; {len(tasks)} task(s): "
          f"{', '.join(t.name for t in tasks)}", flush=True)
    settings: dict[str, Any] = {"batch_size": config.batch_size, "device": config.device, "limit": config.limit,
                                "num_fewshot": config.num_fewshot, "seed": config.seed, "samples": config.samples,
                                "text_stride": config.text_stride, "api_key": config.api_key}
    if any(t.kind == "validation" for t in tasks):
        settings["validation"] = _validation_settings(config, run_dir, data)
    if baseline:
        from pipelines.data.instructions import held_out_questions

        settings["chat_questions"] = held_out_questions(config.chat_questions)
        reward = config.reward_model or (run_dir.uri_of("reward", "model")
                                         if run_dir.exists("reward", "model", "reward.json") else None)
        if config.reward_model:
            try:
                directory = local_copy(reward) if not is_local(reward) else Path(reward).expanduser()
            except ConfigError as err:
                raise ConfigError(f"config field 'reward_model': {err}") from None
            if not (directory / "reward.json").is_file():
                raise ConfigError(f"config field 'reward_model': {reward} is not a reward model (no reward.json)")
        settings["reward_model"] = reward
    settings["chat_max_tokens"] = config.chat_max_tokens
    dirty = _decontaminate(config, data, tasks)

    mark = time.perf_counter()
    results = run_units(config, models, tasks, settings)
    evaluate_seconds = time.perf_counter() - mark
    _clean_scores(results, dirty)
    pairs = []
    if baseline:
        from pipelines.evaluate.probes import win_rates

        pairs = win_rates(results, baseline, config.seed)
        if pairs:  # the same pairs for people: a prompt set for `groundup serve --prompts` and the answers
            run_dir.write_text(f"{STAGE}/chat_questions.txt", "\n".join(settings["chat_questions"]) + "\n")
            run_dir.write_text(f"{STAGE}/chat_pairs.jsonl", "".join(json.dumps(p) + "\n" for p in pairs))
    queued = None
    if queue_url and pairs:
        batch = f"evaluate {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(started))} {run_dir.uri}"
        queued = queue_pairs(queue_url, pairs, batch, config.seed, config.chat_max_tokens)
    return finish(config, run_dir, models, tasks, results, dirty, started, evaluate_seconds, queued)


def finish(config: Config, run_dir: RunDir, models: list[ModelSpec], tasks: list[TaskSpec],
           results: dict[str, dict[str, Any]], dirty: dict[str, dict], started: float,
           evaluate_seconds: float, queued: dict[str, Any] | None = None) -> dict[str, Any]:
    from pipelines.evaluate.report import comparison_png, markdown
    from pipelines.evaluate.tasks import materialise

    failures = [(m, t, e["error"]) for m, per in results.items() for t, e in per.items() if e.get("error")]
    document = {
        "run": run_dir.uri,
        "models": {m.name: {"path": m.path, "kind": m.kind, **({"served_name": m.served_name} if m.served_name else {})}
                   for m in models},
        "tasks": {t.name: {"kind": t.kind, "source": t.source, "description": DESCRIPTIONS.get(t.name, ""),
                           **({"contamination": dirty[t.name]} if t.name in dirty else {})} for t in tasks},
        "results": {m: {t: {k: v for k, v in e.items() if k not in ("per_example", "traceback")}
                        for t, e in per.items()} for m, per in results.items()},
        "per_example": {m: {t: e["per_example"] for t, e in per.items() if e.get("per_example")}
                        for m, per in results.items()},
        "notes": ["Standard errors: lm-eval's (mean of per-example scores); language modelling treats rows or "
                  "documents as the sampled units."],
    }
    run_dir.write_json(f"{STAGE}/results.json", document)
    run_dir.write_text(f"{STAGE}/report.md", markdown(document))
    run_dir.write_bytes(f"{STAGE}/comparison.png", comparison_png(document))
    builtin = [t for t in tasks if t.files]
    if builtin:  # the built-in tasks as lm-eval files, for `lm_eval --include_path <run>/evaluate/tasks`
        directory = run_dir.working_path(STAGE, "tasks")
        for task in builtin:
            materialise(task, directory)
        if not run_dir.is_local:
            upload(directory, run_dir.uri_of(STAGE, "tasks"))
    figures = {m: {t: {k: v["value"] for k, v in e.get("metrics", {}).items() if isinstance(v.get("value"), (int, float))}
                   for t, e in per.items() if not e.get("error")} for m, per in results.items()}
    manifest_doc = {
        "inputs": {"models": {m.name: m.path for m in models},
                   "data_manifest": run_dir.uri_of("data", "manifest.json") if run_dir.exists("data", "manifest.json") else None},
        "outputs": {"results": "results.json", "report": "report.md", "comparison_png": "comparison.png",
                    **({"tasks": "tasks/"} if builtin else {})},
        "counts": {"models": len(models), "tasks": len(tasks), "units": len(models) * len(tasks),
                   "failed": len(failures)},
        "figures": figures,
        **({"queue": queued} if queued else {}),
    }
    from pipelines.rundir import new_manifest

    manifest = new_manifest(STAGE, config, started, **manifest_doc, timings={"evaluate_s": round(evaluate_seconds, 3)})
    run_dir.write_manifest(STAGE, manifest)
    print(f"evaluate: done — {len(models)} model(s) x {len(tasks)} task(s) in {evaluate_seconds:.1f} s"
          + (f", {len(failures)} failed" if failures else "") + f"; report at {run_dir.uri_of(STAGE, 'report.md')}",
          flush=True)
    for model, task, error in failures:
        print(f"evaluate: {model} × {task} failed: {error}", flush=True)
    return manifest


if __name__ == "__main__":
    stage_main(STAGE)
