"""Benchmarks in lm-evaluation-harness's task format, run through the ``lm_eval`` package itself.

- :class:`GroundupLM` is our model as an lm-eval model class (registered as ``groundup``): lm-eval builds
  the requests from any task YAML (multiple choice, generation with regex filters, rolling
  log-likelihood) and computes the metrics and their standard errors; we answer its three request
  types with a :class:`~pipelines.evaluate.scorer.Scorer` (in-process or a served endpoint).
- Built-in tasks are made from the built-in corpus (the standard library's docstrings), from the modules
  the run's data stage held out for validation (the same seeded split by document id), with a fixed
  seed, so the stage runs offline and its tasks test text the model never trained on:

  ``docstring_mc``    which of four first sentences is the docstring of ``module.function``
  ``docstring_next``  which of four sentences comes next in a held-out docstring
  ``docstring_word``  generate the last word of a docstring's first sentence (exact match after a regex)

- A user task is an lm-eval YAML file (``--tasks path/to/task.yaml``) or a task name found under
  ``--include-path DIR``, with local data (``dataset_path: json``, ``dataset_kwargs.data_files``).
  Task files are checked before any work: a field that is missing or wrong is one line naming it.
"""
from __future__ import annotations

import functools
import os
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import ConfigError

BUILTIN_TASKS = ("docstring_mc", "docstring_next", "docstring_word")
OUTPUT_TYPES = ("multiple_choice", "generate_until", "loglikelihood", "loglikelihood_rolling")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class TaskSpec:
    """A task ready to run anywhere: its name, and either the files that define it (built-in tasks
    travel as text and are written where they run) or the directories that hold its YAML."""

    name: str
    kind: str = "lm_eval"  # "lm_eval" | "validation" | "text" | "safety" | "chat"
    files: dict[str, str] = field(default_factory=dict)  # relative path -> content (built-in tasks)
    include: list[str] = field(default_factory=list)  # directories for lm-eval's include_path (user tasks)
    examples: list[str] = field(default_factory=list)  # each example's text, for decontamination
    source: str = ""  # where the task came from, for the report
    path: str = ""  # --text corpus


# ---- task files ------------------------------------------------------------------------------------
class _TaskLoader(yaml.SafeLoader):
    """lm-eval YAML may use ``!function module.fn``: kept as a string here (lm-eval resolves it)."""


