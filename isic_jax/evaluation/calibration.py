"""Calibration: expected and maximum calibration error, reliability bins, temperature scaling.

    bins = reliability_bins(score, is_malignant, num_bins=15)   # ECE, MCE and the diagram's bins
    t = fit_temperature(probs, labels)                          # on the validation fold
    calibrated = apply_temperature(probs, t)                    # what `predict` then writes

ECE/MCE follow torchmetrics' `BinaryCalibrationError` / `MulticlassCalibrationError` (defaults:
15 equal-width bins, norm "l1" = ECE, "max" = MCE): bin edges `linspace(0, 1, n + 1)` in float32,
an image goes to bin k when edge_k <= confidence < edge_k+1 (`torch.bucketize(..., right=True) -
1`), so a confidence of exactly 1.0 has a bin of its own; ECE = sum over bins of |accuracy -
mean confidence| x fraction of images, MCE = the largest such gap over the bins (empty bins
give 0). Binary view: the confidence is the malignant score and the "accuracy" the fraction
malignant (torchmetrics' binary case); top-label view: the confidence is the highest class
probability and the accuracy whether that class is right (its multiclass case).

Temperature scaling (Guo et al. 2017): one scalar T > 0 with probabilities softmax(log(p) / T),
fitted by minimising the negative log-likelihood of the true classes on the validation fold. The
model outputs probabilities, and log(p) equals the logits up to a constant per image, which a
softmax ignores. T > 1 softens an over-confident model, T < 1 sharpens an under-confident one;
argmax (and so accuracy and balanced accuracy) does not change, and for two classes neither does
the ranking (AUC).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import optimize

DEFAULT_BINS = 15
# log(p) of a probability that underflowed to 0 in float32 (~e^-87 is the smallest normal).
_LOG_FLOOR = -100.0
# Search range of log T: T in [e^-4, e^4] ~ [0.018, 55]; wider is never a sane model.
_LOG_T_RANGE = (-4.0, 4.0)


def _edges(num_bins: int) -> np.ndarray:
    # float32 as torch.linspace(0, 1, n + 1) makes them: identical bin membership.
    return np.linspace(0.0, 1.0, num_bins + 1, dtype=np.float32).astype(np.float64)


def bin_index(confidence: Any, num_bins: int = DEFAULT_BINS) -> np.ndarray:
    """int64[N] in [0, num_bins]: torchmetrics' bin of each confidence (num_bins: exactly 1.0)."""
    conf = np.asarray(confidence, np.float64).reshape(-1)
    index = np.searchsorted(_edges(num_bins), conf, side="right") - 1  # bucketize(right=True)-1
    return np.clip(index, 0, num_bins)  # below 0 cannot occur for probabilities


def reliability_bins(
    confidence: Any, correct: Any, num_bins: int = DEFAULT_BINS
) -> dict[str, Any]:
    """ECE, MCE and the reliability diagram's bins of confidences f[N] against outcomes {0,1}[N].

    Returns:
      {"ece", "mce", "num_bins", "bins": [{"lower", "upper", "count", "confidence" (mean),
      "accuracy" (mean outcome)}] for the non-empty bins}; ece/mce NaN for N = 0. The last
      torchmetrics bin (confidence exactly 1.0) is reported as [1, 1].
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    conf = np.asarray(confidence, np.float64).reshape(-1)
    acc = np.asarray(correct, np.float64).reshape(-1)
    if conf.shape != acc.shape:
        raise ValueError(f"{conf.size} confidences for {acc.size} outcomes")
    if conf.size == 0:
        return {"ece": float("nan"), "mce": float("nan"), "num_bins": num_bins, "bins": []}
    edges = _edges(num_bins)
    index = bin_index(conf, num_bins)
    count = np.bincount(index, minlength=num_bins + 1).astype(np.float64)
    conf_sum = np.bincount(index, weights=conf, minlength=num_bins + 1)
    acc_sum = np.bincount(index, weights=acc, minlength=num_bins + 1)
    nonempty = count > 0
    mean_conf = np.where(nonempty, conf_sum / np.maximum(count, 1), 0.0)
    mean_acc = np.where(nonempty, acc_sum / np.maximum(count, 1), 0.0)
    gap = np.abs(mean_acc - mean_conf)
    ece = float(np.sum(gap * count / count.sum()))
    mce = float(np.max(gap))
    upper = np.append(edges[1:], 1.0)
    bins = [
        {"lower": float(edges[k]), "upper": float(upper[k]), "count": int(count[k]),
         "confidence": float(mean_conf[k]), "accuracy": float(mean_acc[k])}
        for k in np.flatnonzero(nonempty)
    ]
    return {"ece": ece, "mce": mce, "num_bins": num_bins, "bins": bins}


def binary_calibration(score: Any, y_bin: Any, num_bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """`reliability_bins` of the malignant score f[N] against is-malignant {0,1}[N]."""
    return reliability_bins(np.clip(np.asarray(score, np.float64), 0.0, 1.0), y_bin, num_bins)


def top_label_calibration(probs: Any, labels: Any, num_bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """`reliability_bins` of the highest probability of probs f[N, C] against "argmax == label"
    (argmax takes the first of equal maxima, as torch does)."""
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels).reshape(-1)
    return reliability_bins(p.max(axis=1), p.argmax(axis=1) == y, num_bins)


def log_probs(probs: Any) -> np.ndarray:
    """f64 [N, C]: log(p), with probabilities that underflowed to 0 set to a large negative."""
    p = np.asarray(probs, np.float64)
    with np.errstate(divide="ignore"):
        return np.maximum(np.log(p), _LOG_FLOOR)


def apply_temperature(probs: Any, temperature: float) -> np.ndarray:
    """softmax(log(p) / T) of probs f[N, C]: f64 [N, C]. T = 1 returns the probabilities."""
    if not temperature > 0 or not np.isfinite(temperature):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    z = log_probs(probs) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(probs: Any, labels: Any) -> float:
    """Mean negative log-likelihood of the true classes (labels int[N]) under probs f[N, C]."""
    logp = log_probs(probs)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    return float(-np.mean(logp[np.arange(y.size), y]))


def fit_temperature(probs: Any, labels: Any) -> float:
    """The temperature T minimising the NLL of softmax(log(p) / T) on (probs f[N, C], labels).

    A one-dimensional convex problem in 1/T (the NLL of a softmax is convex in its scale), solved
    over log T in [-4, 4] with Brent's bounded method. Returns 1.0 for fewer than 2 images or a
    single class in the labels (nothing to fit).
    """
    logp = log_probs(probs)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if y.size < 2 or np.unique(y).size < 2:
        return 1.0
    rows = np.arange(y.size)

    def loss(log_t: float) -> float:
        z = logp / np.exp(log_t)
        zmax = z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z - zmax).sum(axis=1)) + zmax[:, 0]
        return float(np.mean(lse - z[rows, y]))

    res = optimize.minimize_scalar(loss, bounds=_LOG_T_RANGE, method="bounded",
                                   options={"xatol": 1e-6})
    t = float(np.exp(res.x))
    # Never worse than no scaling (a flat NLL at the optimum can leave Brent marginally off).
    return t if loss(res.x) <= loss(0.0) else 1.0
