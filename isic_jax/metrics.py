"""Evaluation metrics as the ISIC challenges define them, on numpy arrays.

- ROC AUC of the malignant score (ISIC 2016/2017/2020 rank by it).
- Partial AUC above 80 % TPR (ISIC 2024, Kaggle): the area under the ROC curve and above the line
  TPR = min_tpr, in [0, 1 - min_tpr] (0.2 for a perfect ranking, ~0.02 for a random one),
  computed exactly as the official Kaggle metric does: flip labels and scores, sklearn's
  `roc_curve`, add a point at FPR = 1 - min_tpr by linear interpolation, trapezoid area. Not the
  same quantity as isic-challenge-scoring's `auc_sens_80`, nor sklearn's McClish-standardised
  `roc_auc_score(max_fpr=...)`.
- Balanced multiclass accuracy (ISIC 2018/2019): mean recall over the classes present in the
  labels, with the prediction the argmax of the probabilities; an argmax tie (several classes
  share the maximum) counts as wrong.
- Sensitivity/specificity (and PPV/NPV) at a threshold on the malignant score (positive iff
  score >= threshold), the confusion matrix, and a patient-level AUC (see `patient_auc`).
- Per class, one against the rest, what the official ISIC scorer (`isic-challenge-scoring`,
  `ClassificationScore`) reports: sensitivity, specificity, accuracy, PPV and NPV of
  "probability > 0.5", AUC, its raw `auc_sens_80` (`auc_above_sensitivity`) and average precision.
  Where a ratio is undefined (0/0) the scorer scores 1.0; here it is NaN (null in JSON).
- ISIC 2024's secondary prize: top-k (15) retrieval sensitivity per patient
  (`top_k_retrieval_sensitivity`).

Degenerate inputs (one class only, no examples) give NaN, never an exception; the dict of
`classification_metrics` is JSON-ready: Python scalars and lists, NaN -> None.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm

from isic_jax.utils import to_json_compatible

_NAN = float("nan")


def _as_binary(labels: Any) -> np.ndarray:
    """labels -> int64[N] of 0/1."""
    y = np.asarray(labels).reshape(-1)
    if y.dtype == bool:
        return y.astype(np.int64)
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() > 1):
        raise ValueError("binary labels must be 0 or 1")
    return y


def _as_scores(scores: Any, n: int) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.shape[0] != n:
        raise ValueError(f"{s.shape[0]} scores for {n} labels")
    return s


def _both_classes(y: np.ndarray) -> bool:
    return y.size > 0 and 0 < int(y.sum()) < y.size


def roc_auc(labels: Any, scores: Any) -> float:
    """ROC AUC of scores f[N] for binary labels {0,1}[N]; NaN unless both classes are present."""
    y = _as_binary(labels)
    s = _as_scores(scores, y.size)
    if not _both_classes(y):
        return _NAN
    return float(skm.roc_auc_score(y, s))


def partial_auc_above_tpr(labels: Any, scores: Any, min_tpr: float = 0.8) -> float:
    """ISIC 2024 (Kaggle) partial AUC above `min_tpr`: a value in [0, 1 - min_tpr].

    labels {0,1}[N] (1 = malignant), scores f[N] (higher = more malignant). Follows the official
    metric step by step (ISIC-Research/Challenge-2024-Metrics, N. Kurtansky): the region above
    TPR = min_tpr of the ROC curve becomes, after swapping the roles of the classes and negating
    the scores, the region left of FPR = 1 - min_tpr of the flipped curve, whose area sklearn's
    `roc_curve` + `auc` give once a point is interpolated at that FPR. NaN for one class only.
    """
    if not 0.0 <= min_tpr < 1.0:
        raise ValueError(f"min_tpr must be in [0, 1), got {min_tpr}")
    y = _as_binary(labels)
    s = _as_scores(scores, y.size)
    if not _both_classes(y):
        return _NAN
    v_gt = np.abs(y - 1)  # benign becomes the positive class
    v_pred = -1.0 * s
    max_fpr = abs(1.0 - min_tpr)
    fpr, tpr, _ = skm.roc_curve(v_gt, v_pred)
    if max_fpr == 1.0:
        return float(skm.auc(fpr, tpr))
    # Add a single point at max_fpr by linear interpolation.
    stop = int(np.searchsorted(fpr, max_fpr, "right"))
    x_interp = [fpr[stop - 1], fpr[stop]]
    y_interp = [tpr[stop - 1], tpr[stop]]
    tpr = np.append(tpr[:stop], np.interp(max_fpr, x_interp, y_interp))
    fpr = np.append(fpr[:stop], max_fpr)
    return float(skm.auc(fpr, tpr))


def auc_above_sensitivity(labels: Any, scores: Any, sensitivity: float = 0.8) -> float:
    """Raw area under the ROC curve where TPR >= `sensitivity` (isic-challenge-scoring's
    `auc_sens_80` for 0.8): the integral of TPR over FPR from the point where the curve first
    reaches that TPR (linearly interpolated) to FPR 1. Not McClish-normalised, and not the Kaggle
    pAUC (`partial_auc_above_tpr`, which subtracts the band below the line TPR = sensitivity).

    labels {0,1}[N], scores f[N]; a value in [0, 1]: 1 for a perfect ranking, (1 - s^2) / 2 for
    chance (0.18 at s = 0.8). NaN for one class.
    """
    if not 0.0 < sensitivity <= 1.0:
        raise ValueError(f"sensitivity must be in (0, 1], got {sensitivity}")
    y = _as_binary(labels)
    s = _as_scores(scores, y.size)
    if not _both_classes(y):
        return _NAN
    # Every threshold: the curve is then exact, with no collinear point dropped.
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    first = int(np.searchsorted(tpr, sensitivity, side="left"))  # first point at/above it
    if tpr[first] == sensitivity:
        start_fpr = float(fpr[first])
    else:  # crossing inside the segment (first - 1, first); tpr[first - 1] < sensitivity
        t0, t1 = tpr[first - 1], tpr[first]
        frac = (sensitivity - t0) / (t1 - t0)
        start_fpr = float(fpr[first - 1] + frac * (fpr[first] - fpr[first - 1]))
    xs = np.concatenate([[start_fpr], fpr[first:]])
    ys = np.concatenate([[sensitivity], tpr[first:]])
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2.0))


def average_precision(labels: Any, scores: Any) -> float:
    """sklearn's average precision of scores f[N] for labels {0,1}[N]; NaN for one class."""
    y = _as_binary(labels)
    s = _as_scores(scores, y.size)
    if not _both_classes(y):
        return _NAN
    return float(skm.average_precision_score(y, s))


