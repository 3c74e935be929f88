"""Percentile bootstrap confidence intervals of the evaluation metrics, vectorised over resamples.

    units = resampling_units(patient_ids)          # patients where ids exist, else images
    fn = binary_metrics_fn(y_bin, score, threshold=t, labels=y, predicted=argmax)
    draws = bootstrap(fn, units, num_resamples=1000, seed=0)   # {metric: f64[1000]}
    low, high = percentile_interval(draws["auc"], level=0.95)

A resample draws `units.count` units with replacement (seeded, numpy PCG64); an image then counts
as many times as its unit was drawn. Patients are resampled as a whole because images of one
patient are not independent (ISIC 2020 has ~16 images per patient): resampling images would
give intervals that are too narrow. Images without a patient id are each their own unit.

Every metric is computed for a chunk of resamples at once from these counts ("weights"
float64 [b, N]), never by looping over resamples in Python: the scores are sorted once, and each
resample's ROC curve is a cumulative sum of its weights over that order (`weighted_roc`). 1000
resamples of ISIC 2020's 33k validation images take ~2 s on one CPU core
(`scripts/bench_bootstrap.py`). The same functions with weights all 1 give the point estimates
of `metrics.py` (tests/test_bootstrap.py checks each against it).

Intervals are percentile intervals (the level/2 and 1 - level/2 quantiles of the resampled
values). A resample in which a metric is undefined (e.g. no malignant image drawn) is left out of
that metric's interval; `num_valid` says how many remained. Operating-point metrics
(sensitivity, specificity, PPV, NPV at a threshold) are taken at the fixed threshold: the
interval is that of the locked-in decision rule, not of re-choosing the threshold per resample.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from isic_jax.evaluation import calibration

# Resamples per chunk are sized so that one [b, N] float64 array stays near this many elements
# (~16 MB): the chunk's arrays then fit in cache-friendly memory even for 400k images.
_CHUNK_ELEMENTS = 2_000_000

MetricFn = Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Units:
    """What is resampled: unit `index[i]` of each image i, `count` units, of `kind`.

    kind: "patient" (units are patients; images without an id are units of their own) or
    "image". num_patients: how many units are patients.
    """

    index: np.ndarray  # int64 [N]
    count: int
    kind: str
    num_patients: int = 0


def _has_id(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, bytes | np.bytes_):
        return len(value) > 0
    if isinstance(value, float) and np.isnan(value):
        return False
    return str(value) != ""


def resampling_units(patient_ids: Sequence[Any] | np.ndarray | None, n: int | None = None) -> Units:
    """Units of resampling: patients when any image has a patient id, else the images.

    Args:
      patient_ids: str/bytes [N] ("" = missing) or None.
      n: the number of images when patient_ids is None.
    """
    if patient_ids is None:
        if n is None:
            raise ValueError("give patient_ids or n")
        return Units(np.arange(n, dtype=np.int64), int(n), "image")
    ids = np.asarray(patient_ids, dtype=object).reshape(-1)
    has = np.fromiter((_has_id(v) for v in ids), bool, count=ids.size)
    if not has.any():
        return Units(np.arange(ids.size, dtype=np.int64), int(ids.size), "image")
    keys = np.asarray([v.decode() if isinstance(v, bytes | np.bytes_) else str(v)
                       for v in ids[has]], dtype=object)
    _, inverse = np.unique(keys, return_inverse=True)
    num_patients = int(inverse.max()) + 1
    index = np.empty(ids.size, np.int64)
    index[has] = inverse
    index[~has] = num_patients + np.arange(int((~has).sum()))
    return Units(index, num_patients + int((~has).sum()), "patient", num_patients)


def resample_weights(
    units: Units, num_resamples: int, seed: int, chunk: int | None = None
) -> Iterator[np.ndarray]:
    """Image weights of successive chunks of resamples: float64 [b, N] (sum of b <= chunk).

    The draws do not depend on the chunk size: chunk after chunk, the generator's stream is the
    same as one [num_resamples, units] draw.
    """
    n = units.index.size
    if chunk is None:
        chunk = max(1, _CHUNK_ELEMENTS // max(n, units.count, 1))
    rng = np.random.default_rng(seed)
    done = 0
    while done < num_resamples:
        b = min(chunk, num_resamples - done)
        draws = rng.integers(0, units.count, size=(b, units.count))
        flat = (draws + (np.arange(b) * units.count)[:, None]).reshape(-1)
        unit_counts = np.bincount(flat, minlength=b * units.count).reshape(b, units.count)
        yield unit_counts[:, units.index].astype(np.float64)
        done += b


def bootstrap(
    fn: MetricFn, units: Units, num_resamples: int, seed: int = 0, chunk: int | None = None
) -> dict[str, np.ndarray]:
    """{name: f64[num_resamples, ...]}: `fn`'s metrics on every resample (NaN where undefined).

    fn: weights f64[b, N] -> {name: f64[b] or f64[b, G]}.
    """
    parts: dict[str, list[np.ndarray]] = {}
    for weights in resample_weights(units, num_resamples, seed, chunk):
        for key, value in fn(weights).items():
            parts.setdefault(key, []).append(np.asarray(value, np.float64))
    return {key: np.concatenate(values) for key, values in parts.items()}


def point_estimates(fn: MetricFn, n: int) -> dict[str, np.ndarray]:
    """`fn` on the data as it is (every weight 1): {name: f64 scalar or f64[G]}."""
    return {key: np.asarray(value, np.float64)[0] for key, value in fn(np.ones((1, n))).items()}


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """(low, high) quantiles of the finite values f[B] for a central `level`; NaNs if none."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(v, [alpha, 1.0 - alpha])
    return float(low), float(high)


