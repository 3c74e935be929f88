"""DeLong's test for correlated ROC AUCs (DeLong, DeLong & Clarke-Pearson 1988), vectorised.

    result = delong_test(is_malignant, score_a, score_b)
    # {"auc_a", "auc_b", "difference", "se", "z", "p_value", "ci"}

Structural components via midranks (Sun & Xu 2014, "Fast implementation of DeLong's algorithm"):
O(N log N) for any number of score vectors on the same images. The variance treats the images as
independent; with several images per patient it is too small, which the patient-level paired
bootstrap (`compare.py`) is not.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats


def auc_covariance(y_bin: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """AUCs f64[K] of scores f[K, N] against labels {0,1}[N] and their DeLong covariance
    f64[K, K]. Raises ValueError unless both classes are present."""
    y = np.asarray(y_bin).reshape(-1).astype(bool)
    s = np.atleast_2d(np.asarray(scores, np.float64))
    if s.shape[1] != y.size:
        raise ValueError(f"{s.shape[1]} scores for {y.size} labels")
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        raise ValueError("DeLong's test needs both malignant and benign images")
    pos, neg = s[:, y], s[:, ~y]
    tx = stats.rankdata(pos, axis=1)  # midranks (ties averaged)
    ty = stats.rankdata(neg, axis=1)
    tz = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    aucs = (tz[:, :m].sum(axis=1) / m - (m + 1) / 2.0) / n
    v01 = (tz[:, :m] - tx) / n  # per malignant image: fraction of benign ranked below
    v10 = 1.0 - (tz[:, m:] - ty) / m  # per benign image: fraction of malignant ranked above
    sx = np.atleast_2d(np.cov(v01)) if m > 1 else np.zeros((s.shape[0], s.shape[0]))
    sy = np.atleast_2d(np.cov(v10)) if n > 1 else np.zeros((s.shape[0], s.shape[0]))
    return aucs, sx / m + sy / n


def delong_test(y_bin: Any, score_a: Any, score_b: Any, level: float = 0.95) -> dict[str, Any]:
    """Two-sided test of AUC(a) = AUC(b) on the same images.

    Returns:
      {auc_a, auc_b, difference (b - a), se, z, p_value, ci: [low, high] of the difference at
      `level` (normal approximation)}; z and p_value NaN when the variance is 0 (identical
      scores).
    """
    aucs, cov = auc_covariance(y_bin, np.stack([np.asarray(score_a), np.asarray(score_b)]))
    diff = float(aucs[1] - aucs[0])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = math.sqrt(max(var, 0.0))
    q = float(stats.norm.ppf(0.5 + level / 2.0))
    if se > 0:
        z = diff / se
        p = float(2.0 * stats.norm.sf(abs(z)))
    else:
        z, p = float("nan"), float("nan")
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "difference": diff, "se": se,
            "z": z, "p_value": p, "ci": [diff - q * se, diff + q * se]}
