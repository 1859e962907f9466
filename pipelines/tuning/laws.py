"""Scaling-law fits (numpy/scipy only, no Ray).

Approach 2 of Chinchilla (IsoFLOP profiles): for each compute budget C, the final loss of K model sizes
trained on D = C/(6N) tokens is fitted by a parabola in log N; its minimum gives N*(C), D*(C) = C/(6N*)
and L*(C). Power laws N* = k_N·C^a, D* = k_D·C^b and L* = k_L·C^c are then straight lines in log-log.
Intervals come from a residual bootstrap of the parabolas.

Approach 3: L(N, D) = E + A/N^α + B/D^β fitted to every run at once with a Huber loss on log L (δ = 1e-3)
by L-BFGS from a grid of starts (Hoffmann et al.; Besiroglu et al.'s replication). Its compute-optimal
split is N* ∝ C^(β/(α+β)), D* ∝ C^(α/(α+β)).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class IsoFlop:
    budget: float
    n_star: float
    d_star: float
    loss_star: float
    curvature: float  # > 0: a minimum; the parabola's a in L = a·x² + b·x + c with x = ln N
    at_edge: bool  # the minimum lies outside the sizes tried (extrapolated: trust it less)
    n_range: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_isoflop(budget: float, n: Sequence[float], loss: Sequence[float]) -> IsoFlop:
    x = np.log(np.asarray(n, dtype=float))
    y = np.asarray(loss, dtype=float)
    if len(np.unique(x)) < 3:
        raise ValueError(f"budget {budget:.3g}: an IsoFLOP parabola needs 3 model sizes, got {len(np.unique(x))}")
    a, b, c = np.polyfit(x, y, 2)
    lo, hi = float(x.min()), float(x.max())
    if a <= 0:  # no minimum: the best size tried stands in, flagged
        x_star = float(x[np.argmin(y)])
        at_edge = True
    else:
        x_star = -b / (2 * a)
        at_edge = not lo <= x_star <= hi
    loss_star = float(a * x_star ** 2 + b * x_star + c) if a > 0 else float(y.min())
    n_star = math.exp(x_star)
    return IsoFlop(budget=float(budget), n_star=n_star, d_star=budget / (6.0 * n_star), loss_star=loss_star,
                   curvature=float(a), at_edge=bool(at_edge), n_range=(math.exp(lo), math.exp(hi)))


def power_law(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(exponent, coefficient) of y = coefficient·x^exponent, least squares in log-log."""
    exponent, intercept = np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)
    if not -700 < intercept < 700:
        raise OverflowError(f"power law with coefficient e^{intercept:.3g}")
    return float(exponent), float(math.exp(intercept))


@dataclass(frozen=True)
class Laws:
    """N*(C), D*(C), L*(C) as power laws of compute."""

    a: float  # N* = k_n·C^a
    k_n: float
    b: float  # D* = k_d·C^b
    k_d: float
    c: float  # L* = k_l·C^c
    k_l: float

    def n_star(self, flops: float) -> float:
        return self.k_n * flops ** self.a

    def d_star(self, flops: float) -> float:
        return self.k_d * flops ** self.b

    def loss(self, flops: float) -> float:
        return self.k_l * flops ** self.c

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def fit_laws(fits: Sequence[IsoFlop]) -> Laws:
    if len(fits) < 2:
        raise ValueError("power laws need IsoFLOP minima at 2 budgets or more")
    budgets = [f.budget for f in fits]
    a, k_n = power_law(budgets, [f.n_star for f in fits])
    b, k_d = power_law(budgets, [f.d_star for f in fits])
    c, k_l = power_law(budgets, [f.loss_star for f in fits])
    return Laws(a, k_n, b, k_d, c, k_l)


