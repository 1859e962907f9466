"""``groundup scaling predict --run RUN --flops C``: what a scaling run's fitted laws recommend for a budget.

Reads ``<run>/scaling/manifest.json`` (the laws, the family) and prints the family member nearest N*(C),
its tokens D = C/(6N), steps at the recommended batch, and the predicted validation loss (with the
bootstrap interval of the L*(C) law when the budget was fitted or held out). Writes nothing.
"""
from __future__ import annotations

import json
import math
from typing import Any

from pydantic import Field

from pipelines.cli import Flag, stage_main
from pipelines.config import StageConfig

STAGE = "scaling predict"


class Config(StageConfig):
    flops: float | None = Field(None, gt=0, description="the compute budget C in FLOPs")


CLI_FLAGS = (
    Flag(("--run",), "run", "run directory holding scaling/"),
    Flag(("--flops",), "flops", "compute budget in FLOPs", {"type": float}),
)


def run(config: Config) -> dict[str, Any]:
    from pipelines.config import ConfigError
    from pipelines.scaling import load_fit, predict, recommend_batch

    if config.flops is None:
        raise ConfigError("config field 'flops': give --flops C (a compute budget in FLOPs)")
    figures, members, manifest = load_fit(config.run)
    out = predict(figures, members, config.flops)
    batch = recommend_batch(manifest, out["tokens"])
    out.update(batch)
    out["steps"] = max(1, math.ceil(out["tokens"] / batch["global_batch_tokens"]))
    where = "inside" if out["inside_family"] else "outside (clamped to the nearest member of)"
    print(f"scaling predict: C = {config.flops:.3g} FLOPs -> N* {out['n_star']:.3g} ({where} the family); use size "
          f"{out['size']} ({out['parameters'] / 1e6:.2f}M parameters, {json.dumps(out['model_overrides'])}), "
          f"{out['tokens']:,.0f} tokens = {out['steps']} steps of {batch['global_batch_tokens']} tokens, "
          f"lr {out['lr']:.2e}; predicted validation loss {out['loss']:.4f}", flush=True)
    return out


if __name__ == "__main__":
    stage_main(STAGE)
