"""Operating points: the threshold on the malignant score that `predict` decides with.

    t = choose_threshold(is_malignant, score, method="sensitivity", target_sensitivity=0.9)
    sens = sensitivity_at_specificity(is_malignant, score, 0.95)

"Malignant" always means score >= threshold (as `metrics.sensitivity_specificity`).

- "sensitivity": the highest threshold whose sensitivity reaches the target, i.e. the k-th highest
  malignant score with k = ceil(target x malignant images). Among thresholds that meet the
  target, it has the highest specificity; on the data it was chosen on, its sensitivity is the
  smallest achievable value >= target (ties in the scores can only add to it).
- "youden": the threshold of the ROC point with the largest sensitivity + specificity - 1 (the
  highest such threshold when several tie).
- "fixed": the given threshold (config.eval.threshold).

Thresholds are chosen on the validation fold and then used, unchanged, on other splits and on new
images; on the fold they were chosen on, the sensitivity is met by construction, so it says
nothing about new data: the bootstrap interval, and another split, do.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn import metrics as skm

METHODS = ("sensitivity", "youden", "fixed")


def _binary(y_bin: Any, score: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_bin).reshape(-1).astype(np.int64)
    s = np.asarray(score, np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"{s.size} scores for {y.size} labels")
    return y, s


def threshold_for_sensitivity(y_bin: Any, score: Any, target: float) -> float:
    """The highest threshold t with mean(score[malignant] >= t) >= target; NaN without
    malignant images."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    y, s = _binary(y_bin, score)
    pos = np.sort(s[y == 1])[::-1]
    if pos.size == 0:
        return float("nan")
    # The small tolerance keeps e.g. 0.9 x 10 = 9.000000000000002 from asking for 10 images.
    k = max(1, math.ceil(target * pos.size - 1e-9))
    return float(pos[k - 1])


def youden_threshold(y_bin: Any, score: Any) -> float:
    """The threshold maximising sensitivity + specificity - 1; NaN unless both classes exist."""
    y, s = _binary(y_bin, score)
    if y.size == 0 or y.min() == y.max():
        return float("nan")
    fpr, tpr, thresholds = skm.roc_curve(y, s, drop_intermediate=False)
    j = tpr - fpr
    j[~np.isfinite(thresholds)] = -np.inf  # the "nothing malignant" point is not a threshold
    return float(thresholds[int(np.argmax(j))])  # first = highest threshold among ties


def choose_threshold(
    y_bin: Any,
    score: Any,
    method: str,
    *,
    target_sensitivity: float = 0.9,
    fixed: float = 0.5,
) -> float:
    """The operating threshold of `method` (see the module docstring); `fixed` for "fixed" and
    whenever the data cannot define one (one class only)."""
    if method not in METHODS:
        raise ValueError(f"threshold method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "fixed":
        return float(fixed)
    if method == "sensitivity":
        t = threshold_for_sensitivity(y_bin, score, target_sensitivity)
    else:
        t = youden_threshold(y_bin, score)
    return float(t) if math.isfinite(t) else float(fixed)


def sensitivity_at_specificity(y_bin: Any, score: Any, specificity: float) -> float:
    """The highest sensitivity of any threshold whose specificity is >= `specificity` (points of
    the empirical ROC, no interpolation); NaN unless both classes exist."""
    y, s = _binary(y_bin, score)
    if y.size == 0 or y.min() == y.max():
        return float("nan")
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    return float(np.max(tpr[fpr <= 1.0 - specificity + 1e-12]))


def specificity_at_sensitivity(y_bin: Any, score: Any, sensitivity: float) -> float:
    """The highest specificity of any threshold whose sensitivity is >= `sensitivity`; NaN
    unless both classes exist."""
    y, s = _binary(y_bin, score)
    if y.size == 0 or y.min() == y.max():
        return float("nan")
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    return float(np.max(1.0 - fpr[tpr >= sensitivity - 1e-12]))
