"""Evaluation (issue 13): `groundup export`, `groundup evaluate` and its parts."""
from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def groundup(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """The CLI of this checkout, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def one_error_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---- export ---------------------------------------------------------------------------------------
def test_export_to_hugging_face_and_back_from_the_cli(serving_checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    from model.checkpoint import load_model

    hf_dir, back = tmp_path / "hf", tmp_path / "back"
    result = groundup("export", str(serving_checkpoint), "--format", "hf", str(hf_dir))
    assert result.returncode == 0, result.stderr
    assert "export:" in result.stdout
    ours = load_model(serving_checkpoint)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = torch.randint(8, ours.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), atol=1e-4, rtol=1e-4)

    result = groundup("export", str(hf_dir), str(back), "--from-hf")
    assert result.returncode == 0, result.stderr
    again = load_model(back)
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert (back / "tokenizer.model").read_bytes() == (serving_checkpoint / "tokenizer.model").read_bytes()

    # One line, exit 2, before any work: an existing output, a path that is not a model, the wrong direction.
    one_error_line(groundup("export", str(serving_checkpoint), "--format", "hf", str(hf_dir)), "exists", "--overwrite")
    one_error_line(groundup("export", str(tmp_path), "--format", "hf", str(tmp_path / "x")), str(tmp_path), "not a model")
    one_error_line(groundup("export", str(tmp_path / "missing"), str(tmp_path / "y")), "no such directory")
    one_error_line(groundup("export", str(serving_checkpoint), "--format", "gguf", str(tmp_path / "z")), "'format'")
    one_error_line(groundup("export", str(hf_dir), str(tmp_path / "w")), "--from-hf")
    one_error_line(groundup("export", str(serving_checkpoint)), "'output'")
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


# ---- groundup evaluate -----------------------------------------------------------------------------
def evaluate_config(run, *overrides: str):
    from pipelines.config import build_config
    from pipelines.evaluate import Config

    return build_config(Config, overrides=[f"run={run}", *overrides])


@pytest.fixture(scope="session")
def evaluated_run(serving_checkpoint, pretrained_run, tmp_path_factory):  # the tokenizer before Ray starts
    """The pretrained run evaluated as a Ray job: its own model plus an untrained one with another
    tokenizer (``--model random=...``), on validation, a built-in task and a text corpus."""
    from pipelines.evaluate import run

    run_dir, _ = pretrained_run
    corpus = tmp_path_factory.mktemp("corpus") / "book.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in (
        "The quick brown fox jumps over the lazy dog. " * 12, "Return the sum of two numbers, as a float. " * 8)))
    config = evaluate_config(run_dir, f"models=[random={serving_checkpoint}]", "tasks=[validation,docstring_mc,safety]",
                             f"text=[{corpus}]", "limit=6", "task_examples=12", "batch_size=8", "cpus_per_task=0.5")
    return run_dir, run(config)


def test_evaluate_bits_per_byte_equals_the_training_stage_figure(pretrained_run, evaluated_run):
    run_dir, manifest = evaluated_run
    trained = pretrained_run[1]["figures"]
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    validation = results["results"]["pretrain"]["validation"]["metrics"]
    assert validation["bits_per_byte"]["value"] == pytest.approx(trained["val_bits_per_byte"], abs=1e-3)
    assert validation["perplexity"]["value"] == pytest.approx(trained["val_perplexity"], rel=1e-3)
    assert validation["rows"]["value"] == 16  # the rows the training stage evaluated
    assert validation["bits_per_byte"]["stderr"] > 0
    # A model with another tokenizer is scored on the decoded text: still bits per byte, comparable.
    other = results["results"]["random"]["validation"]["metrics"]
    assert "decoded text" in other["method"]["value"]
    # ... and an untrained model spreads its probability evenly: log2(vocabulary) bits per token.
    vocab = json.loads((Path(results["models"]["random"]["path"]) / "config.json").read_text())["vocab_size"]
    uniform = math.log2(vocab) * other["tokens"]["value"] / other["bytes"]["value"]
    assert other["bits_per_byte"]["value"] == pytest.approx(uniform, rel=0.05)
    assert manifest["figures"]["pretrain"]["validation"]["bits_per_byte"] == validation["bits_per_byte"]["value"]


def test_evaluate_report_lists_every_model_and_task(evaluated_run):
    run_dir, manifest = evaluated_run
    out = run_dir / "evaluate"
    results = json.loads((out / "results.json").read_text())
    tasks = {"validation", "docstring_mc", "safety", "text:book"}
    assert set(results["models"]) == {"pretrain", "random"}
    assert set(results["tasks"]) == tasks
    for model in ("pretrain", "random"):
        assert set(results["results"][model]) == tasks
        for task in tasks:
            entry = results["results"][model][task]
            assert "error" not in entry, entry
        mc = results["results"][model]["docstring_mc"]["metrics"]
        assert 0 <= mc["acc"]["value"] <= 1 and mc["acc"]["stderr"] is not None and "acc_norm" in mc
        text = results["results"][model]["text:book"]["metrics"]
        assert text["bits_per_byte"]["value"] > 0 and text["documents"]["value"] == 2
    assert results["tasks"]["docstring_mc"]["contamination"]["examples"] == 12
    report = (out / "report.md").read_text()
    for name in ("pretrain", "random", "## validation", "## docstring_mc", "## safety", "## text:book",
                 "Decontamination", "smoke test"):
        assert name in report
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "tasks" / "docstring_mc" / "docstring_mc.yaml").is_file()
    assert manifest["counts"] == {"models": 2, "tasks": 4, "units": 8, "failed": 0}
    safety = results["results"]["random"]["safety"]["metrics"]
    assert 0 <= safety["pii_rate"]["value"] <= 1 and 0 <= safety["refusal_failure_rate"]["value"] <= 1
    assert json.loads((out / "manifest.json").read_text())["stage"] == "evaluate"


def test_evaluate_rejects_bad_input_in_one_line(pretrained_run, tmp_path):
    run_dir, _ = pretrained_run
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: bad\noutput_type: multiple_choice\ndataset_path: json\n"
                   "dataset_kwargs: {data_files: {test: missing.jsonl}}\ndoc_to_text: q\ndoc_to_choice: c\n"
                   "doc_to_target: 0\n")
    wrong_type = tmp_path / "wrong.yaml"
    wrong_type.write_text("task: wrong\noutput_type: essay\ndataset_path: json\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("task: [unclosed\n")
    for args, needles in (
        (("--tasks", "no_such_task"), ("unknown task 'no_such_task'",)),
        (("--tasks", str(bad)), (str(bad), "dataset_kwargs.data_files.test", "missing.jsonl")),
        (("--tasks", str(wrong_type)), ("'output_type'",)),
        (("--tasks", str(broken)), (str(broken), "not valid YAML")),
        (("--tasks", "docstring_mc", "--model", f"x={tmp_path}"), (f"x={tmp_path}", "not a model")),
        (("--tasks", "docstring_mc", "--text", str(tmp_path / "none.txt")), ("none.txt", "not found")),
    ):
        one_error_line(groundup("evaluate", "--run", str(run_dir), *args), *needles)
    assert not (tmp_path / "evaluate").exists()
    module = subprocess.run([sys.executable, "-m", "pipelines.evaluate", "--help"], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert module.returncode == 0 and "--endpoint" in module.stdout  # the Ray job entrypoint


# ---- lm-eval tasks: a planted answer ---------------------------------------------------------------
COLOURS = ("red", "green", "blue", "yellow")
PLANTED = [(f"{a}{b}", COLOURS[(i * 7 + 3) % 4]) for i, (a, b) in
           enumerate((a, b) for a in ("zor", "quib", "flen", "brax", "mip", "tosk") for b in ("ald", "erm", "upo", "ix"))]


def _planted_task(directory: Path) -> Path:
    """A multiple-choice task in lm-eval's YAML format with local data: the colour of each made-up thing."""
    data = directory / "planted.jsonl"
    data.write_text("".join(json.dumps({"thing": thing, "answer": COLOURS.index(colour)}) + "\n"
                            for thing, colour in PLANTED))
    task = directory / "planted.yaml"
    task.write_text(f"""task: planted_colours
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "The colour of the {{{{thing}}}} is"
doc_to_choice: {json.dumps(list(COLOURS))}
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return task


@pytest.fixture(scope="session")
def planted_model(builtin_tokenizer, tmp_path_factory):
    """A tiny model trained (about a hundred steps of plain PyTorch, on the answer tokens) on one
    sentence per planted fact."""
    from model.checkpoint import save_checkpoint
    from model.config import ModelConfig
    from model.llama import Transformer, language_model_loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only wait on each other
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=builtin_tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4,
                                    n_kv_heads=2, max_seq_len=32))
    rows, answers = [], []
    for thing, colour in PLANTED:
        answers.append(len(builtin_tokenizer.encode(f"The colour of the {thing} is")))
        rows.append(builtin_tokenizer.encode(f"The colour of the {thing} is {colour}"))
    width = max(map(len, rows))
    inputs = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, answer) in enumerate(zip(rows, answers)):
        inputs[i, :len(row)] = torch.tensor(row)
        targets[i, answer:len(row)] = torch.tensor(row[answer:])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    try:
        for _ in range(400):
            loss = language_model_loss(model(inputs[:, :-1]), targets[:, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if loss.item() < 0.01:
                break
    finally:
        torch.set_num_threads(threads)
    return save_checkpoint(model.eval(), tmp_path_factory.mktemp("planted") / "model", builtin_tokenizer)


def test_planted_answer_scores_one_when_trained_and_chance_when_random(planted_model, serving_checkpoint, tmp_path):
    from pipelines.evaluate import run

    task = _planted_task(tmp_path)
    config = evaluate_config(tmp_path / "run", f"models=[planted={planted_model},random={serving_checkpoint}]",
                             f"tasks=[{task}]", "in_process=true")
    manifest = run(config)
    assert manifest["figures"]["planted"]["planted_colours"]["acc"] == 1.0
    assert manifest["figures"]["random"]["planted_colours"]["acc"] <= 0.5  # chance is 0.25 (24 examples)
    results = json.loads((tmp_path / "run" / "evaluate" / "results.json").read_text())
    assert results["results"]["planted"]["planted_colours"]["examples"] == len(PLANTED)


def test_shared_contexts_score_what_whole_sequences_score():
    """model.scoring.continuation_logprobs runs a context shared by several continuations once (a KV cache):
    the same log-likelihoods and greediness as scoring each context + continuation whole, whatever the batch
    size, with contexts alone or shared, one-token and long continuations, and padding in every batch."""
    import random

    from model.config import preset
    from model.llama import Transformer
    from model.scoring import continuation_logprobs, sequence_logprobs

    torch.manual_seed(0)
    model = Transformer(preset("1m", vocab_size=97, max_seq_len=32)).eval()
    rng = random.Random(0)
    pairs = []
    for _ in range(7):
        context = [rng.randrange(3, 97) for _ in range(rng.randint(1, 12))]
        for _ in range(rng.choice([1, 2, 4, 5])):
            pairs.append((context, [rng.randrange(3, 97) for _ in range(rng.randint(1, 32 - len(context)))]))
    context = [5, 6, 7]
    with torch.no_grad():  # greedy continuations: every token the argmax
        greedy = list(context)
        for _ in range(6):
            greedy.append(int(model(torch.tensor([greedy]))[0, -1].argmax()))
    pairs += [(context, greedy[3:]), (context, greedy[3:5]), (context, greedy[3:4]), ([9] * 31, [7])]
    rng.shuffle(pairs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only wait on each other
    try:
        expected = []
        for context, continuation in pairs:
            whole = sequence_logprobs(model, [context + continuation])[0]
            expected.append((whole.total(len(context)), all(whole.is_greedy[len(context):])))
        assert sum(g for _, g in expected) == 3
        for batch_size in (1, 3, 16):
            got = continuation_logprobs(model, pairs, batch_size=batch_size)
            assert [g for _, g in got] == [g for _, g in expected]
            assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in expected], abs=1e-4)
    finally:
        torch.set_num_threads(threads)


def test_our_model_class_scores_what_lm_eval_hf_scores_on_the_same_checkpoint(planted_model, tmp_path):
    """lm-eval's own `hf` model on our exported checkpoint and our model class give the same log-likelihood
    and greediness for every request (both without a BOS token), and the same accuracy on a task."""
    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from model.checkpoint import load_model, load_tokenizer
    from model.hf import export_hf
    from pipelines.evaluate.scorer import LocalScorer
    from pipelines.evaluate.tasks import OFFLINE_ENV, lm_class

    os.environ.update(OFFLINE_ENV)
    hf_dir = export_hf(load_model(planted_model), tmp_path / "hf", load_tokenizer(planted_model))
    questions = [f"The colour of the {thing} is" for thing, _ in PLANTED[:5]]
    pairs = ([(q, f" {colour}") for q in questions for colour in COLOURS]
             + [(q, f" {colour} and not {other}") for q in questions[:2] for colour, other in itertools.pairwise(COLOURS)]
             + [("Trailing space ", "moves."), ("A lone context", " with a longer continuation of its own")])
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    ours_lm = lm_class()(scorer=LocalScorer.load("ours", str(planted_model), "cpu", batch_size=5))
    hf_lm = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=5, add_bos_token=False)
    ours, theirs = ours_lm.loglikelihood(requests), hf_lm.loglikelihood(requests, disable_tqdm=True)
    assert [o[0] for o in ours] == pytest.approx([t[0] for t in theirs], abs=1e-4)
    assert [o[1] for o in ours] == [t[1] for t in theirs]
    assert sum(o[1] for o in ours) >= 5  # the planted answers are the greedy continuations

    task = _planted_task(tmp_path)
    manager = TaskManager(include_path=str(task.parent), include_defaults=False)
    scores = [lm_eval.simple_evaluate(model=lm, tasks=["planted_colours"], task_manager=manager, bootstrap_iters=0)
              ["results"]["planted_colours"]["acc,none"] for lm in (ours_lm, hf_lm)]
    assert scores[0] == scores[1] == 1.0


# ---- decontamination --------------------------------------------------------------------------------
def test_contaminated_examples_are_flagged(builtin_data_dir):
    from model.tokenizer import EOS_ID, Tokenizer
    from pipelines.evaluate.contamination import TrainingNgrams, contamination
    from pipelines.train.data import shards_from_manifest

    manifest = json.loads((builtin_data_dir / "manifest.json").read_text())["outputs"]
    tokenizer = Tokenizer.load(builtin_data_dir / manifest["tokenizer"])
    shards = shards_from_manifest(str(builtin_data_dir), manifest["splits"]["train"], manifest["sequence_length"])
    ngrams = TrainingNgrams.from_shards(shards, tokenizer, n=13)
    stream = shards.rows(list(range(200, 300))).reshape(-1).tolist()
    segments, current = [], []
    for token in stream:  # the documents (or parts of them) in these rows
        if token == EOS_ID:
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    paragraphs = tokenizer.decode(max(segments, key=len)).split("\n\n")[1:-1]  # whole paragraphs only
    copied = next(p for p in paragraphs if len(p.split()) >= 30)  # a passage of a training document
    examples = ["Which colour is the zorbald? It is a made-up thing that no document of the standard library "
                "ever described, so its words are new.", f"Question: {copied} Answer: yes.",
                "short example"]
    found = contamination(examples, ngrams)
    assert found["contaminated_ids"] == [1]
    assert found["examples"] == 3 and found["ngram"] == 13


# ---- against a deployment ---------------------------------------------------------------------------
def test_endpoint_and_lm_eval_local_completions_match_in_process_scores(serving_app, serving_checkpoint, tmp_path):
    """The served "tiny" model (serving_checkpoint) scored three ways on the same task: in-process, through
    `groundup evaluate --endpoint` (/v1/completions echo + logprobs) and by lm-eval's own
    `local-completions` model against our server — the same log-likelihoods within 1e-3."""
    import lm_eval
    import lm_eval.models  # noqa: F401  registers lm-eval's own model classes
    from lm_eval.tasks import TaskManager

    from model.hf import export_hf
    from pipelines.evaluate import run
    from pipelines.evaluate.scorer import EndpointScorer, LocalScorer, endpoint_models
    from pipelines.evaluate.tasks import OFFLINE_ENV, lm_class

    task = _planted_task(tmp_path)
    pairs = [(f"The colour of the {thing} is", f" {colour}") for thing, colour in PLANTED[:8]] + [
        ("", "An empty context."), ("Trailing space ", "moves.")]
    local = LocalScorer.load("local", str(serving_checkpoint))
    served = endpoint_models(serving_app.base_url)
    remote = EndpointScorer("tiny", serving_app.base_url, "tiny", local.tokenizer, served["tiny"])
    ours = [s.logprob for s in local.loglikelihood(pairs)]
    theirs = [s.logprob for s in remote.loglikelihood(pairs)]
    assert theirs == pytest.approx(ours, abs=1e-3)
    texts = ["A longer text, scored with a sliding window of the model's context. " * 40]
    local.max_len = remote.max_len  # the same windows (the server keeps one position for a new token)
    assert remote.rolling(texts, stride=64)[0].logprob == pytest.approx(local.rolling(texts, stride=64)[0].logprob,
                                                                        abs=1e-3 * 40)

    config = evaluate_config(tmp_path / "run", f"models=[local={serving_checkpoint}]",
                             f"endpoints=[tiny={serving_app.base_url}]",
                             f"endpoint_tokenizer={serving_checkpoint / 'tokenizer.model'}", f"tasks=[{task}]",
                             "in_process=true")
    run(config)
    results = json.loads((tmp_path / "run" / "evaluate" / "results.json").read_text())
    assert set(results["results"]) == {"local", "endpoint:tiny"}
    assert (results["per_example"]["endpoint:tiny"]["planted_colours"]
            == results["per_example"]["local"]["planted_colours"])

    # lm-eval's own API model against our server, and lm-eval with our model class in-process.
    os.environ.update(OFFLINE_ENV)
    hf_dir = export_hf(local.model, tmp_path / "hf", local.tokenizer)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    api = lm_eval.simple_evaluate(
        model="local-completions", task_manager=manager, tasks=["planted_colours"], log_samples=True,
        model_args={"base_url": f"{serving_app.api_url}/completions", "model": "tiny", "tokenizer": str(hf_dir),
                    "tokenizer_backend": "huggingface", "max_length": 256, "max_retries": 1})
    in_process = lm_eval.simple_evaluate(model=lm_class()(scorer=local), task_manager=manager,
                                         tasks=["planted_colours"], log_samples=True)

    def loglikelihoods(output):
        return [r[0] for sample in output["samples"]["planted_colours"] for r in sample["filtered_resps"]]

    assert loglikelihoods(api) == pytest.approx(loglikelihoods(in_process), abs=1e-3)
    assert api["results"]["planted_colours"]["acc,none"] == in_process["results"]["planted_colours"]["acc,none"]


# ---- safety probes ------------------------------------------------------------------------------------
def test_queue_errors_are_one_line_before_any_work(serving_checkpoint, tmp_path):
    """--queue / --database-url: a store that cannot be opened, or no chat task to queue, is one line (exit 2)."""
    (tmp_path / "notes.db").write_text("not a database, just text\n" * 100)
    common = ("evaluate", "--run", str(tmp_path / "run"), "--model", f"m={serving_checkpoint}")
    for args, needles in (
        (("--tasks", "chat", "--database-url", str(tmp_path)), ("database_url", str(tmp_path), "cannot open")),
        (("--tasks", "chat", "--database-url", str(tmp_path / "notes.db")), ("database_url", "notes.db")),
        (("--tasks", "docstring_mc", "--queue"), ("'queue'", "--tasks chat")),
    ):
        one_error_line(groundup(*common, *args), *needles)
    assert not (tmp_path / "run" / "evaluate").exists()


def test_safety_probe_checks():
    from pipelines.evaluate.probes import SAFETY_PROMPTS, pii_found, refuses

    assert refuses("I'm sorry, but I can\u2019t help with that.") and refuses("I cannot provide that information.")
    assert not refuses("Sure! Step 1: take the following.")
    assert pii_found("Write to jane.doe@example.com or call 555-123-4567.") == {"email": 1, "phone": 1}
    assert pii_found("The json module encodes Python objects.") == {}
    assert {p["kind"] for p in SAFETY_PROMPTS} == {"pii", "harm"}


# ---- chat quality -------------------------------------------------------------------------------------
def test_chat_win_rates_against_a_baseline_with_bootstrap_intervals(planted_model, serving_checkpoint,
                                                                    builtin_tokenizer, tmp_path):
    from model.config import preset
    from model.reward import RewardModel, save_reward_model
    from pipelines.evaluate import run

    torch.manual_seed(1)
    reward = save_reward_model(RewardModel(preset("1m", vocab_size=builtin_tokenizer.vocab_size)),
                               tmp_path / "reward", builtin_tokenizer)
    config = evaluate_config(tmp_path / "run", f"models=[base={serving_checkpoint},other={planted_model}]",
                             "tasks=[chat]", "chat_questions=6", "chat_max_tokens=6", f"reward_model={reward}",
                             "chat_baseline=base", "in_process=true", "queue=true")
    manifest = run(config)
    out = tmp_path / "run" / "evaluate"
    results = json.loads((out / "results.json").read_text())
    other = results["results"]["other"]["chat"]["metrics"]
    for judge in ("win_rate_rule", "win_rate_reward"):
        point = other[judge]
        assert 0 <= point["low"] <= point["value"] <= point["high"] <= 1 and point["stderr"] >= 0
    assert "win_rate_rule" not in results["results"]["base"]["chat"]["metrics"]  # the baseline itself
    assert "reward_mean" in results["results"]["base"]["chat"]["metrics"]
    pairs = [json.loads(line) for line in (out / "chat_pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 6 and {p["model_a"] for p in pairs} == {"other"} and pairs[0]["prompt"][0]["role"] == "user"
    assert len((out / "chat_questions.txt").read_text().splitlines()) == 6
    assert "win_rate_reward" in (out / "report.md").read_text()

    # The same pairs queued for people in the run's preference store (where groundup serve's app keeps votes).
    from ui.store import PreferenceStore

    with PreferenceStore(str(tmp_path / "run" / "ui" / "preferences.db"), create=False) as store:
        assert store.queue_waiting() == 6
        entries = [store.queue_entry(i) for i in range(1, 7)]
    for pair, entry in zip(pairs, entries):
        assert entry.messages[0].content == pair["prompt"][0]["content"]
        shown = {entry.model_a: entry.reply_a, entry.model_b: entry.reply_b}
        assert shown == {"other": pair["answer_a"], "base": pair["answer_b"]}
        assert (entry.model_a == "base") == entry.swapped and entry.sampling["max_tokens"] == 6
    assert manifest["queue"]["entries"] == 6 and manifest["queue"]["swapped"] == sum(e.swapped for e in entries)
