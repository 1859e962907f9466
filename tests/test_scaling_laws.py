"""The scaling-law fits on synthetic losses from a known L(N, D) = E + A/N^α + B/D^β (no Ray): IsoFLOP
parabolas (Chinchilla's approach 2) and the parametric fit (approach 3) recover the known exponents."""
from __future__ import annotations

import math

import numpy as np
import pytest

# Chinchilla's published fit: N* ∝ C^(β/(α+β)) = C^0.4516, D* ∝ C^(α/(α+β)) = C^0.5484.
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
TRUE_A, TRUE_B = BETA / (ALPHA + BETA), ALPHA / (ALPHA + BETA)
BUDGETS = (1e18, 1e19, 1e20, 1e21)


def _loss(n, d):
    return E + A / n ** ALPHA + B / d ** BETA


def _n_opt(flops):
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    return g * (flops / 6) ** TRUE_A


def _sweep(noise: float = 0.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    points = {}
    for flops in BUDGETS:
        n = _n_opt(flops) * np.geomspace(1 / 3, 3, 7)
        loss = _loss(n, flops / (6 * n)) * (1 + noise * rng.standard_normal(len(n)))
        points[flops] = (n, loss)
    return points


def test_isoflop_parabolas_recover_the_exponents():
    from pipelines.tuning.laws import bootstrap, fit_isoflop, fit_laws

    points = _sweep()
    fits = [fit_isoflop(flops, n, loss) for flops, (n, loss) in points.items()]
    for fit in fits:
        assert not fit.at_edge and fit.curvature > 0
        assert fit.n_star == pytest.approx(_n_opt(fit.budget), rel=0.1)
    laws = fit_laws(fits)
    assert laws.a == pytest.approx(TRUE_A, abs=0.02) and laws.b == pytest.approx(TRUE_B, abs=0.02)
    assert laws.a + laws.b == pytest.approx(1.0, abs=1e-9)  # D* = C/(6N*)
    held_out = 4 * BUDGETS[-1]
    best = min(_loss(n, held_out / (6 * n)) for n in _n_opt(held_out) * np.geomspace(0.5, 2, 41))
    assert laws.loss(held_out) == pytest.approx(best, rel=0.05)  # a pure power law has no floor E

    noisy = _sweep(noise=0.002, seed=1)
    spread = bootstrap(noisy, samples=100, seed=0, predict_at=[held_out])
    assert spread["samples"] > 50
    low, high = spread["a"]
    assert low < high and low - 0.05 < TRUE_A < high + 0.05


def test_parametric_fit_recovers_alpha_and_beta():
    from pipelines.tuning.laws import fit_parametric

    points = _sweep()
    n = np.concatenate([p[0] for p in points.values()])
    d = np.concatenate([flops / (6 * p[0]) for flops, p in points.items()])
    loss = np.concatenate([p[1] for p in points.values()])
    fit = fit_parametric(n, d, loss)
    assert fit.alpha == pytest.approx(ALPHA, abs=0.03) and fit.beta == pytest.approx(BETA, abs=0.03)
    assert fit.a == pytest.approx(TRUE_A, abs=0.02)
    assert fit.n_star(1e22) == pytest.approx(_n_opt(1e22), rel=0.15)
    assert fit.loss(1e10, 2e11) == pytest.approx(_loss(1e10, 2e11), rel=0.005)
    assert math.isfinite(fit.huber_loss)


def test_a_flat_profile_is_flagged():
    from pipelines.tuning.laws import fit_isoflop

    fit = fit_isoflop(1e15, [1e6, 2e6, 4e6], [3.0, 2.9, 2.8])  # still falling: the minimum is beyond
    assert fit.at_edge
    with pytest.raises(ValueError, match="3 model sizes"):
        fit_isoflop(1e15, [1e6, 1e6, 2e6], [3.0, 2.9, 2.8])


def test_bootstrap_survives_profiles_without_a_minimum():
    from pipelines.tuning.laws import bootstrap

    # Losses still falling at the smallest size (as a sweep centred too large gives): resamples whose
    # parabola opens downwards are skipped, not fatal.
    points = {1e11: ([5e4, 1e5, 3e5, 5e5], [5.2, 5.6, 5.9, 5.8]), 3e11: ([5e4, 1e5, 3e5, 7e5], [4.5, 4.9, 5.3, 5.6]),
              1e12: ([1e5, 3e5, 5e5, 1.4e6], [4.0, 5.1, 5.0, 5.7])}
    spread = bootstrap(points, samples=100, seed=0)
    assert spread["samples"] <= 100