def _ratio(num: int, den: int) -> float:
    return num / den if den else _NAN


def binary_rates(labels: Any, predicted: Any) -> dict[str, float]:
    """Rates of a binary decision predicted bool[N] against labels {0,1}[N].

    Returns {tp, fp, tn, fn (ints), sensitivity, specificity, ppv, npv, accuracy}; a rate whose
    denominator is 0 is NaN.
    """
    y = _as_binary(labels).astype(bool)
    pred = np.asarray(predicted, bool).reshape(-1)
    if pred.shape != y.shape:
        raise ValueError(f"{pred.size} predictions for {y.size} labels")
    tp, fp = int(np.sum(pred & y)), int(np.sum(pred & ~y))
    tn, fn = int(np.sum(~pred & ~y)), int(np.sum(~pred & y))
    return {
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "accuracy": _ratio(tp + tn, y.size),
    }


# The official scorer's per-class decision: "probability > 0.5" (strictly).
SCORER_THRESHOLD = 0.5


def per_class_scores(labels: Any, probs: Any, sensitivity: float = 0.8) -> list[dict[str, float]]:
    """One-vs-rest figures of each class, as isic-challenge-scoring's `per_category` has them.

    Args:
      labels: int[N] true classes. probs: f[N, C].
      sensitivity: the TPR of `auc_sens_80` (0.8 in the scorer).

    Returns:
      C dicts {support, sensitivity, specificity, accuracy, ppv, npv (of probs[:, c] > 0.5),
      auc, auc_sens_80, average_precision}; NaN where undefined (the scorer's 1.0 "freebies" for
      0/0 ratios stay NaN here; AUCs are NaN when the class is absent or alone).
    """
    p = np.asarray(probs, dtype=np.float64)
    y = _as_labels(labels, p.shape[0], p.shape[1])
    out = []
    for c in range(p.shape[1]):
        yc = (y == c).astype(np.int64)
        rates = binary_rates(yc, p[:, c] > SCORER_THRESHOLD)
        out.append({
            "support": int(yc.sum()),
            **{k: rates[k] for k in ("sensitivity", "specificity", "accuracy", "ppv", "npv")},
            "auc": roc_auc(yc, p[:, c]),
            "auc_sens_80": auc_above_sensitivity(yc, p[:, c], sensitivity),
            "average_precision": average_precision(yc, p[:, c]),
        })
    return out