# ---------------------------------------------------------------------------------------------
# Weighted metrics, vectorised over resamples. Weights: f64 [b, N] (counts of each image).


class WeightedRoc:
    """ROC curves of b resamples: points k = 0..K (K distinct scores, highest first).

    tp, fp: f64 [b, K + 1] weighted counts at "score >= k-th distinct score" (column 0: none
    called malignant); pos, neg: f64 [b]; fpr, tpr: f64 [b, K + 1] (NaN rows without positives
    or negatives).
    """

    def __init__(self, tp: np.ndarray, fp: np.ndarray):
        self.tp, self.fp = tp, fp
        self.pos, self.neg = tp[:, -1], fp[:, -1]
        self.defined = (self.pos > 0) & (self.neg > 0)  # bool [b]: both classes drawn
        with np.errstate(invalid="ignore", divide="ignore"):
            self.tpr = tp / self.pos[:, None]
            self.fpr = fp / self.neg[:, None]


class SortedScores:
    """Scores sorted once (highest first) with their groups of equal values, for `roc`.

    rows: int[M] the images (columns of the weights) these scores belong to, when they are a
    subset (a subgroup, one image per patient); default all, in order.
    """

    def __init__(self, y_bin: np.ndarray, score: np.ndarray, rows: np.ndarray | None = None):
        y = np.asarray(y_bin).reshape(-1).astype(np.float64)
        s = np.asarray(score, np.float64).reshape(-1)
        if y.shape != s.shape:
            raise ValueError(f"{s.size} scores for {y.size} labels")
        self.order = np.argsort(-s, kind="stable")
        # Columns of the weights in sorted order: one gather per chunk.
        self.take = self.order if rows is None else np.asarray(rows, np.int64)[self.order]
        self.sorted = s[self.order]
        self.y_sorted = y[self.order]
        # Last index of each group of equal scores (ties form one ROC step); None: no ties.
        ends = np.concatenate([np.flatnonzero(np.diff(self.sorted) != 0), [s.size - 1]])
        self.ends = ends.astype(np.int64) if ends.size < s.size else None
        self.values = self.sorted if self.ends is None else self.sorted[self.ends]
        # For `auc`: the malignant images, and the group (last index) each one's ties end at.
        self.pos_rows = np.flatnonzero(self.y_sorted == 1)
        if self.ends is None:
            start = end = np.arange(s.size)
        else:
            group = np.searchsorted(self.ends, np.arange(s.size))
            end = self.ends[group]
            start = np.where(group > 0, self.ends[np.maximum(group - 1, 0)] + 1, 0)
        self.pos_start, self.pos_end = start[self.pos_rows], end[self.pos_rows]

    def roc(self, weights: np.ndarray) -> WeightedRoc:
        w = np.asarray(weights, np.float64)[:, self.take]
        b, n = w.shape
        # Cumulative sums written after a zero column ("nothing called malignant"), in place.
        tp, fp = np.zeros((b, n + 1)), np.zeros((b, n + 1))
        np.cumsum(w, axis=1, out=fp[:, 1:])
        w *= self.y_sorted
        np.cumsum(w, axis=1, out=tp[:, 1:])
        fp -= tp
        if self.ends is not None:
            keep = np.concatenate([[0], self.ends + 1])
            tp, fp = tp[:, keep], fp[:, keep]
        return WeightedRoc(tp, fp)

    def auc(self, weights: np.ndarray) -> np.ndarray:
        """f64 [b]: the AUC alone, cheaper than `auc(roc(...))` (one cumulative sum, read at the
        malignant images only): each malignant image counts the benign weight ranked below it,
        and half of that tied with it."""
        w = np.asarray(weights, np.float64)[:, self.take]
        neg = w * (1.0 - self.y_sorted)
        below_incl = np.cumsum(neg, axis=1)  # benign weight at or above each position
        total_neg = below_incl[:, -1] if w.shape[1] else np.zeros(w.shape[0])
        wp = w[:, self.pos_rows]
        pos_total = wp.sum(axis=1)
        # Benign weight strictly above the tie group, and within it.
        above = np.where(self.pos_start > 0, below_incl[:, np.maximum(self.pos_start - 1, 0)],
                         0.0)
        tied = below_incl[:, self.pos_end] - above
        ranked_below = total_neg[:, None] - above - tied
        area = np.sum(wp * (ranked_below + 0.5 * tied), axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = area / (pos_total * total_neg)
        return np.where((pos_total > 0) & (total_neg > 0), out, np.nan)


def auc(roc: WeightedRoc) -> np.ndarray:
    """f64 [b]: trapezoid area under each ROC (ties count half, as `roc_auc_score`)."""
    fpr, tpr = roc.fpr, roc.tpr
    area = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]), axis=1) / 2.0
    return np.where(roc.defined, area, np.nan)


