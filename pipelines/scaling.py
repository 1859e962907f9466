"""``groundup scaling``: IsoFLOP sweeps as Ray Tune trials, fitted scaling laws, and checks of them.

For each compute budget C, K sizes of one model family (a single dial: width and depth grow together, so
any size maps to a valid config) are trained on D = C/(6N) tokens each, N being the family member's
FLOPs per token over 6 (its matmul parameters plus attention), so that C = 6·N·D holds exactly. Every run
is a trial of the same Tune trial function ``groundup tune`` uses. Then (``pipelines.tuning.laws``): a
parabola of final validation loss in ln N per budget gives N*(C), D*(C), L*(C); power laws N* ∝ C^a and
D* ∝ C^b with bootstrap intervals; optionally Chinchilla's approach 3 (L = E + A/N^α + B/D^β, Huber loss);
optionally a held-out larger budget run at the predicted size, predicted loss against measured.

Outputs in ``<run>/scaling/``: ``points.csv``, ``isoflop.png`` and ``manifest.json`` (the laws, which
``groundup scaling predict`` and ``groundup pretrain --model auto`` read).
"""
from __future__ import annotations

import csv
import io
import json
import math
import time
from typing import Any

from pydantic import Field

from pipelines import pretrain
from pipelines.cli import Flag, stage_main
from pipelines.config import ConfigError, StrictModel
from pipelines.rundir import RunDir, new_manifest

STAGE = "scaling"
TUNER_NAME = "tuner"
POINTS_FILE = "points.csv"
PLOT_FILE = "isoflop.png"


