"""``groundup quickstart``: every stage end to end on the built-in corpus, on one machine.

data (clean, filter, dedup, tokenizer, packed shards) -> pretrain (the 10m preset, recipe
``pipelines/recipes/quickstart_pretrain.yaml``) -> samples from the trained model -> SFT on the
built-in instruction set (``quickstart_sft.yaml``) -> PPO (GRPO rewarded by the built-in rule,
``quickstart_ppo.yaml``) -> the base, SFT and PPO models' replies to the same held-out questions. Each stage is called through its own ``run(config)``, exactly as
``groundup <stage>`` would call it, and writes into the same run directory.
"""
from __future__ import annotations

import time
from pathlib import Path

from pydantic import Field

from pipelines.cli import Flag, stage_main
from pipelines.config import StageConfig, build_config
from pipelines.rundir import RunDir, local_copy, new_manifest

PRETRAIN_RECIPE = Path(__file__).parent / "recipes" / "quickstart_pretrain.yaml"
SFT_RECIPE = Path(__file__).parent / "recipes" / "quickstart_sft.yaml"
PPO_RECIPE = Path(__file__).parent / "recipes" / "quickstart_ppo.yaml"
SAMPLE_PROMPTS = ("The", "Return a", "This module provides", "If the argument is")


class Config(StageConfig):
    run: str = Field("runs/quickstart", description="where every stage writes its outputs")
    model: str | None = Field(None, description="model preset (default: the recipe's, 10m)")
    steps: int | None = Field(None, ge=1, description="pretraining steps (default: the recipe's)")
    sft_steps: int | None = Field(None, ge=1, description="SFT steps (default: the recipe's)")
    ppo_steps: int | None = Field(None, ge=0, description="PPO iterations (default: the recipe's; 0 skips PPO)")
    questions: int = Field(5, ge=0, description="held-out questions both models answer at the end")
    sample_tokens: int = Field(48, ge=1, description="tokens per printed sample")


CLI_FLAGS = (
    Flag(("--run",), "run", "run directory (default runs/quickstart)"),
    Flag(("--model",), "model", "model preset (default 10m)"),
    Flag(("--steps",), "steps", "pretraining steps (default 250, the recipe)", {"type": int}),
    Flag(("--sft-steps",), "sft_steps", "SFT steps (default 100, the recipe)", {"type": int}),
    Flag(("--ppo-steps",), "ppo_steps", "PPO iterations (default 20, the recipe; 0 skips PPO)", {"type": int}),
    Flag(("--seed",), "seed", "seed for every stage", {"type": int}),
)


def print_samples(model_dir: Path, prompts: tuple[str, ...], max_new_tokens: int, seed: int) -> list[dict]:
    from model.checkpoint import load_model, load_tokenizer
    from model.generate import SamplingParams, generate

    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, top_p=0.95,
                            repetition_penalty=1.1, seed=seed)
    outputs = generate(model, [tokenizer.encode(p, bos=True) for p in prompts], params, tokenizer)
    print("quickstart: samples from the trained model")
    samples = []
    for prompt, out in zip(prompts, outputs):
        print(f"  > {prompt}{out.text}".replace("\n", "\n    "))
        samples.append({"prompt": prompt, "completion": out.text})
    return samples