def top_k_retrieval_sensitivity(
    labels: Any, scores: Any, patient_ids: Sequence[Any] | np.ndarray, k: int = 15
) -> dict[str, Any]:
    """ISIC 2024's secondary metric: malignant images found among each patient's top-k scores.

    For every patient with at least one malignant image, the k images with the highest scores
    are "retrieved" (equal scores: the earlier image first, as pandas' nlargest). Images without
    a patient id are left out.

    Args:
      labels: {0,1}[N]. scores: f[N]. patient_ids: str/bytes[N] ("" missing). k: images kept
        per patient.

    Returns:
      {k, sensitivity: found / malignant images (pooled over those patients), patient_mean:
      mean over those patients of the fraction of their malignant images found (the challenge's
      ranking score), num_patients, num_malignant, num_found}; NaN values without any malignant
      image.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    y = _as_binary(labels)
    s = _as_scores(scores, y.size)
    ids = list(np.asarray(patient_ids, dtype=object).reshape(-1))
    if len(ids) != y.size:
        raise ValueError(f"{len(ids)} patient ids for {y.size} labels")
    by_patient: dict[str, list[int]] = {}
    for i, pid in enumerate(ids):
        if not _missing_id(pid):
            key = pid.decode() if isinstance(pid, bytes | np.bytes_) else str(pid)
            by_patient.setdefault(key, []).append(i)
    found = total = 0
    fractions = []
    for rows in by_patient.values():
        rows_a = np.asarray(rows)
        n_mal = int(y[rows_a].sum())
        if n_mal == 0:
            continue
        # Stable sort on -score: ties keep the input order.
        top = rows_a[np.argsort(-s[rows_a], kind="stable")[:k]]
        hit = int(y[top].sum())
        found, total = found + hit, total + n_mal
        fractions.append(hit / n_mal)
    return {
        "k": int(k),
        "sensitivity": found / total if total else _NAN,
        "patient_mean": float(np.mean(fractions)) if fractions else _NAN,
        "num_patients": len(fractions),
        "num_malignant": total,
        "num_found": found,
    }


def argmax_ties_wrong(probs: Any) -> np.ndarray:
    """probs f[N, C] -> int64[N]: the argmax class, or -1 where several classes share the maximum.

    -1 matches no label, so a tie counts as a wrong prediction everywhere it is used.
    """
    p = np.asarray(probs)
    if p.ndim != 2:
        raise ValueError(f"probs must be [N, C], got shape {p.shape}")
    if p.shape[0] == 0:
        return np.zeros((0,), np.int64)
    top = p.max(axis=1, keepdims=True)
    ties = (p == top).sum(axis=1) > 1
    return np.where(ties, -1, p.argmax(axis=1)).astype(np.int64)


def _as_labels(labels: Any, n: int, num_classes: int) -> np.ndarray:
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if y.shape[0] != n:
        raise ValueError(f"{y.shape[0]} labels for {n} rows of probabilities")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes})")
    return y


def balanced_multiclass_accuracy(labels: Any, probs: Any) -> float:
    """Mean per-class recall over the classes present in labels int[N] (probs f[N, C]).

    Predictions are the argmax of probs; ties count as wrong (ISIC 2018/2019). NaN for N = 0.
    """
    p = np.asarray(probs)
    y = _as_labels(labels, p.shape[0], p.shape[1])
    if y.size == 0:
        return _NAN
    pred = argmax_ties_wrong(p)
    recalls = [float(np.mean(pred[y == c] == c)) for c in np.unique(y)]
    return float(np.mean(recalls))


def per_class_recall(labels: Any, probs: Any) -> np.ndarray:
    """Recall of each class f64[C] (argmax, ties wrong); NaN for classes absent from labels."""
    p = np.asarray(probs)
    y = _as_labels(labels, p.shape[0], p.shape[1])
    pred = argmax_ties_wrong(p)
    out = np.full(p.shape[1], np.nan)
    for c in range(p.shape[1]):
        if np.any(y == c):
            out[c] = np.mean(pred[y == c] == c)
    return out


def one_vs_rest_auc(labels: Any, probs: Any) -> np.ndarray:
    """AUC of probs[:, c] for class c against the rest, f64[C]; NaN where c is absent or alone."""
    p = np.asarray(probs, dtype=np.float64)
    y = _as_labels(labels, p.shape[0], p.shape[1])
    return np.asarray([roc_auc(y == c, p[:, c]) for c in range(p.shape[1])], np.float64)


def sensitivity_specificity(
    labels: Any, scores: Any, threshold: float = 0.5
) -> tuple[float, float]:
    """(sensitivity, specificity) with "malignant" iff score >= threshold.

    labels {0,1}[N], scores f[N]. Sensitivity is NaN without positives, specificity without
    negatives.
    """
    y = _as_binary(labels)
    pred = _as_scores(scores, y.size) >= threshold
    pos, neg = y == 1, y == 0
    sens = float(np.mean(pred[pos])) if pos.any() else _NAN
    spec = float(np.mean(~pred[neg])) if neg.any() else _NAN
    return sens, spec


def confusion_matrix(labels: Any, probs: Any) -> np.ndarray:
    """int64[C, C]: rows true class, columns argmax prediction. Argmax ties are left out."""
    p = np.asarray(probs)
    y = _as_labels(labels, p.shape[0], p.shape[1])
    pred = argmax_ties_wrong(p)
    keep = pred >= 0  # sklearn would drop them too; explicit is clearer
    if not keep.any():
        return np.zeros((p.shape[1], p.shape[1]), np.int64)
    return skm.confusion_matrix(y[keep], pred[keep], labels=np.arange(p.shape[1])).astype(np.int64)


def malignant_score(
    probs: Any, labels: Any, malignant_classes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """The binary view of a classification: (is_malignant int64[N], malignant score f64[N]).

    An image is malignant when its label is one of `malignant_classes`; its score is the sum of
    their probabilities (binary task, malignant_classes [1]: probs[:, 1]).
    """
    mal = sorted({int(c) for c in malignant_classes})
    p = np.asarray(probs, dtype=np.float64)
    return np.isin(np.asarray(labels), mal).astype(np.int64), p[:, mal].sum(axis=1)


def _missing_id(x: Any) -> bool:
    if x is None:
        return True
    if isinstance(x, bytes | np.bytes_):
        return len(x) == 0
    if isinstance(x, float) and math.isnan(x):
        return True
    return str(x) == ""


def patient_level(
    labels: Any, scores: Any, patient_ids: Sequence[Any] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Aggregate images to patients: (labels int64[P], scores f64[P]), patients sorted by id.

    A patient is malignant if any of their images is; their score is the maximum malignant score
    over their images (what a screening reader would act on). Images without a patient id
    ("", b"", None) are left out.
    """
    y = _as_binary(labels)
    s = _as_scores(scores, y.size)
    ids = list(np.asarray(patient_ids, dtype=object).reshape(-1))
    if len(ids) != y.size:
        raise ValueError(f"{len(ids)} patient ids for {y.size} labels")
    agg: dict[Any, list[float]] = {}
    for pid, label, score in zip(ids, y, s, strict=True):
        if _missing_id(pid):
            continue
        key = pid.decode() if isinstance(pid, bytes | np.bytes_) else str(pid)
        entry = agg.setdefault(key, [0.0, -np.inf])
        entry[0] = max(entry[0], float(label))
        entry[1] = max(entry[1], float(score))
    keys = sorted(agg)
    return (
        np.asarray([int(agg[k][0]) for k in keys], np.int64),
        np.asarray([agg[k][1] for k in keys], np.float64),
    )


