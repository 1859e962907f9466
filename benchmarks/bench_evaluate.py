"""Evaluation throughput: multiple-choice examples/s of our in-process model class against lm-eval's own
``hf`` model on our exported Hugging Face checkpoint — same task, same machine, same batch size.

Both go through ``lm_eval.simple_evaluate`` on the built-in ``docstring_mc`` task (4 choices per example,
so 4 log-likelihood requests each); only the model class differs. Like with like: the same weights in
float32, the same torch threads, the same batch size, the same tokens (``hf`` without a BOS token, as lm-eval's
API models and ours score; the per-request log-likelihoods must agree), one warm-up run each, then rounds in
which the two take turns (a change of load on the machine hits both); the best round of each counts, wall
clock and CPU time both reported. lm-eval's environment report (it runs ``pip list``) is skipped for both.
The model is the chosen preset with fresh weights (throughput does not depend on training) and a small
tokenizer trained on the built-in corpus. Prints one JSON line; ``ratio`` = ours / hf (target >= 1.0).

    python benchmarks/bench_evaluate.py [--preset 10m] [--examples 64] [--batch-size 16] [--rounds 3] [--threads N]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="10m")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many timed runs per model")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from model.checkpoint import save_checkpoint
    from model.config import preset
    from model.device import pick_device
    from model.hf import export_hf
    from model.llama import Transformer
    from model.tokenizer import train_tokenizer
    from pipelines.data.builtin import iter_builtin_documents
    from pipelines.evaluate.scorer import LocalScorer
    from pipelines.evaluate.tasks import OFFLINE_ENV, builtin_task, lm_class, materialise

    os.environ.update(OFFLINE_ENV)
    import logging

    for name in ("lm_eval", "lm-eval", "datasets", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import lm_eval
    from lm_eval.tasks import TaskManager

    device = pick_device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as scratch:
        root = Path(scratch)
        os.environ["HF_DATASETS_CACHE"] = str(root / "datasets")
        texts = [d["text"] for d in itertools.islice(iter_builtin_documents(), 300)]
        tokenizer = train_tokenizer(texts, root / "tokenizer", vocab_size=1024)
        torch.manual_seed(0)
        model = Transformer(preset(args.preset, vocab_size=tokenizer.vocab_size))
        checkpoint = save_checkpoint(model, root / "ours", tokenizer)
        hf_dir = export_hf(model, root / "hf", tokenizer)
        task = builtin_task("docstring_mc", 0, 0.05, args.examples)
        include = materialise(task, root / "tasks")
        manager = TaskManager(include_path=include, include_defaults=False)

        import lm_eval.evaluator
        from lm_eval.models.huggingface import HFLM

        lm_eval.evaluator.get_git_commit_hash = lambda: None  # both: no git, no pip list
        lm_eval.evaluator.add_env_info = lambda results: None

        models = {"ours": lm_class()(scorer=LocalScorer.load("ours", str(checkpoint), str(device), args.batch_size)),
                  "hf": HFLM(pretrained=str(hf_dir), dtype="float32", device=str(device), batch_size=args.batch_size,
                             add_bos_token=False)}

        def once(lm, limit=None) -> tuple[float, float, dict]:
            started, cpu = time.perf_counter(), time.process_time()
            output = lm_eval.simple_evaluate(model=lm, tasks=["docstring_mc"], task_manager=manager, limit=limit,
                                             log_samples=True, bootstrap_iters=0)
            return time.perf_counter() - started, time.process_time() - cpu, output

        for lm in models.values():  # warm-up: first-call costs (datasets cache, kernels) for neither
            once(lm, limit=4)
        best = {name: float("inf") for name in models}
        best_cpu = {name: float("inf") for name in models}
        outputs: dict[str, dict] = {}
        for _ in range(args.rounds):  # the two take turns, so a change of load on the machine hits both
            for name, lm in models.items():
                seconds, cpu, outputs[name] = once(lm)
                best[name], best_cpu[name] = min(best[name], seconds), min(best_cpu[name], cpu)

        def loglikelihoods(output):
            samples = sorted(output["samples"]["docstring_mc"], key=lambda s: s["doc_id"])
            return [r[0] for s in samples for r in s["filtered_resps"]]

        differences = [abs(a - b) for a, b in zip(loglikelihoods(outputs["ours"]), loglikelihoods(outputs["hf"]))]
        n = args.examples
        ours_rate, ours_s, ours_res = n / best["ours"], best["ours"], outputs["ours"]["results"]["docstring_mc"]
        hf_rate, hf_s, hf_res = n / best["hf"], best["hf"], outputs["hf"]["results"]["docstring_mc"]
    print(json.dumps({
        "benchmark": "evaluate_multiple_choice", "task": "docstring_mc", "examples": args.examples,
        "requests_per_example": 4, "preset": args.preset, "device": str(device), "batch_size": args.batch_size,
        "ours_examples_per_s": round(ours_rate, 2), "hf_examples_per_s": round(hf_rate, 2),
        "ratio": round(ours_rate / hf_rate, 3), "target": 1.0, "ours_s": round(ours_s, 2), "hf_s": round(hf_s, 2),
        "ours_cpu_s": round(best_cpu["ours"], 2), "hf_cpu_s": round(best_cpu["hf"], 2),
        "cpu_ratio": round(best_cpu["hf"] / best_cpu["ours"], 3), "rounds": args.rounds,
        "ours_acc": ours_res.get("acc,none"), "hf_acc": hf_res.get("acc,none"),
        "max_loglikelihood_difference": round(max(differences), 6), "dtype": "float32",
        "torch_threads": torch.get_num_threads(),
        "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "0.4",
    }))


if __name__ == "__main__":
    main()
