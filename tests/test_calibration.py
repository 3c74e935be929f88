"""Calibration: ECE/MCE binned as torchmetrics bins them, temperature scaling that lowers the
ECE of miscalibrated scores and leaves the ranking alone."""

from __future__ import annotations

import bisect
import math

import numpy as np
import pytest

from isic_jax import metrics
from isic_jax.evaluation import calibration


def _torchmetrics_ece(conf, acc, n_bins: int = 15) -> tuple[float, float]:
    """torchmetrics' _binning_bucketize + _ce_compute, one image at a time in plain Python:
    float32 edges linspace(0, 1, n + 1), n + 1 bins, bin = bucketize(conf, edges, right=True) - 1
    (the number of edges <= conf, minus one), ECE = sum |acc - conf| * share, MCE = max gap."""
    edges = [float(e) for e in np.linspace(0, 1, n_bins + 1, dtype=np.float32)]
    count = [0.0] * (n_bins + 1)
    c_sum = [0.0] * (n_bins + 1)
    a_sum = [0.0] * (n_bins + 1)
    for c, a in zip(conf, acc, strict=True):
        k = bisect.bisect_right(edges, float(c)) - 1
        count[k] += 1
        c_sum[k] += float(c)
        a_sum[k] += float(a)
    gaps = [abs(a_sum[k] / count[k] - c_sum[k] / count[k]) if count[k] else 0.0
            for k in range(n_bins + 1)]
    total = sum(count)
    return sum(g * n / total for g, n in zip(gaps, count, strict=True)), max(gaps)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_and_mce_bin_as_torchmetrics(seed) -> None:
    rng = np.random.default_rng(seed)
    conf = rng.random(500).astype(np.float32)
    # Values on the bin edges and at exactly 0 and 1: where binning conventions differ.
    edges = np.linspace(0, 1, 16, dtype=np.float32)
    conf[:16] = edges
    conf[16:20] = 1.0
    acc = (rng.random(500) < conf).astype(np.float64)
    got = calibration.reliability_bins(conf, acc, 15)
    ece, mce = _torchmetrics_ece(conf, acc, 15)
    assert got["ece"] == pytest.approx(ece, abs=1e-12)
    assert got["mce"] == pytest.approx(mce, abs=1e-12)
    assert sum(b["count"] for b in got["bins"]) == 500
    assert got["bins"][-1]["lower"] == 1.0  # confidence exactly 1.0 has a bin of its own


def test_hand_worked_ece() -> None:
    # Bin [0.2, 0.267): confidences 0.21 and 0.25, outcomes 0 and 1 -> |0.5 - 0.23| = 0.27;
    # bin [0.8, 0.867): 0.81, 0.85 both 1 -> |1 - 0.83| = 0.17. ECE = (0.27 + 0.17) / 2.
    got = calibration.reliability_bins([0.21, 0.25, 0.81, 0.85], [0, 1, 1, 1], 15)
    assert got["ece"] == pytest.approx(0.22, abs=1e-7)
    assert got["mce"] == pytest.approx(0.27, abs=1e-7)
    assert [b["count"] for b in got["bins"]] == [2, 2]


def test_top_label_calibration_uses_the_argmax_confidence() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]])
    got = calibration.top_label_calibration(probs, [0, 2, 2], 15)
    want = _torchmetrics_ece([0.7, 0.6, 0.4], [1, 0, 1], 15)
    assert (got["ece"], got["mce"]) == pytest.approx(want, abs=1e-12)


def _miscalibrated(seed: int, scale: float, n: int = 4000):
    """Labels drawn from calibrated probabilities sigmoid(z); the model says sigmoid(scale z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-0.5, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.int64)
    p = 1 / (1 + np.exp(-scale * z))
    return np.stack([1 - p, p], axis=1), y


@pytest.mark.parametrize("scale", [3.0, 0.4])
def test_temperature_scaling_lowers_the_ece(scale) -> None:
    probs, y = _miscalibrated(0, scale)
    t = calibration.fit_temperature(probs, y)
    assert t == pytest.approx(scale, rel=0.1)  # over-confident: T > 1; under-confident: T < 1
    after = calibration.apply_temperature(probs, t)
    before_ece = calibration.binary_calibration(probs[:, 1], y)["ece"]
    after_ece = calibration.binary_calibration(after[:, 1], y)["ece"]
    assert after_ece < before_ece / 2 and after_ece < 0.03, (before_ece, after_ece)
    assert calibration.nll(after, y) < calibration.nll(probs, y)
    # The ranking and the argmax do not move.
    assert metrics.roc_auc(y, after[:, 1]) == pytest.approx(metrics.roc_auc(y, probs[:, 1]),
                                                            abs=1e-12)
    np.testing.assert_array_equal(after.argmax(axis=1), probs.argmax(axis=1))


def test_temperature_of_a_calibrated_model_is_one_and_degenerate_input_is_left_alone() -> None:
    probs, y = _miscalibrated(1, 1.0)
    assert calibration.fit_temperature(probs, y) == pytest.approx(1.0, abs=0.1)
    assert calibration.fit_temperature(probs[:5], np.zeros(5, np.int64)) == 1.0
    np.testing.assert_allclose(calibration.apply_temperature(probs, 1.0), probs, atol=1e-12)
    with pytest.raises(ValueError):
        calibration.apply_temperature(probs, 0.0)


def test_multiclass_temperature_and_underflowed_probabilities() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 1, (3000, 4))
    y = np.array([rng.choice(4, p=np.exp(r) / np.exp(r).sum()) for r in logits])
    over = np.exp(2.5 * logits) / np.exp(2.5 * logits).sum(axis=1, keepdims=True)
    over[0] = [1.0, 0.0, 0.0, 0.0]  # float32-style underflow: log(0) must not break the fit
    t = calibration.fit_temperature(over, y)
    assert t == pytest.approx(2.5, rel=0.1)
    out = calibration.apply_temperature(over, t)
    assert np.all(np.isfinite(out)) and np.allclose(out.sum(axis=1), 1.0)
    before = calibration.top_label_calibration(over, y)["ece"]
    assert calibration.top_label_calibration(out, y)["ece"] < before / 2
    assert not math.isnan(calibration.nll(out, y))
