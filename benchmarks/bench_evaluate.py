"""Evaluation throughput: multiple-choice examples/s of our in-process model class against lm-eval's own
``hf`` model on our exported Hugging Face checkpoint — same task, same machine, same batch size.

Both go through ``lm_eval.simple_evaluate`` on the built-in ``docstring_mc`` task (4 choices per example,
so 4 log-likelihood requests each); only the model class differs. The model is the chosen preset with
fresh weights (throughput does not depend on training) and a small tokenizer trained on the built-in
corpus. Prints one JSON line; ``ratio`` = ours / hf (target >= 1.0).

    python benchmarks/bench_evaluate.py [--preset 10m] [--examples 64] [--batch-size 16] [--rounds 2]
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
    parser.add_argument("--rounds", type=int, default=2, help="best of this many timed runs per model")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    import torch

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

        def once(make_model) -> tuple[float, dict]:
            lm = make_model()
            started = time.perf_counter()
            output = lm_eval.simple_evaluate(model=lm, tasks=["docstring_mc"], task_manager=manager,
                                             log_samples=False, bootstrap_iters=0)
            return time.perf_counter() - started, output["results"]["docstring_mc"]

        from lm_eval.models.huggingface import HFLM

        makers = {"ours": lambda: lm_class()(scorer=LocalScorer.load("ours", str(checkpoint), str(device),
                                                                      args.batch_size)),
                  "hf": lambda: HFLM(pretrained=str(hf_dir), dtype="float32", device=str(device),
                                     batch_size=args.batch_size)}
        best = {name: float("inf") for name in makers}
        results: dict[str, dict] = {}
        for _ in range(args.rounds):  # the two take turns, so a change of load on the machine hits both
            for name, make in makers.items():
                seconds, results[name] = once(make)
                best[name] = min(best[name], seconds)
        n = args.examples
        ours_rate, ours_s, ours_res = n / best["ours"], best["ours"], results["ours"]
        hf_rate, hf_s, hf_res = n / best["hf"], best["hf"], results["hf"]
    print(json.dumps({
        "benchmark": "evaluate_multiple_choice", "task": "docstring_mc", "examples": args.examples,
        "requests_per_example": 4, "preset": args.preset, "device": str(device), "batch_size": args.batch_size,
        "ours_examples_per_s": round(ours_rate, 2), "hf_examples_per_s": round(hf_rate, 2),
        "ratio": round(ours_rate / hf_rate, 3), "target": 1.0, "ours_s": round(ours_s, 2), "hf_s": round(hf_s, 2),
        "ours_acc": ours_res.get("acc,none"), "hf_acc": hf_res.get("acc,none"), "torch_threads": torch.get_num_threads(),
        "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "0.4",
    }))


if __name__ == "__main__":
    main()
