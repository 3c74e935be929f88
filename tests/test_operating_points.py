"""Operating points: the chosen threshold reaches its target sensitivity on the data it was
chosen on, and no higher threshold does; Youden and sens@spec against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest

from isic_jax import metrics
from isic_jax.evaluation import operating_points


def _data(seed: int, n: int = 300, tied: bool = False):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.25).astype(np.int64)
    s = rng.normal(0, 1, n) + 1.3 * y
    return y, (np.round(s, 1) if tied else s)


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("seed, tied", [(0, False), (1, True), (2, True)])
def test_threshold_hits_the_target_sensitivity_with_the_best_specificity(seed, tied,
                                                                         target) -> None:
    y, s = _data(seed, tied=tied)
    t = operating_points.threshold_for_sensitivity(y, s, target)
    sens, spec = metrics.sensitivity_specificity(y, s, t)
    assert sens >= target
    # Any higher candidate threshold misses the target: t is the highest that reaches it, so
    # no threshold meeting the target has a better specificity.
    higher = np.unique(s[s > t])
    if higher.size:
        assert metrics.sensitivity_specificity(y, s, higher[0])[0] < target
    best_spec = max(metrics.sensitivity_specificity(y, s, c)[1] for c in np.unique(s)
                    if metrics.sensitivity_specificity(y, s, c)[0] >= target)
    assert spec == pytest.approx(best_spec, abs=1e-12)


def test_youden_and_rates_at_fixed_levels_match_brute_force() -> None:
    y, s = _data(3, tied=True)
    cands = np.unique(s)
    rates = [metrics.sensitivity_specificity(y, s, c) for c in cands]
    j = [a + b - 1 for a, b in rates]
    t = operating_points.youden_threshold(y, s)
    assert sum(metrics.sensitivity_specificity(y, s, t)) - 1 == pytest.approx(max(j), abs=1e-12)
    # Points of the empirical ROC, including "nothing malignant" (sensitivity 0, specificity 1).
    rates.append((0.0, 1.0))
    for level in (0.8, 0.9, 0.95):
        assert operating_points.sensitivity_at_specificity(y, s, level) == pytest.approx(
            max(a for a, b in rates if b >= level), abs=1e-12)
        assert operating_points.specificity_at_sensitivity(y, s, level) == pytest.approx(
            max(b for a, b in rates if a >= level), abs=1e-12)


def test_choose_threshold_methods_and_fallbacks() -> None:
    y, s = _data(4)
    assert operating_points.choose_threshold(y, s, "fixed", fixed=0.3) == 0.3
    assert operating_points.choose_threshold(y, s, "sensitivity", target_sensitivity=0.9) == (
        operating_points.threshold_for_sensitivity(y, s, 0.9))
    assert operating_points.choose_threshold(y, s, "youden") == (
        operating_points.youden_threshold(y, s))
    # One class only: nothing to choose on, the fixed threshold is used.
    assert operating_points.choose_threshold(np.zeros(5), s[:5], "sensitivity", fixed=0.4) == 0.4
    assert operating_points.choose_threshold(np.ones(5), s[:5], "youden", fixed=0.4) == 0.4
    assert math.isnan(operating_points.sensitivity_at_specificity([1, 1], [0.2, 0.3], 0.9))
    with pytest.raises(ValueError, match="threshold method"):
        operating_points.choose_threshold(y, s, "f1")
    with pytest.raises(ValueError):
        operating_points.threshold_for_sensitivity(y, s, 0.0)
    # 9 of 10 positives at target 0.9: exactly 0.9, not 10 of 10 by rounding.
    y10 = np.r_[np.ones(10, np.int64), np.zeros(5, np.int64)]
    s10 = np.r_[np.arange(10) / 10.0, np.full(5, -1.0)]
    t = operating_points.threshold_for_sensitivity(y10, s10, 0.9)
    assert t == pytest.approx(0.1) and metrics.sensitivity_specificity(y10, s10, t)[0] == 0.9