def partial_auc_above_tpr(roc: WeightedRoc, min_tpr: float = 0.8) -> np.ndarray:
    """f64 [b]: the Kaggle ISIC 2024 pAUC: area between each ROC and the line TPR = min_tpr.

    The same number as `metrics.partial_auc_above_tpr` (which flips classes and interpolates a
    point): on each linear segment of the curve, the integral of max(tpr - min_tpr, 0) over fpr,
    exact also on the segment that crosses the line.
    """
    fpr, tpr = roc.fpr, roc.tpr
    lifted = np.maximum(tpr, min_tpr) - min_tpr
    # Trapezoids of the curve clipped at the line: exact except on the one segment per curve
    # that crosses it (y0 < m < y1), whose part above the line is a triangle.
    area = np.sum(np.diff(fpr, axis=1) * (lifted[:, 1:] + lifted[:, :-1]), axis=1) / 2.0
    out = np.full(fpr.shape[0], np.nan)
    for r in np.flatnonzero(roc.defined):
        k = int(np.searchsorted(tpr[r], min_tpr, side="right"))  # first point above the line
        if 0 < k < tpr.shape[1] and tpr[r, k - 1] < min_tpr:
            y0, y1, dx = tpr[r, k - 1], tpr[r, k], fpr[r, k] - fpr[r, k - 1]
            trapezoid = dx * (y1 - min_tpr) / 2.0
            triangle = dx * (y1 - min_tpr) ** 2 / (2.0 * (y1 - y0))
            area[r] += triangle - trapezoid
        out[r] = area[r]
    return out