class FamilyConfig(StrictModel):
    """One dial ``size``: dim = width_step·size, n_layers = max(1, round(layers_per_size·size)),
    heads of head_dim (grouped two queries per key/value head when even)."""

    width_step: int = Field(32, ge=8, description="model width added per size step")
    layers_per_size: float = Field(0.5, gt=0, description="layers per size step")
    head_dim: int = Field(16, ge=2, description="attention head width (even)")
    min_size: int = Field(1, ge=1)
    max_size: int = Field(16, ge=1)
    lr: float = Field(3e-3, gt=0, description="peak learning rate at width lr_reference_width")
    lr_reference_width: int = Field(128, ge=1)
    lr_width_exponent: float = Field(0.5, ge=0, description="lr ∝ (reference width / width)^exponent")

    def overrides(self, size: int) -> dict[str, Any]:
        dim = self.width_step * size
        heads = max(1, dim // self.head_dim)
        return {"dim": dim, "n_layers": max(1, round(self.layers_per_size * size)), "n_heads": heads,
                "n_kv_heads": heads // 2 if heads % 2 == 0 else heads}

    def lr_for(self, size: int) -> float:
        return self.lr * (self.lr_reference_width / (self.width_step * size)) ** self.lr_width_exponent


def _floats(text: str) -> list[float]:
    return [float(item) for item in str(text).split(",") if item.strip()]


class Config(pretrain.Config):
    """The pretraining config every run starts from (data, sequence length, precision, workers), plus the sweep."""

    budgets: list[float] = Field(default_factory=list, description="compute budgets C in FLOPs, e.g. [1e12, 3e12]")
    sizes: int = Field(4, ge=3, description="model sizes per budget (a parabola needs 3)")
    family: FamilyConfig = FamilyConfig()
    tokens_per_parameter: float = Field(20.0, gt=0, description="the sizes centre on D/N = this (Chinchilla: 20)")
    spread: float = Field(4.0, gt=1, description="sizes span centre/spread .. centre·spread in N")
    min_steps: int = Field(16, ge=1, description="a run's batch shrinks (to one micro-batch) until it gets this many steps")
    evaluations: int = Field(2, ge=1, description="validation evaluations per run (the last one is the point)")
    holdout: float | None = Field(None, gt=1, description="after the fit, run this multiple of the largest budget "
                                  "at the predicted size and compare predicted with measured loss")
    bootstrap: int = Field(200, ge=0, description="bootstrap samples for the exponents' intervals")
    approach3: bool = Field(True, description="also fit L(N, D) = E + A/N^α + B/D^β (Huber loss)")
    max_concurrent_trials: int | None = Field(None, ge=1)
    trial_cpus: float = Field(0.5, gt=0)


CLI_FLAGS = (
    Flag(("--run",), "run", "run directory holding data/ (outputs go to <run>/scaling/)"),
    Flag(("--budgets",), "budgets", "comma-separated compute budgets in FLOPs, e.g. 1e12,3e12,1e13", {"type": _floats}),
    Flag(("--sizes",), "sizes", "model sizes per budget", {"type": int}),
    Flag(("--holdout",), "holdout", "also run this multiple of the largest budget and check the prediction",
         {"type": float}),
    Flag(("--model",), "model", "preset the family keeps its vocabulary and context from"),
    Flag(("--workers",), "train.num_workers", "Ray Train workers per run", {"type": int}),
    Flag(("--max-concurrent",), "max_concurrent_trials", "runs at once (default: what the cluster holds)",
         {"type": int}),
    Flag(("--seed",), "seed", "seed of every run", {"type": int}),
)


# ---- the family and its points --------------------------------------------------------------------
def family_members(config: Config, vocab_size: int, seq: int) -> list[dict[str, Any]]:
    """Every size of the family with its N (FLOPs per token / 6) and parameter count."""
    from model.config import preset

    members = []
    for size in range(config.family.min_size, config.family.max_size + 1):
        overrides = config.family.overrides(size)
        try:
            model = preset(config.model, **{"vocab_size": vocab_size, "max_seq_len": seq, **config.model_overrides,
                                            **overrides})
        except (ValueError, TypeError) as err:
            raise ConfigError(f"config field 'family': size {size} is not a valid model ({str(err).splitlines()[0]})")
        members.append({"size": size, "overrides": overrides, "n": model.flops_per_token(seq) / 6.0,
                        "parameters": model.num_parameters, "lr": config.family.lr_for(size)})
    return members


def nearest_member(members: list[dict[str, Any]], n: float) -> dict[str, Any]:
    return min(members, key=lambda m: abs(math.log(m["n"]) - math.log(n)))


def choose_sizes(members: list[dict[str, Any]], budget: float, count: int, tokens_per_parameter: float,
                 spread: float) -> list[dict[str, Any]]:
    """``count`` distinct members spread evenly in ln N around the size with D/N = tokens_per_parameter."""
    centre = math.sqrt(budget / (6.0 * tokens_per_parameter))
    targets = [centre * spread ** (2 * i / (count - 1) - 1) for i in range(count)]
    chosen: list[dict[str, Any]] = []
    for target in targets:
        for member in sorted(members, key=lambda m: abs(math.log(m["n"] / target))):
            if member not in chosen:
                chosen.append(member)
                break
    return sorted(chosen, key=lambda m: m["n"])


def batch_for(config: Config, tokens: float, seq: int) -> tuple[int, int, str]:
    """(global batch tokens, micro-batch size, why): the config's batch, shrunk to a power-of-two number
    of sequences (at least one micro-batch of one sequence) until the run gets ``min_steps`` steps."""
    wanted = config.train.batch.global_batch_tokens
    sequences = max(1, round(wanted / seq))
    limit = max(1, int(tokens / config.min_steps / seq))
    why = f"{wanted} tokens per step (train.batch.global_batch_tokens)"
    if sequences > limit:
        sequences = 2 ** int(math.log2(limit)) if limit >= 1 else 1
        why = f"{sequences * seq} tokens per step, so that {tokens:,.0f} tokens make at least {config.min_steps} steps"
    micro = min(config.train.batch.micro_batch_size, max(1, sequences // config.train.num_workers))
    return sequences * seq, micro, why


def plan_points(config: Config, data: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    seq = config.sequence_length or int(data["sequence_length"])
    members = family_members(config, int(data["vocab_size"]), seq)
    points = []
    for budget in sorted(config.budgets):
        for member in choose_sizes(members, budget, config.sizes, config.tokens_per_parameter, config.spread):
            points.append(make_point(config, member, budget, seq))
    return points, members


def make_point(config: Config, member: dict[str, Any], budget: float, seq: int) -> dict[str, Any]:
    tokens = budget / (6.0 * member["n"])
    batch, micro, _ = batch_for(config, tokens, seq)
    if tokens < batch:
        raise ConfigError(f"config field 'budgets': {budget:.3g} FLOPs is less than one step of size {member['size']} "
                          f"({batch} tokens x {6 * member['n']:.3g} FLOPs/token)")
    return {"budget": budget, "size": member["size"], "n": member["n"], "parameters": member["parameters"],
            "tokens": tokens, "sequence_length": seq, "params": {"model_overrides": {**config.model_overrides, **member["overrides"]},
                                         "train.length": {"flops": budget}, "train.optimizer.lr": member["lr"],
                                         "train.batch.global_batch_tokens": batch,
                                         "train.batch.micro_batch_size": micro}}


# ---- running points as Tune trials ------------------------------------------------------------------
def run_points(config: Config, points: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """Each point one Tune trial (no early stopping: every size's final loss is needed). Returns the points
    with their measured final validation loss, steps, tokens and epochs."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from pipelines import tune as tune_stage
    from pipelines.ray_env import ensure_ray
    from pipelines.train.trainer import decide_use_gpu, prepare_storage

    ensure_ray(config.num_cpus)
    use_gpu, _ = decide_use_gpu(config.train.use_gpu, config.num_cpus)
    base = {key: value for key, value in config.model_dump(mode="json").items() if key in pretrain.Config.model_fields
            and key != "resume"}
    probe = tune_stage.Config.model_validate({**base, "max_concurrent_trials": config.max_concurrent_trials,
                                              "trial_cpus": config.trial_cpus})
    max_concurrent, why = tune_stage.concurrency(probe, use_gpu)
    print(f"scaling: {len(points)} runs, up to {max_concurrent} at once ({why})", flush=True)
    run = RunDir(config.run)
    prepare_storage(run.uri_of(STAGE), name, resume=False)
    trainable = tune.with_resources(
        tune.with_parameters(tune_stage.run_trial, base=base, run_uri=config.run, evaluations=config.evaluations,
                             stage=STAGE),
        {"cpu": config.trial_cpus})
    tuner = tune.Tuner(
        trainable, param_space={"point": tune.grid_search([p["params"] for p in points])},
        tune_config=tune.TuneConfig(metric=tune_stage.METRIC, mode="min",
                                    search_alg=BasicVariantGenerator(max_concurrent=max_concurrent)),
        run_config=tune.RunConfig(name=name, storage_path=run.uri_of(STAGE), verbose=0,
                                  callbacks=[tune_stage._progress_callback(prefix=STAGE)]))
    rows = tune_stage.collect(tuner.fit())
    measured = []
    for point in points:
        row = next((r for r in rows if r["params"].get("point") == point["params"]), None)
        ok = row is not None and row["status"] == "finished" and row["final_val_loss"] is not None
        measured.append({**point, "loss": row["final_val_loss"] if ok else None,
                         "steps": row["steps"] if row else None, "epochs": row["epochs"] if row else None,
                         "trial": row["trial"] if row else None, "status": row["status"] if row else "missing"})
    return measured


# ---- fitting -------------------------------------------------------------------------------------
def fit(points: list[dict[str, Any]], config: Config, predict_at: list[float]) -> dict[str, Any]:
    from pipelines.tuning import laws

    good = [p for p in points if p["loss"] is not None]
    by_budget: dict[float, tuple[list[float], list[float]]] = {}
    for p in good:
        by_budget.setdefault(p["budget"], ([], []))
        by_budget[p["budget"]][0].append(p["n"])
        by_budget[p["budget"]][1].append(p["loss"])
    isoflops = []
    for budget, (n, loss) in sorted(by_budget.items()):
        try:
            isoflops.append(laws.fit_isoflop(budget, n, loss))
        except ValueError as err:
            print(f"scaling: warning: {err}", flush=True)
    result: dict[str, Any] = {"isoflops": [f.to_dict() for f in isoflops]}
    if len(isoflops) >= 2:
        try:
            fitted = laws.fit_laws(isoflops)
        except OverflowError as err:
            print(f"scaling: warning: no power law through these minima ({err})", flush=True)
            return result
        result["laws"] = fitted.to_dict()
        if config.bootstrap:
            result["bootstrap"] = laws.bootstrap({b: v for b, v in by_budget.items()
                                                  if b in {f.budget for f in isoflops}},
                                                 samples=config.bootstrap, seed=config.seed, predict_at=predict_at)
    if config.approach3 and len(good) >= 5:
        parametric = laws.fit_parametric([p["n"] for p in good], [p["tokens"] for p in good], [p["loss"] for p in good])
        result["approach3"] = parametric.to_dict()
    return result


def predict(fitted: dict[str, Any], members: list[dict[str, Any]], flops: float) -> dict[str, Any]:
    """The family member nearest the fitted N*(C), its tokens, and the validation loss the fits predict
    for that member at that budget (approach 3 when fitted, else the L*(C) power law)."""
    from pipelines.tuning.laws import Laws, Parametric

    if "laws" not in fitted:
        raise ConfigError("the scaling run has no fitted laws (it needs IsoFLOP minima at 2 budgets or more)")
    law = Laws(**fitted["laws"])
    member = nearest_member(members, law.n_star(flops))
    tokens = flops / (6.0 * member["n"])
    out = {"flops": flops, "n_star": law.n_star(flops), "d_star": law.d_star(flops), "size": member["size"],
           "model_overrides": member["overrides"], "n": member["n"], "parameters": member["parameters"],
           "tokens": tokens, "lr": member["lr"], "loss_law": law.loss(flops),
           "inside_family": members[0]["n"] <= law.n_star(flops) <= members[-1]["n"]}
    if "approach3" in fitted:
        p3 = fitted["approach3"]
        parametric = Parametric(**{k: p3[k] for k in ("E", "A", "B", "alpha", "beta", "huber_loss")})
        out["loss_approach3"] = parametric.loss(member["n"], tokens)
        out["n_star_approach3"] = parametric.n_star(flops)
    out["loss"] = out.get("loss_approach3", out["loss_law"])
    return out


# ---- outputs -------------------------------------------------------------------------------------
def points_csv(points: list[dict[str, Any]]) -> str:
    columns = ["budget", "size", "n", "parameters", "tokens", "steps", "epochs", "loss", "status", "trial", "holdout"]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for p in points:
        writer.writerow(["" if p.get(c) is None else p.get(c) for c in columns])
    return out.getvalue()


def plot(points: list[dict[str, Any]], fitted: dict[str, Any], holdout: dict[str, Any] | None, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax_iso, ax_law) = plt.subplots(1, 2, figsize=(12, 5))
    budgets = sorted({p["budget"] for p in points if not p.get("holdout")})
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(budgets))))
    for color, budget in zip(colors, budgets):
        pts = sorted((p["n"], p["loss"]) for p in points if p["budget"] == budget and p["loss"] is not None)
        if not pts:
            continue
        n, loss = zip(*pts)
        ax_iso.plot(n, loss, "o", color=color, label=f"C = {budget:.2g}")
        iso = next((f for f in fitted.get("isoflops", []) if f["budget"] == budget), None)
        if iso is not None and len(n) >= 3:
            coeffs = np.polyfit(np.log(n), loss, 2)
            xs = np.geomspace(min(n) / 1.3, max(n) * 1.3, 60)
            ax_iso.plot(xs, np.polyval(coeffs, np.log(xs)), "-", color=color, lw=1)
            ax_iso.plot([iso["n_star"]], [iso["loss_star"]], "*", color=color, ms=14, mec="black")
    if holdout is not None and holdout.get("measured") is not None:
        ax_iso.plot([holdout["n"]], [holdout["measured"]], "s", color="tab:red", label=f"held out C = {holdout['flops']:.2g}")
        ax_iso.plot([holdout["n"]], [holdout["predicted"]], "x", color="tab:red", ms=10, label="predicted")
    ax_iso.set_xscale("log")
    ax_iso.set_xlabel("N (FLOPs per token / 6)")
    ax_iso.set_ylabel("final validation loss (nats/token)")
    ax_iso.set_title("IsoFLOP profiles (★ fitted minima)")
    ax_iso.grid(alpha=0.3)
    ax_iso.legend(fontsize=8)
    isos = fitted.get("isoflops", [])
    if isos:
        c = np.array([f["budget"] for f in isos])
        ax_law.plot(c, [f["n_star"] for f in isos], "o", color="tab:blue", label="N*")
        ax_law.plot(c, [f["d_star"] for f in isos], "o", color="tab:orange", label="D*")
        if "laws" in fitted:
            law = fitted["laws"]
            xs = np.geomspace(c.min() / 2, c.max() * 8, 50)
            ax_law.plot(xs, law["k_n"] * xs ** law["a"], "-", color="tab:blue", label=f"N* ∝ C^{law['a']:.2f}")
            ax_law.plot(xs, law["k_d"] * xs ** law["b"], "-", color="tab:orange", label=f"D* ∝ C^{law['b']:.2f}")
    ax_law.set_xscale("log")
    ax_law.set_yscale("log")
    ax_law.set_xlabel("compute C (FLOPs)")
    ax_law.set_title("compute-optimal size and tokens")
    ax_law.grid(alpha=0.3, which="both")
    ax_law.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def read_data(config: Config) -> dict[str, Any]:
    run = RunDir(config.run)
    data = run.read_manifest("data").get("outputs", {})
    if "vocab_size" not in data or "sequence_length" not in data:
        raise ConfigError(f"run {run.uri}: data/manifest.json lacks vocab_size/sequence_length (re-run `groundup data`)")
    return data


def run(config: Config) -> dict[str, Any]:
    started = time.time()
    if len(config.budgets) < 2:
        raise ConfigError("config field 'budgets': give at least 2 compute budgets (--budgets 1e12,3e12)")
    if config.family.max_size < config.family.min_size + config.sizes - 1:
        raise ConfigError(f"config field 'family.max_size': the family needs at least {config.sizes} sizes")
    data = read_data(config)
    points, members = plan_points(config, data)
    for budget in sorted(config.budgets):
        shown = ", ".join(f"{p['parameters'] / 1e6:.2f}M ({p['tokens']:,.0f} tokens)" for p in points
                          if p["budget"] == budget)
        print(f"scaling: C = {budget:.3g} FLOPs: {shown}", flush=True)
    corpus = int(data.get("splits", {}).get("train", {}).get("tokens", 0) or 0)
    if corpus and (over := [p for p in points if p["tokens"] > corpus]):
        print(f"scaling: warning: {len(over)} runs train on more tokens than the corpus holds ({corpus:,}); up to "
              f"{max(p['tokens'] for p in over) / corpus:.1f} epochs: repeated data bends the curves", flush=True)
    mark = time.perf_counter()
    measured = run_points(config, points, TUNER_NAME)
    sweep_seconds = time.perf_counter() - mark
    holdout_flops = max(config.budgets) * config.holdout if config.holdout else None
    fitted = fit(measured, config, [holdout_flops] if holdout_flops else [])
    holdout = None
    if holdout_flops and "laws" in fitted:
        holdout = check_holdout(config, fitted, members, holdout_flops, data)
        measured.append(holdout.pop("point"))
    return finish(config, measured, fitted, holdout, members, started, sweep_seconds)


def check_holdout(config: Config, fitted: dict[str, Any], members, flops: float, data) -> dict[str, Any]:
    guess = predict(fitted, members, flops)
    seq = config.sequence_length or int(data["sequence_length"])
    member = next(m for m in members if m["size"] == guess["size"])
    print(f"scaling: held-out C = {flops:.3g}: predicted size {member['parameters'] / 1e6:.2f}M (N {member['n']:.3g}), "
          f"{guess['tokens']:,.0f} tokens, validation loss {guess['loss']:.4f}; running it", flush=True)
    point = make_point(config, member, flops, seq)
    (result,) = run_points(config, [point], "holdout")
    result["holdout"] = True
    measured = result["loss"]
    error = None if measured is None else (guess["loss"] - measured) / measured
    spread = fitted.get("bootstrap", {}).get("predictions", {}).get(f"{flops:.6g}", {}).get("loss")
    return {"flops": flops, "size": member["size"], "n": member["n"], "predicted": guess["loss"],
            "predicted_law": guess["loss_law"], "predicted_approach3": guess.get("loss_approach3"),
            "predicted_interval_law": spread, "measured": measured, "relative_error": error, "point": result}


def finish(config: Config, points, fitted, holdout, members, started: float, sweep_seconds: float) -> dict[str, Any]:
    run_dir = RunDir(config.run)
    run_dir.write_text(f"{STAGE}/{POINTS_FILE}", points_csv(points))
    run_dir.write_bytes(f"{STAGE}/{PLOT_FILE}", plot(points, fitted, holdout, f"scaling — {config.run}"))
    figures: dict[str, Any] = {**fitted}
    if "laws" in fitted:
        figures["a"], figures["b"] = fitted["laws"]["a"], fitted["laws"]["b"]
        figures["a_interval"] = fitted.get("bootstrap", {}).get("a")
        figures["b_interval"] = fitted.get("bootstrap", {}).get("b")
    if "approach3" in fitted and "laws" in fitted:
        figures["approaches_disagree"] = describe_disagreement(fitted)
    if holdout is not None:
        figures["holdout"] = holdout
    manifest = new_manifest(
        STAGE, config, started,
        inputs={"data_manifest": run_dir.uri_of("data", "manifest.json")},
        outputs={"points_csv": POINTS_FILE, "isoflop_png": PLOT_FILE, "tuner": TUNER_NAME,
                 "family": config.family.model_dump(), "base_model": config.model,
                 "sequence_length": points[0].get("sequence_length") if points else None,
                 "members": [{k: m[k] for k in ("size", "n", "parameters", "overrides", "lr")} for m in members]},
        counts={"runs": len(points), "failed": sum(p["loss"] is None for p in points),
                "budgets": len(config.budgets)},
        figures=figures, timings={"sweep_s": round(sweep_seconds, 3)},
    )
    run_dir.write_manifest(STAGE, manifest)
    for iso in fitted.get("isoflops", []):
        edge = " (at the edge of the sizes tried: extrapolated)" if iso["at_edge"] else ""
        print(f"scaling: C = {iso['budget']:.3g}: N* {iso['n_star']:.3g}, D* {iso['d_star']:.3g} tokens, "
              f"L* {iso['loss_star']:.4f}{edge}", flush=True)
    if "laws" in fitted:
        law, boot = fitted["laws"], fitted.get("bootstrap", {})
        interval = (lambda key: f" [{boot[key][0]:.2f}, {boot[key][1]:.2f}]" if boot.get(key) else "")
        print(f"scaling: N* ∝ C^{law['a']:.3f}{interval('a')}, D* ∝ C^{law['b']:.3f}{interval('b')} "
              f"(95% bootstrap; few points: read exponents loosely)", flush=True)
    if "approach3" in fitted:
        p3 = fitted["approach3"]
        print(f"scaling: approach 3: L = {p3['E']:.3f} + {p3['A']:.3g}/N^{p3['alpha']:.3f} + {p3['B']:.3g}/D^{p3['beta']:.3f}"
              f" -> N* ∝ C^{p3['a']:.3f}, D* ∝ C^{p3['b']:.3f}", flush=True)
        if figures.get("approaches_disagree"):
            print(f"scaling: {figures['approaches_disagree']}", flush=True)
    if holdout is not None and holdout["measured"] is not None:
        print(f"scaling: held-out C = {holdout['flops']:.3g}: predicted {holdout['predicted']:.4f}, measured "
              f"{holdout['measured']:.4f} ({100 * holdout['relative_error']:+.1f}%)", flush=True)
    print(f"scaling: done — {run_dir.uri_of(STAGE, PLOT_FILE)}; `groundup scaling predict --run {config.run} "
          "--flops C` sizes a model", flush=True)
    return manifest


def describe_disagreement(fitted: dict[str, Any]) -> str:
    """Where approach 2's power laws and approach 3 differ by more than 0.05 in an exponent."""
    law, p3 = fitted["laws"], fitted["approach3"]
    parts = [f"{name}: approach 2 {law[name]:.3f} vs approach 3 {p3[name]:.3f}" for name in ("a", "b")
             if abs(law[name] - p3[name]) > 0.05]
    return ("the approaches disagree on " + "; ".join(parts)) if parts else ""


def load_fit(run_uri: str) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(figures, members, manifest) of a finished scaling run."""
    manifest = RunDir(run_uri).read_manifest(STAGE)
    return manifest["figures"], manifest["outputs"]["members"], manifest


if __name__ == "__main__":
    stage_main(STAGE)


# ---- budget-aware choices for `scaling predict` and `pretrain --model auto` -------------------------
def _sweep_config(manifest: dict[str, Any]) -> Config:
    return Config.model_validate(manifest["config"])


def recommend_batch(manifest: dict[str, Any], tokens: float) -> dict[str, Any]:
    """The sweep's batch rule at ``tokens``: its batch, shrunk until the run gets ``min_steps`` steps."""
    sweep = _sweep_config(manifest)
    seq = int(manifest["outputs"].get("sequence_length") or sweep.sequence_length or 0) or None
    if seq is None:
        raise ConfigError("the scaling manifest lacks the sequence length")
    batch, micro, why = batch_for(sweep, tokens, seq)
    return {"global_batch_tokens": batch, "micro_batch_size": micro, "batch_why": why}


def auto_model(config):
    """``groundup pretrain --flops C --model auto``: the model the run's fitted laws give C (the family
    member nearest N*(C)); the learning rate and batch from the family's rule and the sweep's batch rule
    unless the config sets them. Prints each choice and why."""
    flops = config.train.length.flops
    if flops is None or config.train.length.steps is not None:
        raise ConfigError("config field 'model': auto sizes the model from a compute budget: give --flops C")
    figures, members, manifest = load_fit(config.run)
    out = predict(figures, members, flops)
    law = figures["laws"]
    print(f"pretrain: model auto: N*(C) = {law['k_n']:.3g}·C^{law['a']:.3f} = {out['n_star']:.3g} at C = {flops:.3g} "
          f"(scaling run {RunDir(config.run).uri_of(STAGE)}) -> family size {out['size']} "
          f"({out['parameters'] / 1e6:.2f}M parameters, {json.dumps(out['model_overrides'])}); predicted validation "
          f"loss {out['loss']:.4f}", flush=True)
    train = config.train.model_dump()
    if "lr" not in config.train.optimizer.model_fields_set:
        train["optimizer"]["lr"] = out["lr"]
        print(f"pretrain: lr {out['lr']:.2e}: the family's rule at width {out['model_overrides']['dim']}", flush=True)
    if "global_batch_tokens" not in config.train.batch.model_fields_set:
        batch = recommend_batch(manifest, out["tokens"])
        train["batch"]["global_batch_tokens"] = batch["global_batch_tokens"]
        train["batch"]["micro_batch_size"] = min(train["batch"]["micro_batch_size"], batch["micro_batch_size"])
        print(f"pretrain: batch {batch['batch_why']} (the sweep's rule)", flush=True)
    return config.model_copy(update={"model": manifest["outputs"]["base_model"],
                                     "model_overrides": {**config.model_overrides, **out["model_overrides"]},
                                     "train": type(config.train).model_validate(train)})


DEFAULT_MIN_STEPS = 200  # without a fit: budgets get at least this many optimizer steps when the batch is not given


def budget_defaults(config):
    """Batch and learning rate chosen from the budget when the user gives one (flops, tokens or tokens per
    parameter) but neither a batch size nor a learning rate: the run's scaling fit's batch rule when the
    run has one, else the largest power-of-two batch (at most the default 16k tokens) that still gives
    ``DEFAULT_MIN_STEPS`` steps, with lr 2e-3 once the batch is 4k tokens or less. On a 1 MB corpus a
    16k-token batch gives the 1m preset 50 steps; 2k tokens at 2e-3 learns more in less time.
    Prints the choice and why. Anything the user set is kept."""
    train = config.train
    length = train.length
    given = "length" in train.model_fields_set and length.steps is None
    if not given or "global_batch_tokens" in train.batch.model_fields_set or "lr" in train.optimizer.model_fields_set:
        return config
    from model.config import PRESETS, preset

    data = read_data(config) if RunDir(config.run).exists("data", "manifest.json") else None
    if data is None or config.model not in PRESETS:
        return config  # prepare() reports what is wrong
    seq = config.sequence_length or int(data["sequence_length"])
    try:
        model = preset(config.model, **{"vocab_size": int(data["vocab_size"]), "max_seq_len": seq,
                                        **config.model_overrides})
    except (ValueError, TypeError):
        return config
    fpt = model.flops_per_token(seq)
    tokens = (length.tokens if length.tokens is not None else
              length.flops / fpt if length.flops is not None else length.tokens_per_parameter * model.num_parameters)
    default = train.batch.global_batch_tokens
    if RunDir(config.run).exists(STAGE, "manifest.json"):
        batch = recommend_batch(RunDir(config.run).read_manifest(STAGE), tokens)
        chosen, why = batch["global_batch_tokens"], f"{batch['batch_why']} (the scaling run's rule)"
    else:
        sequences = max(1, int(tokens / DEFAULT_MIN_STEPS / seq))
        sequences = min(2 ** int(math.log2(sequences)), max(1, default // seq))
        chosen = sequences * seq
        why = (f"{tokens:,.0f} tokens in {math.ceil(tokens / chosen)} steps of {chosen} (a {default}-token batch "
               f"would make {math.ceil(tokens / default)}; small budgets learn more from more, smaller steps)")
    if chosen >= default:
        return config
    lr = 2e-3 if chosen <= 4096 else train.optimizer.lr
    print(f"pretrain: batch {chosen} tokens and lr {lr:.1e} (neither given, a budget given): {why}", flush=True)
    dumped = train.model_dump()
    dumped["batch"]["global_batch_tokens"] = chosen
    dumped["batch"]["micro_batch_size"] = min(dumped["batch"]["micro_batch_size"],
                                              max(1, chosen // seq // train.num_workers))
    dumped["optimizer"]["lr"] = lr
    return config.model_copy(update={"train": type(train).model_validate(dumped)})


def resolve_budget(config, warn: bool = False):
    """pretrain's hook: ``--model auto`` sized by the fitted laws, then budget-aware batch and lr; with
    ``warn``, a warning when the run's tokens exceed the corpus (epochs bend the loss curve)."""
    if config.model == "auto":
        config = auto_model(config)
    config = budget_defaults(config)
    if warn:
        warn_epochs(config)
    return config


def warn_epochs(config) -> None:
    from model.config import PRESETS, preset

    run = RunDir(config.run)
    if not run.exists("data", "manifest.json") or config.model not in PRESETS:
        return
    data = read_data(config)
    corpus = int(data.get("splits", {}).get("train", {}).get("tokens", 0) or 0)
    seq = config.sequence_length or int(data["sequence_length"])
    length = config.train.length
    try:
        model = preset(config.model, **{"vocab_size": int(data["vocab_size"]), "max_seq_len": seq,
                                        **config.model_overrides})
    except (ValueError, TypeError):
        return
    tokens = (length.steps * config.train.batch.global_batch_tokens if length.steps is not None else
              length.tokens if length.tokens is not None else
              length.flops / model.flops_per_token(seq) if length.flops is not None else
              length.tokens_per_parameter * model.num_parameters)
    if corpus and tokens > corpus:
        print(f"pretrain: warning: {tokens:,.0f} training tokens exceed the corpus's {corpus:,} "
              f"({tokens / corpus:.1f} epochs): repeated data bends the loss curve (and a scaling fit)", flush=True)