def run(config: Config) -> dict:
    from pipelines import ppo, pretrain, sft
    from pipelines.data import stage as data_stage
    from pipelines.data.instructions import held_out_questions
    from pipelines.posttrain import compare_replies

    started = time.time()
    print(f"quickstart: run directory {config.run}", flush=True)
    data_config = build_config(data_stage.Config, values={"run": config.run, "seed": config.seed,
                                                          "inputs": ["builtin"]})
    data_manifest = data_stage.run(data_config)
    data_done = time.time()

    values = {"run": config.run, "seed": config.seed}
    if config.model:
        values["model"] = config.model
    if config.steps:
        values["train.length.steps"] = config.steps
    pretrain_manifest = pretrain.run(build_config(pretrain.Config, PRETRAIN_RECIPE, values=values))
    pretrain_done = time.time()

    model_dir = RunDir(config.run).uri_of("pretrain", pretrain_manifest["outputs"]["model"])
    samples = print_samples(local_copy(model_dir), SAMPLE_PROMPTS, config.sample_tokens, config.seed)

    # The stages keep their replies in their manifests; the quickstart prints all models' side by side at the end.
    sft_values = {"run": config.run, "seed": config.seed, "show_replies": False}
    if config.sft_steps:
        sft_values["train.length.steps"] = config.sft_steps
    sft_manifest = sft.run(build_config(sft.Config, SFT_RECIPE, values=sft_values))
    sft_done = time.time()
    sft_dir = RunDir(config.run).uri_of("sft", sft_manifest["outputs"]["model"])
    models = {"base": local_copy(model_dir), "sft": local_copy(sft_dir)}
    ppo_figures: dict = {}
    ppo_dir = None
    if config.ppo_steps != 0:
        ppo_values = {"run": config.run, "seed": config.seed, "show_replies": False}
        if config.ppo_steps:
            ppo_values["train.length.steps"] = config.ppo_steps
        ppo_manifest = ppo.run(build_config(ppo.Config, PPO_RECIPE, values=ppo_values))
        ppo_dir = RunDir(config.run).uri_of("ppo", ppo_manifest["outputs"]["model"])
        models["ppo"] = local_copy(ppo_dir)
        ppo_figures = {f"ppo_{k}": ppo_manifest["figures"].get(k) for k in
                       ("start_val_rule_score", "val_rule_score", "val_kl")}
    ppo_done = time.time()
    print("quickstart: replies to questions about modules the SFT model never saw in training")
    replies = compare_replies(models, held_out_questions(config.questions), config.sample_tokens, config.seed)
    figures = pretrain_manifest["figures"]
    manifest = new_manifest(
        "quickstart", config, started,
        inputs={"corpus": "builtin"},
        outputs={"data_manifest": "data/manifest.json", "pretrain_manifest": "pretrain/manifest.json",
                 "sft_manifest": "sft/manifest.json", "model": str(model_dir), "sft_model": str(sft_dir),
                 "ppo_model": str(ppo_dir) if ppo_dir else None,
                 "samples": samples, "replies": replies},
        figures={"val_bits_per_byte": figures.get("val_bits_per_byte"),
                 "unigram_bits_per_byte": figures.get("unigram_bits_per_byte"),
                 "documents_kept": data_manifest["counts"].get("kept"),
                 "sft_start_val_loss": sft_manifest["figures"].get("start_val_loss"),
                 "sft_val_loss": sft_manifest["figures"].get("val_loss"), **ppo_figures},
        timings={"data_s": round(data_done - started, 1), "pretrain_s": round(pretrain_done - data_done, 1),
                 "sft_s": round(sft_done - pretrain_done, 1), "ppo_s": round(ppo_done - sft_done, 1)},
    )
    RunDir(config.run).write_manifest("quickstart", manifest)
    wall = manifest["timings"]["wall_s"]
    bpb, unigram = figures.get("val_bits_per_byte"), figures.get("unigram_bits_per_byte")
    measured = (f"validation {bpb:.3f} bits/byte against the corpus's unigram entropy {unigram:.3f} bits/byte"
                if bpb is not None and unigram is not None else "no validation pass ran (too few steps)")
    print(f"quickstart: done in {wall / 60:.1f} min — {measured}")
    served = " ".join(f"--model {name}={path}" for name, path in
                      (("base", model_dir), ("sft", sft_dir), ("ppo", ppo_dir)) if path)
    print(f"quickstart: chat with it:  groundup serve {served}")
    return manifest


if __name__ == "__main__":
    stage_main("quickstart")