def average_precision(roc: WeightedRoc) -> np.ndarray:
    """f64 [b]: sklearn's average precision, sum over thresholds of (R_k - R_k-1) * P_k."""
    tp, fp = roc.tp[:, 1:], roc.fp[:, 1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = roc.tp / roc.pos[:, None]
    ap = np.sum(np.diff(recall, axis=1) * precision, axis=1)
    return np.where(roc.defined, ap, np.nan)


def sensitivity_at_specificity(roc: WeightedRoc, specificity: float) -> np.ndarray:
    """f64 [b]: the highest sensitivity among thresholds whose specificity is >= `specificity`
    (points of the empirical ROC, no interpolation)."""
    fpr, tpr = roc.fpr, roc.tpr
    out = np.full(fpr.shape[0], np.nan)
    limit = 1.0 - specificity + 1e-12
    for r in np.flatnonzero(roc.defined):
        # fpr and tpr rise together: the last point left of the limit has the highest tpr.
        k = int(np.searchsorted(fpr[r], limit, side="right")) - 1
        out[r] = tpr[r, k]
    return out


def specificity_at_sensitivity(roc: WeightedRoc, sensitivity: float) -> np.ndarray:
    """f64 [b]: the highest specificity among thresholds whose sensitivity is >= `sensitivity`."""
    fpr, tpr = roc.fpr, roc.tpr
    out = np.full(fpr.shape[0], np.nan)
    for r in np.flatnonzero(roc.defined):
        k = int(np.searchsorted(tpr[r], sensitivity - 1e-12, side="left"))
        out[r] = 1.0 - fpr[r, min(k, fpr.shape[1] - 1)]
    return out


def tpr_on_grid(roc: WeightedRoc, grid: np.ndarray) -> np.ndarray:
    """f64 [b, G]: the highest TPR at FPR <= each grid value (the ROC as a step function), for
    pointwise bands around a curve."""
    fpr, tpr = roc.fpr, roc.tpr
    g = np.asarray(grid, np.float64) + 1e-12
    out = np.full((fpr.shape[0], g.size), np.nan)
    for r in np.flatnonzero(roc.defined):
        out[r] = tpr[r, np.searchsorted(fpr[r], g, side="right") - 1]
    return out


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def decision_columns(y_bin: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """f64 [N, 4]: indicators of tp, fn, fp, tn of a fixed decision predicted bool[N]."""
    y = np.asarray(y_bin).astype(bool)
    pred = np.asarray(predicted, bool)
    return np.stack([y & pred, y & ~pred, ~y & pred, ~y & ~pred], axis=1).astype(np.float64)


def decision_rates(counts: np.ndarray) -> dict[str, np.ndarray]:
    """{sensitivity, specificity, ppv, npv}: f64 [b] from weighted counts f64 [b, 4] of
    (tp, fn, fp, tn) (`weights @ decision_columns(...)`)."""
    tp, fn, fp, tn = np.asarray(counts, np.float64).T
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
    }


def recall_columns(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """f64 [N, 2C]: class indicators, then "of class c and predicted c" (argmax, -1 = tie)."""
    y = np.asarray(labels).astype(np.int64)
    onehot = np.eye(num_classes)[y]
    return np.concatenate([onehot, onehot * (np.asarray(predicted) == y)[:, None]], axis=1)


def balanced_accuracy(counts: np.ndarray) -> np.ndarray:
    """f64 [b]: mean recall over the classes drawn, from weighted counts f64 [b, 2C]
    (`weights @ recall_columns(...)`)."""
    c = np.asarray(counts, np.float64)
    den, num = np.split(c, 2, axis=1)
    recall = _ratio(num, den)
    present = np.isfinite(recall)
    total = np.where(present, recall, 0.0).sum(axis=1)
    count = present.sum(axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def calibration_error_fn(confidence: np.ndarray, outcome: np.ndarray, num_bins: int,
                         prefix: str = "") -> MetricFn:
    """ECE and MCE (`calibration.reliability_bins`' binning) on weights [b, N]:
    {prefix + "ece", prefix + "mce"}: f64 [b]."""
    conf = np.clip(np.asarray(confidence, np.float64).reshape(-1), 0.0, 1.0)
    acc = np.asarray(outcome, np.float64).reshape(-1)
    onehot = np.eye(num_bins + 1)[calibration.bin_index(conf, num_bins)]  # [N, K]
    matrix = np.concatenate([onehot, onehot * conf[:, None], onehot * acc[:, None]], axis=1)

    def fn(weights: np.ndarray) -> dict[str, np.ndarray]:
        count, conf_sum, acc_sum = np.split(np.asarray(weights, np.float64) @ matrix, 3, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            gap = np.where(count > 0, np.abs(acc_sum - conf_sum) / np.maximum(count, 1e-300), 0.0)
        total = count.sum(axis=1)
        ece = np.where(total > 0, (gap * count).sum(axis=1) / np.maximum(total, 1e-300), np.nan)
        return {prefix + "ece": ece, prefix + "mce": np.where(total > 0, gap.max(axis=1), np.nan)}

    return fn


# ---------------------------------------------------------------------------------------------
# The evaluation's metric set.

SPECIFICITIES = (0.90, 0.95)
SENSITIVITIES = (0.90, 0.95)


def level_name(value: float) -> str:
    """0.9 -> "90", 0.95 -> "95" (metric names such as sens_at_spec_90)."""
    return f"{round(value * 100):d}"


def binary_metrics_fn(
    y_bin: np.ndarray,
    score: np.ndarray,
    *,
    threshold: float,
    labels: np.ndarray | None = None,
    predicted: np.ndarray | None = None,
    num_classes: int | None = None,
    pauc_min_tpr: float = 0.8,
    patient_unit: np.ndarray | None = None,
    num_patients: int = 0,
    roc_grid: np.ndarray | None = None,
) -> MetricFn:
    """The metrics of `evaluate` on weights [b, N]: auc, pauc_80, pauc (at pauc_min_tpr),
    average_precision, sensitivity/specificity/ppv/npv at `threshold`, sens_at_spec_90/95,
    spec_at_sens_90/95, balanced_accuracy (with labels, predicted int[N] argmax with ties -1 and
    num_classes), patient_auc (with patient_unit int64[N] = `Units.index` of patient units, the
    first num_patients units being patients), roc_tpr [b, G] (with roc_grid).
    """
    y = np.asarray(y_bin).reshape(-1).astype(np.int64)
    s = np.asarray(score, np.float64).reshape(-1)
    sorted_scores = SortedScores(y, s)
    # Every count-type metric in one matrix product per chunk (weights are read once).
    columns = [decision_columns(y, s >= threshold)]
    with_ba = labels is not None and predicted is not None and num_classes is not None
    if with_ba:
        columns.append(recall_columns(labels, predicted, num_classes))
    matrix = np.concatenate(columns, axis=1)
    patient = None
    if patient_unit is not None and num_patients > 0:
        keep = np.asarray(patient_unit) < num_patients
        unit = np.asarray(patient_unit)[keep]
        p_label = np.zeros(num_patients)
        p_score = np.full(num_patients, -np.inf)
        np.maximum.at(p_label, unit, y[keep])
        np.maximum.at(p_score, unit, s[keep])
        # The weight of a patient is how often it was drawn: that of any of its images.
        first = np.full(num_patients, -1, np.int64)
        rows = np.flatnonzero(keep)
        first[unit[::-1]] = rows[::-1]
        patient = SortedScores(p_label, p_score, rows=first)

    def fn(weights: np.ndarray) -> dict[str, np.ndarray]:
        roc = sorted_scores.roc(weights)
        out = {
            "auc": auc(roc),
            "pauc_80": partial_auc_above_tpr(roc, 0.8),
            "pauc": partial_auc_above_tpr(roc, pauc_min_tpr),
            "average_precision": average_precision(roc),
        }
        counts = np.asarray(weights, np.float64) @ matrix
        out.update(decision_rates(counts[:, :4]))
        for spec in SPECIFICITIES:
            out[f"sens_at_spec_{level_name(spec)}"] = sensitivity_at_specificity(roc, spec)
        for sens in SENSITIVITIES:
            out[f"spec_at_sens_{level_name(sens)}"] = specificity_at_sensitivity(roc, sens)
        if with_ba:
            out["balanced_accuracy"] = balanced_accuracy(counts[:, 4:])
        if patient is not None:
            out["patient_auc"] = patient.auc(weights)
        if roc_grid is not None:
            out["roc_tpr"] = tpr_on_grid(roc, roc_grid)
        return out

    return fn


def group_auc_fn(y_bin: np.ndarray, score: np.ndarray,
                 groups: Mapping[str, Mapping[str, np.ndarray]]) -> MetricFn:
    """AUC within each subgroup on weights [b, N]: {"variable/group": f64 [b]}.

    groups: {variable: {group: bool[N] selection}}.
    """
    y = np.asarray(y_bin).reshape(-1)
    s = np.asarray(score, np.float64).reshape(-1)
    prepared = [
        (f"{var}/{name}", SortedScores(y[sel], s[sel], rows=np.flatnonzero(sel)))
        for var, members in groups.items() for name, sel in members.items()
    ]

    def fn(weights: np.ndarray) -> dict[str, np.ndarray]:
        return {key: sorted_.auc(weights) for key, sorted_ in prepared}

    return fn


@dataclasses.dataclass(frozen=True)
class Settings:
    """num_resamples (0: no intervals), seed, level (e.g. 0.95)."""

    num_resamples: int = 1000
    seed: int = 0
    level: float = 0.95


def intervals(
    fns: Sequence[MetricFn], units: Units, settings: Settings
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Bootstraps all `fns` on the same resamples.

    Returns:
      ({name: [low, high]} for every scalar metric, {name: draws f64[B, ...]}); the first is
      JSON-ready (NaN where no resample defined the metric).
    """
    start = time.perf_counter()

    def joint(weights: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for f in fns:
            out.update(f(weights))
        return out

    draws = bootstrap(joint, units, settings.num_resamples, settings.seed)
    result: dict[str, Any] = {}
    for key, values in draws.items():
        if values.ndim == 1:
            result[key] = list(percentile_interval(values, settings.level))
    result["_seconds"] = time.perf_counter() - start
    result["_num_valid"] = {k: int(np.isfinite(v).sum()) for k, v in draws.items()
                            if v.ndim == 1}
    return result, draws