def bootstrap(points: dict[float, tuple[Sequence[float], Sequence[float]]], samples: int = 200, seed: int = 0,
              predict_at: Sequence[float] = ()) -> dict[str, Any]:
    """Residual bootstrap of the IsoFLOP parabolas: each budget's residuals are resampled onto its fitted
    curve, the minima and power laws refitted. Returns 95 % intervals of a, b, c and of the predictions
    (N*, D*, L*) at ``predict_at``."""
    rng = np.random.default_rng(seed)
    base = {}
    for budget, (n, loss) in points.items():
        x = np.log(np.asarray(n, float))
        coeffs = np.polyfit(x, np.asarray(loss, float), 2)
        base[budget] = (n, np.polyval(coeffs, x), np.asarray(loss, float) - np.polyval(coeffs, x))
    draws: dict[str, list[float]] = {"a": [], "b": [], "c": []}
    predictions: dict[float, dict[str, list[float]]] = {f: {"n": [], "d": [], "loss": []} for f in predict_at}
    for _ in range(samples):
        try:
            fits = [fit_isoflop(budget, n, fitted + rng.choice(resid, size=len(resid), replace=True))
                    for budget, (n, fitted, resid) in base.items()]
            laws = fit_laws(fits)
        except (ValueError, OverflowError, np.linalg.LinAlgError):  # a degenerate resample: skip it
            continue
        if not all(math.isfinite(v) for v in (laws.a, laws.b, laws.c)):
            continue
        draws["a"].append(laws.a)
        draws["b"].append(laws.b)
        draws["c"].append(laws.c)
        for flops in predict_at:
            predictions[flops]["n"].append(laws.n_star(flops))
            predictions[flops]["d"].append(laws.d_star(flops))
            predictions[flops]["loss"].append(laws.loss(flops))

    def interval(values: list[float]) -> list[float] | None:
        return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values else None

    return {"samples": len(draws["a"]), **{k: interval(v) for k, v in draws.items()},
            "predictions": {f"{flops:.6g}": {k: interval(v) for k, v in by.items()}
                            for flops, by in predictions.items()}}


# ---- approach 3 ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Parametric:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    huber_loss: float

    def loss(self, n: float, d: float) -> float:
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    @property
    def a(self) -> float:  # N* exponent
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:  # D* exponent
        return self.alpha / (self.alpha + self.beta)

    def n_star(self, flops: float) -> float:
        """argmin over N of L(N, C/(6N))."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        return g * (flops / 6.0) ** self.a

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "a": self.a, "b": self.b}


BOUNDS = [(None, None), (None, None), (None, None), (0.0, 3.0), (0.0, 3.0)]  # a, b, e, α, β: losses fall with N, D


def fit_parametric(n: Sequence[float], d: Sequence[float], loss: Sequence[float], delta: float = 1e-3,
                   polish: int = 12) -> Parametric:
    """Huber loss on log L between the data and log(exp(a - α ln N) + exp(b - β ln D) + exp(e)), with
    A = e^a, B = e^b, E = e^e; L-BFGS-B from the best points of a grid of starts, the best end kept."""
    from scipy.optimize import minimize
    from scipy.special import huber, logsumexp

    log_n, log_d = np.log(np.asarray(n, float)), np.log(np.asarray(d, float))
    log_l = np.log(np.asarray(loss, float))

    def objective(p: np.ndarray) -> tuple[float, np.ndarray]:
        a, b, e, alpha, beta = p
        terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
        pred = logsumexp(terms, axis=0)
        weights = np.exp(terms - pred)  # d pred / d term
        resid = pred - log_l
        slope = np.clip(resid, -delta, delta)  # Huber's derivative
        grad = np.array([np.sum(slope * weights[0]), np.sum(slope * weights[1]), np.sum(slope * weights[2]),
                         -np.sum(slope * weights[0] * log_n), -np.sum(slope * weights[1] * log_d)])
        return float(np.sum(huber(delta, resid))), grad

    best = None
    grid = itertools.product((0.0, 5.0, 10.0, 15.0, 20.0), (0.0, 5.0, 10.0, 15.0, 20.0), (-1.0, 0.0, 1.0),
                             (0.1, 0.4, 0.8), (0.1, 0.4, 0.8))
    # Every grid point is scored; L-BFGS runs from the ``polish`` best (a full run from each of hundreds
    # of starts costs minutes on a small CPU and ends in the same basin).
    starts = sorted((objective(np.array(p))[0], p) for p in grid)[:polish]
    for _, start in starts:
        result = minimize(objective, np.array(start), jac=True, method="L-BFGS-B", bounds=BOUNDS)
        if best is None or result.fun < best.fun:
            best = result
    a, b, e, alpha, beta = best.x
    return Parametric(E=float(math.exp(e)), A=float(math.exp(a)), B=float(math.exp(b)), alpha=float(alpha),
                      beta=float(beta), huber_loss=float(best.fun))