_TaskLoader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def read_task_file(path: str | Path) -> dict[str, Any]:
    """Parse and check an lm-eval task YAML; ConfigError (one line naming the field) when it is wrong."""
    path = Path(path).expanduser()
    where = f"task file {path}"
    if not path.is_file():
        raise ConfigError(f"{where}: not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise ConfigError(f"{where}{f' line {mark.line + 1}' if mark else ''}: not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: top level must be a mapping of lm-eval task fields")
    if "group" in data and "task" not in data:
        raise ConfigError(f"{where}: field 'task' is missing (groups of tasks are not supported; list the tasks)")
    if not isinstance(data.get("task"), str) or not data["task"].strip():
        raise ConfigError(f"{where}: field 'task' must be the task's name")
    if "include" in data:  # a task built on another file: lm-eval merges it; check what we can
        return data
    output_type = data.get("output_type", "generate_until")
    if output_type not in OUTPUT_TYPES:
        raise ConfigError(f"{where}: field 'output_type' must be one of {', '.join(OUTPUT_TYPES)} (got {output_type!r})")
    if not isinstance(data.get("dataset_path"), str):
        raise ConfigError(f"{where}: field 'dataset_path' is missing (local data: dataset_path: json)")
    required = {"multiple_choice": ("doc_to_text", "doc_to_choice", "doc_to_target"),
                "generate_until": ("doc_to_text", "doc_to_target"),
                "loglikelihood": ("doc_to_text", "doc_to_target"),
                "loglikelihood_rolling": ()}[output_type]
    for name in required:
        if name not in data:
            raise ConfigError(f"{where}: field '{name}' is missing (output_type {output_type})")
    if data["dataset_path"] in ("json", "csv", "text", "parquet"):
        files = (data.get("dataset_kwargs") or {}).get("data_files")
        if files is None:
            raise ConfigError(f"{where}: field 'dataset_kwargs.data_files' is missing (dataset_path {data['dataset_path']})")
        entries = files.items() if isinstance(files, dict) else [("", files)]
        for split, value in entries:
            for item in value if isinstance(value, list) else [value]:
                name = f"dataset_kwargs.data_files{'.' + split if split else ''}"
                if not isinstance(item, str):
                    raise ConfigError(f"{where}: field '{name}' must be a path")
                file = Path(item) if Path(item).is_absolute() else path.parent / item
                if not file.is_file():
                    raise ConfigError(f"{where}: field '{name}': {item} not found")
        splits = set(files) if isinstance(files, dict) else {"train"}
        for key in ("test_split", "validation_split"):
            if key in data and data[key] not in splits:
                raise ConfigError(f"{where}: field '{key}': no split {data[key]!r} in data_files ({', '.join(sorted(splits))})")
    return data


def task_examples(data: dict[str, Any], path: Path) -> list[str]:
    """The text of each example of a local-data task (all its string fields), for decontamination."""
    import json

    files = (data.get("dataset_kwargs") or {}).get("data_files")
    if not files or data.get("dataset_path") != "json":
        return []
    split = data.get("test_split") or data.get("validation_split")
    chosen = files.get(split) if isinstance(files, dict) else files
    examples = []
    for item in chosen if isinstance(chosen, list) else [chosen]:
        file = Path(item) if Path(item).is_absolute() else path.parent / item
        for line in file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                examples.append(" ".join(_strings(json.loads(line))))
    return examples


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def find_task(name: str, include: list[str]) -> Path | None:
    """The YAML under the include directories whose ``task`` is ``name``."""
    for directory in include:
        for file in sorted(Path(directory).expanduser().rglob("*.y*ml")):
            try:
                data = yaml.load(file.read_text(encoding="utf-8"), Loader=_TaskLoader)
            except (yaml.YAMLError, UnicodeDecodeError):
                continue
            if isinstance(data, dict) and data.get("task") == name:
                return file
    return None


def user_task(item: str, include: list[str]) -> TaskSpec:
    path = Path(item).expanduser()
    if item.endswith((".yaml", ".yml")) or path.is_file():
        data = read_task_file(path)
        directory = str(path.resolve().parent)
        return TaskSpec(data["task"], include=[directory, *include], examples=task_examples(data, path),
                        source=str(path))
    found = find_task(item, include)
    if found is None:
        return None  # the caller names the unknown task
    data = read_task_file(found)
    return TaskSpec(item, include=list(include), examples=task_examples(data, found), source=str(found))


# ---- built-in tasks from the built-in corpus -------------------------------------------------------
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _sentences(docstring: str, paragraphs: int = 1) -> list[str]:
    """Sentences of the docstring's first ``paragraphs`` prose paragraphs."""
    chosen = [p for p in docstring.strip().split("\n\n") if p.strip()][:paragraphs]
    text = " ".join(line.strip() for p in chosen for line in p.splitlines())
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _good(sentence: str) -> bool:
    return 20 <= len(sentence) <= 240 and ">>>" not in sentence and sentence.endswith(".")


@functools.lru_cache(maxsize=4)
def held_out_docstrings(seed: int, fraction: float) -> list[tuple[str, str]]:
    """(qualified name, docstring) of functions and classes of the standard-library modules that the data
    stage (same seed and fraction) puts in the validation split, in corpus order."""
    from pipelines.data.builtin import _docstrings, _module_name, parse_module, stdlib_files, stdlib_root
    from pipelines.data.pack import assign_validation

    root = stdlib_root()
    files = {f"stdlib:{_module_name(root, path)}": path for path in stdlib_files(root)}
    held = assign_validation(sorted(files), seed, fraction) if fraction > 0 else set(files)
    out = []
    for doc_id in sorted(held):
        tree = parse_module(files[doc_id])  # retries CPython 3.11's AST race itself
        if tree is None:
            continue
        module = doc_id.split(":", 1)[1]
        out.extend((f"{module}.{name}", doc) for name, doc in _docstrings(tree) if name)
    return out


def builtin_task_records(name: str, seed: int, fraction: float, count: int) -> list[dict[str, Any]]:
    rng = random.Random(f"groundup-builtin-task:{name}:{seed}")
    docs = held_out_docstrings(seed, fraction)
    records: list[dict[str, Any]] = []
    if name == "docstring_mc":
        pool = [(qual, _sentences(doc)[0]) for qual, doc in docs if _sentences(doc) and _good(_sentences(doc)[0])]
        seen: set[str] = set()
        unique = []
        for qual, first in pool:
            if first not in seen:
                seen.add(first)
                unique.append((qual, first))
        rng.shuffle(unique)
        for qual, first in unique[:count]:
            distractors = rng.sample([s for _, s in unique if s != first], 3)
            answer = rng.randrange(4)
            choices = distractors[:answer] + [first] + distractors[answer:]
            records.append({"name": qual, "choices": choices, "answer": answer})
    elif name == "docstring_next":
        pool = []
        for qual, doc in docs:
            sentences = _sentences(doc, paragraphs=2)
            if len(sentences) >= 2 and _good(sentences[0]) and _good(sentences[1]):
                pool.append((qual, sentences[0], sentences[1]))
        rng.shuffle(pool)
        nexts = sorted({n for _, _, n in pool})
        for qual, first, following in pool[:count]:
            distractors = rng.sample([s for s in nexts if s != following], 3)
            answer = rng.randrange(4)
            choices = distractors[:answer] + [following] + distractors[answer:]
            records.append({"name": qual, "first": first, "choices": choices, "answer": answer})
    elif name == "docstring_word":
        pool = []
        for qual, doc in docs:
            sentences = _sentences(doc)
            if sentences and _good(sentences[0]):
                head, _, last = sentences[0][:-1].rpartition(" ")
                if head and re.fullmatch(r"[A-Za-z]{3,}", last):
                    pool.append({"name": qual, "prefix": head, "word": last})
        rng.shuffle(pool)
        records = pool[:count]
    else:
        raise KeyError(name)
    return records


def _yaml_for(name: str, data_file: str) -> dict[str, Any]:
    common = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data_file}},
              "test_split": "test", "metadata": {"version": 1.0, "source": "groundup built-in corpus"}}
    if name == "docstring_mc":
        return {**common, "output_type": "multiple_choice", "doc_to_text": "{{name}}\n\n", "target_delimiter": "",
                "doc_to_choice": "{{choices}}", "doc_to_target": "answer",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    if name == "docstring_next":
        return {**common, "output_type": "multiple_choice", "doc_to_text": "{{name}}\n\n{{first}}",
                "target_delimiter": " ", "doc_to_choice": "{{choices}}", "doc_to_target": "answer",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    return {**common, "output_type": "generate_until", "doc_to_text": "{{name}}\n\n{{prefix}}",
            "doc_to_target": "{{word}}", "target_delimiter": " ",
            "generation_kwargs": {"until": ["\n", ".", ","], "max_gen_toks": 8, "do_sample": False},
            "filter_list": [{"name": "first_word", "filter": [{"function": "regex", "regex_pattern": r"^\s*(\w+)"},
                                                              {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "ignore_case": True, "ignore_punctuation": True}]}


def builtin_task(name: str, seed: int, fraction: float, count: int) -> TaskSpec:
    """A built-in task as files: ``NAME/NAME.yaml`` and ``NAME/test.jsonl`` (the YAML's data path is
    filled in where the files are written: see :func:`materialise`)."""
    import json

    records = builtin_task_records(name, seed, fraction, count)
    if not records:
        raise ConfigError(f"task {name}: no examples (the built-in corpus has too few held-out docstrings)")
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    config = yaml.safe_dump(_yaml_for(name, "@DATA@"), sort_keys=False, allow_unicode=True)
    examples = [" ".join(_strings(r)) for r in records]
    return TaskSpec(name, files={f"{name}/{name}.yaml": config, f"{name}/test.jsonl": lines}, examples=examples,
                    source=f"built-in ({len(records)} examples)")


def materialise(task: TaskSpec, directory: Path) -> list[str]:
    """Write a built-in task's files under ``directory``; the include paths lm-eval should search."""
    for relative, content in task.files.items():
        target = directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if relative.endswith(".yaml"):
            content = content.replace("'@DATA@'", str(target.parent / "test.jsonl")).replace(
                "@DATA@", str(target.parent / "test.jsonl"))
        target.write_text(content, encoding="utf-8")
    return [str(directory / task.name)] if task.files else list(task.include)


# ---- lm-eval ---------------------------------------------------------------------------------------
def _register():
    import lm_eval.models  # noqa: F401  lm-eval's own model classes (hf, local-completions, ...) beside ours
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model

    @register_model("groundup")
    class GroundupLM(LM):
        """Our model as an lm-eval model: ``--model groundup --model_args pretrained=PATH`` (a checkpoint of
        ours or a Hugging Face Llama directory), or built around any Scorer (``scorer=``)."""

        def __init__(self, pretrained: str | None = None, scorer=None, batch_size: int | str = 16,
                     device: str | None = None, **_ignored):
            super().__init__()
            from pipelines.evaluate.scorer import LocalScorer

            size = int(batch_size) if str(batch_size).isdigit() else 16
            self.scorer = scorer or LocalScorer.load("model", pretrained, device, size)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            scores = self.scorer.loglikelihood([request.args for request in requests])
            return [(s.logprob, s.greedy) for s in scores]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return [s.logprob for s in self.scorer.rolling([request.args[0] for request in requests])]

        def generate_until(self, requests, disable_tqdm: bool = False):
            from pipelines.evaluate.scorer import DOCUMENT_START

            groups: dict[tuple, list[int]] = {}
            for index, request in enumerate(requests):
                kwargs = dict(request.args[1]) if len(request.args) > 1 else {}
                until = kwargs.get("until") or []
                until = tuple([until] if isinstance(until, str) else until)
                groups.setdefault((until, int(kwargs.get("max_gen_toks", 256))), []).append(index)
            out = [""] * len(requests)
            for (until, max_new), indices in groups.items():
                prompts = [self.scorer.tokenizer.encode(requests[i].args[0]) or [DOCUMENT_START] for i in indices]
                for i, text in zip(indices, self.scorer.generate(prompts, max_new, until)):
                    for stop in until:  # the answer ends before the first stop string
                        text = text.split(stop, 1)[0] if stop else text
                    out[i] = text
            return out

    return GroundupLM


_MODEL_CLASS = None


def lm_class():
    """The registered lm-eval model class (registered on first use: importing lm_eval takes seconds)."""
    global _MODEL_CLASS
    if _MODEL_CLASS is None:
        _MODEL_CLASS = _register()
    return _MODEL_CLASS


def _metric_name(key: str) -> tuple[str, str] | None:
    metric, _, filter_name = key.partition(",")
    if metric.endswith("_stderr") or metric in ("alias", "name", "sample_len"):
        return None
    return metric, filter_name


def run_lm_eval(scorer, task: TaskSpec, limit: int | None, num_fewshot: int | None, seed: int,
                keep_samples: int = 3) -> dict[str, Any]:
    """Run one task through lm_eval.simple_evaluate with our model class; metrics, stderrs, per-example
    correctness and a few samples."""
    os.environ.update(OFFLINE_ENV)
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's per-task progress bars: our line per task says it
    with tempfile.TemporaryDirectory(prefix="groundup-lmeval-") as scratch:
        os.environ["HF_DATASETS_CACHE"] = str(Path(scratch) / "datasets")
        include = materialise(task, Path(scratch) / "tasks")
        import logging

        for noisy in ("lm_eval", "lm-eval", "datasets", "evaluate"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        import lm_eval
        import lm_eval.evaluator
        from lm_eval.tasks import TaskManager

        # lm-eval asks git for the current commit, printing "fatal: not a git repository" outside one, and
        # collects an environment report (pip list, a second or more per task): neither is used here.
        lm_eval.evaluator.get_git_commit_hash = lambda: None
        lm_eval.evaluator.add_env_info = lambda results: None

        model = lm_class()(scorer=scorer)
        manager = TaskManager(include_path=include, include_defaults=False)
        output = lm_eval.simple_evaluate(model=model, tasks=[task.name], task_manager=manager, limit=limit,
                                         num_fewshot=num_fewshot, log_samples=True, bootstrap_iters=1000,
                                         random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                         fewshot_random_seed=seed)
    results = output["results"][task.name]
    metrics: dict[str, dict[str, Any]] = {}
    for key, value in results.items():
        named = _metric_name(key)
        if named is None or not isinstance(value, (int, float)):
            continue
        metric, filter_name = named
        stderr = results.get(f"{metric}_stderr,{filter_name}")
        metrics[metric] = {"value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
    samples = output.get("samples", {}).get(task.name, [])
    primary = next(iter(metrics), None)
    per_example = {int(s["doc_id"]): float(s.get(primary, 0.0)) for s in samples if primary in s}
    shown = []
    for sample in samples[:keep_samples]:
        arguments = sample.get("arguments") or []
        prompt = arguments[0][0] if arguments and isinstance(arguments[0], (list, tuple)) else ""
        responses = sample.get("filtered_resps")
        shown.append({"doc_id": sample["doc_id"], "prompt": prompt, "target": str(sample.get("target")),
                      "response": _short(responses), primary: _number(sample.get(primary))})
    return {"metrics": metrics, "examples": len(samples), "per_example": per_example, "samples": shown,
            "config": output.get("configs", {}).get(task.name, {}).get("output_type")}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 300 else text[:297] + "..."


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