def patient_auc(labels: Any, scores: Any, patient_ids: Sequence[Any] | np.ndarray) -> float:
    """ROC AUC at patient level: max score per patient vs any malignant image (patient_level)."""
    p_labels, p_scores = patient_level(labels, scores, patient_ids)
    return roc_auc(p_labels, p_scores)


def classification_metrics(
    probs: Any,
    labels: Any,
    class_names: Sequence[str],
    *,
    malignant_classes: Sequence[int],
    threshold: float = 0.5,
    patient_ids: Sequence[Any] | np.ndarray | None = None,
    pauc_min_tpr: float = 0.8,
    retrieval_top_k: int = 15,
) -> dict[str, Any]:
    """All point estimates of one split, JSON-ready (NaN -> None).

    Args:
      probs: f32[N, C] class probabilities (softmax), C = len(class_names).
      labels: int[N] true class indices (binary task: 0 benign, 1 malignant).
      class_names: the C class names.
      malignant_classes: indices of the malignant classes; the malignant score of an image is the
        sum of their probabilities (binary task: [1], i.e. probs[:, 1]).
      threshold: on the malignant score, for sensitivity/specificity (malignant iff >= threshold).
      patient_ids: str/bytes[N] or None; "" marks a missing id. Enables patient_auc and the
        top-k retrieval sensitivity.
      pauc_min_tpr: the TPR above which "pauc" is taken ("pauc_80" is always at 0.8).
      retrieval_top_k: images per patient of the retrieval sensitivity.

    Returns:
      num_examples, num_malignant, malignant_classes, threshold, auc, pauc_80, pauc (at
      pauc_min_tpr), auc_sens_80 (the scorer's raw partial AUC), average_precision, sensitivity,
      specificity, ppv, npv, binary_counts {tp, fp, tn, fn}, accuracy and balanced_accuracy
      (argmax, ties wrong), num_argmax_ties, per_class {name: {support, recall, auc, sensitivity,
      specificity, accuracy, ppv, npv, auc_sens_80, average_precision}} (`per_class_scores`),
      confusion_matrix (rows true, columns predicted, ties left out) with
      confusion_matrix_labels, patient_auc and num_patients (None without patient_ids),
      patient_aggregation, and top_k_retrieval (`top_k_retrieval_sensitivity`, None without
      patient ids).
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(class_names):
        raise ValueError(f"probs must be [N, {len(class_names)}], got shape {p.shape}")
    n, num_classes = p.shape
    y = _as_labels(labels, n, num_classes)
    mal = sorted({int(c) for c in malignant_classes})
    if not mal or mal[0] < 0 or mal[-1] >= num_classes:
        raise ValueError(f"malignant_classes must be non-empty indices in [0, {num_classes})")

    y_bin, score = malignant_score(p, y, mal)
    rates = binary_rates(y_bin, score >= threshold)
    pred = argmax_ties_wrong(p)
    recall = per_class_recall(y, p)
    scored = per_class_scores(y, p)
    result: dict[str, Any] = {
        "num_examples": n,
        "num_malignant": int(y_bin.sum()),
        "malignant_classes": mal,
        "threshold": float(threshold),
        "auc": roc_auc(y_bin, score),
        "pauc_80": partial_auc_above_tpr(y_bin, score, min_tpr=0.8),
        "pauc": partial_auc_above_tpr(y_bin, score, min_tpr=pauc_min_tpr),
        "pauc_min_tpr": float(pauc_min_tpr),
        "auc_sens_80": auc_above_sensitivity(y_bin, score, 0.8),
        "average_precision": average_precision(y_bin, score),
        **{k: rates[k] for k in ("sensitivity", "specificity", "ppv", "npv")},
        "binary_counts": {k: rates[k] for k in ("tp", "fp", "tn", "fn")},
        "accuracy": float(np.mean(pred == y)) if n else _NAN,
        "balanced_accuracy": balanced_multiclass_accuracy(y, p),
        "num_argmax_ties": int(np.sum(pred < 0)),
        "per_class": {
            name: {"recall": recall[c], **scored[c]} for c, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(y, p),
        "confusion_matrix_labels": list(class_names),
        "patient_auc": _NAN,
        "num_patients": None,
        "patient_aggregation": "max score per patient; malignant if any image is",
        "top_k_retrieval": None,
    }
    if patient_ids is not None:
        p_labels, p_scores = patient_level(y_bin, score, patient_ids)
        result["patient_auc"] = roc_auc(p_labels, p_scores)
        result["num_patients"] = int(p_labels.size)
        result["top_k_retrieval"] = top_k_retrieval_sensitivity(
            y_bin, score, patient_ids, retrieval_top_k
        )
    return to_json_compatible(result)
