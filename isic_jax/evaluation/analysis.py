"""What `evaluate` reports about one split: calibration, operating point, metrics with intervals.

    settings = EvalSettings.from_config(config)
    fitted = fit(preds, malignant_classes, settings, split="val", step=step)  # on validation
    summary, calibrated = analyse(preds, class_names, malignant_classes, settings, fitted)

Order of the steps, and why:
1. `fit` (on the validation fold): the softmax temperature (`calibration.fit_temperature`) on
   the raw probabilities, then the operating threshold (`operating_points.choose_threshold`) on
   the calibrated malignant score, since that is the score `predict` compares with it. The
   threshold for uncalibrated scores (`predict --no-calibration`) is chosen the same way on the
   raw score. Another split reuses the validation fold's fit (evaluate passes it in).
2. `analyse`: every figure of `metrics.classification_metrics` on the calibrated probabilities at
   that threshold, plus the fixed config threshold, sensitivity at specificity 0.90/0.95 and
   specificity at sensitivity 0.90/0.95, calibration before and after (ECE, MCE, NLL, Brier,
   reliability bins), subgroup AUCs, and percentile bootstrap intervals (`bootstrap`) of all of
   them, drawn from one set of resamples (patients where the split has patient ids).

Temperature scaling changes neither the argmax nor, for two classes, the ranking: AUC, pAUC and
balanced accuracy of a binary model are the raw model's; for several classes the malignant score
(a sum of calibrated probabilities) can rank slightly differently.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm

from isic_jax import config_utils
from isic_jax import metrics as isic_metrics
from isic_jax.configs import default
from isic_jax.evaluation import bootstrap, calibration, operating_points, subgroups
from isic_jax.utils import to_json_compatible

# FPR grid of the ROC figure's bootstrap band.
ROC_GRID = np.linspace(0.0, 1.0, 101)
# Metrics given an interval in metrics.json (key + "_ci"), in report order.
CI_METRICS: tuple[str, ...] = (
    "auc", "pauc_80", "pauc", "average_precision", "balanced_accuracy", "sensitivity",
    "specificity", "ppv", "npv", "sens_at_spec_90", "sens_at_spec_95", "spec_at_sens_90",
    "spec_at_sens_95", "patient_auc",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """The `config.eval` keys evaluation reads (see configs/default.py for each)."""

    threshold: float = 0.5
    threshold_method: str = "sensitivity"
    target_sensitivity: float = 0.9
    temperature_scaling: bool = True
    calibration_bins: int = 15
    bootstrap_samples: int = 1000
    bootstrap_seed: int = 0
    ci_level: float = 0.95
    pauc_min_tpr: float = 0.8
    retrieval_top_k: int = 15

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> EvalSettings:
        """From a run's config; keys it lacks (a run saved before they existed) take the
        default preset's values; `overrides` (None = keep) win. Each value is checked.

        Raises:
          config_utils.ConfigError: a bad value, naming the key.
        """
        defaults = default.get_config().eval
        section = config.get("eval", {}) if hasattr(config, "get") else {}
        values = {}
        for field in dataclasses.fields(cls):
            value = overrides.get(field.name)
            if value is None:
                value = section.get(field.name, defaults[field.name])
            config_utils.check_value(f"eval.{field.name}", value)
            values[field.name] = value
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class Fitted:
    """Calibration and operating threshold, fitted on one split of one checkpoint.

    threshold: on the calibrated malignant score (malignant iff score >= threshold);
    threshold_uncalibrated: the same rule on the raw score (temperature 1).
    """

    temperature: float
    threshold: float
    threshold_uncalibrated: float
    method: str
    target_sensitivity: float | None
    fixed_threshold: float
    fitted_on: str
    step: int | None = None

    @property
    def description(self) -> str:
        """How the threshold was chosen, for figures and the model card."""
        if self.method == "sensitivity":
            return f"chosen on {self.fitted_on} for sensitivity >= {self.target_sensitivity:.2f}"
        if self.method == "youden":
            return f"Youden's J on {self.fitted_on}"
        return "fixed (config.eval.threshold)"

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "description": self.description}

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any]) -> Fitted | None:
        """The fit recorded in a metrics.json (None when it has none: an older evaluation)."""
        op, cal = metrics.get("operating_point"), metrics.get("calibration")
        if not op or not cal or cal.get("temperature") is None:
            return None
        return cls(
            temperature=float(cal["temperature"]),
            threshold=float(op["threshold"]),
            threshold_uncalibrated=float(op["threshold_uncalibrated"]),
            method=str(op["method"]),
            target_sensitivity=op.get("target_sensitivity"),
            fixed_threshold=float(op.get("fixed_threshold", 0.5)),
            fitted_on=str(op.get("fitted_on", metrics.get("split", "val"))),
            step=metrics.get("step"),
        )


def _malignant(probs: np.ndarray, labels: np.ndarray, malignant: Sequence[int]):
    return isic_metrics.malignant_score(probs, labels, malignant)


def fit(
    probs: Any,
    labels: Any,
    malignant_classes: Sequence[int],
    settings: EvalSettings,
    *,
    split: str,
    step: int | None = None,
) -> Fitted:
    """Fits the temperature (when settings.temperature_scaling) and the operating threshold on
    raw probabilities f[N, C] and labels int[N] of `split`."""
    raw = np.asarray(probs, np.float64)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    t = calibration.fit_temperature(raw, y) if settings.temperature_scaling else 1.0
    y_bin, raw_score = _malignant(raw, y, malignant_classes)
    _, cal_score = _malignant(calibration.apply_temperature(raw, t), y, malignant_classes)

    def choose(score: np.ndarray) -> float:
        return operating_points.choose_threshold(
            y_bin, score, settings.threshold_method,
            target_sensitivity=settings.target_sensitivity, fixed=settings.threshold)

    return Fitted(
        temperature=float(t),
        threshold=choose(cal_score),
        threshold_uncalibrated=choose(raw_score),
        method=settings.threshold_method,
        target_sensitivity=(float(settings.target_sensitivity)
                            if settings.threshold_method == "sensitivity" else None),
        fixed_threshold=float(settings.threshold),
        fitted_on=split,
        step=step,
    )


def _calibration_block(probs: np.ndarray, y: np.ndarray, y_bin: np.ndarray, score: np.ndarray,
                       num_bins: int) -> dict[str, Any]:
    rel = calibration.binary_calibration(score, y_bin, num_bins)
    out = {
        "ece": rel["ece"],
        "mce": rel["mce"],
        "nll": calibration.nll(probs, y),
        "brier": float(skm.brier_score_loss(y_bin, np.clip(score, 0, 1))) if y.size else math.nan,
        "bins": rel["bins"],
    }
    if probs.shape[1] > 2:
        top = calibration.top_label_calibration(probs, y, num_bins)
        out["top_label_ece"], out["top_label_mce"] = top["ece"], top["mce"]
    return out


def metadata_of(preds: Any) -> dict[str, Any]:
    """The subgroup metadata of `predictions.Predictions` (fitzpatrick when it has it)."""
    keys = ("sex", "age", "anatom_site", "patient_id", "fitzpatrick", "source")
    return {k: getattr(preds, k) for k in keys if getattr(preds, k, None) is not None}


def analyse(
    preds: Any,
    class_names: Sequence[str],
    malignant_classes: Sequence[int],
    settings: EvalSettings,
    fitted: Fitted,
) -> tuple[dict[str, Any], np.ndarray]:
    """Everything metrics.json holds about one split's predictions (see the module docstring).

    Args:
      preds: `predictions.Predictions` (probs raw float32 [N, C], labels, patient_id, sex, age,
        anatom_site, optionally fitzpatrick).
      class_names, malignant_classes: the task's classes.
      settings: evaluation settings. fitted: `fit` of the validation fold (or of this split).

    Returns:
      (JSON-ready metrics, calibrated probabilities f64 [N, C]).
    """
    raw = np.asarray(preds.probs, np.float64)
    y = np.asarray(preds.labels).reshape(-1).astype(np.int64)
    cal = calibration.apply_temperature(raw, fitted.temperature)
    has_patients = bool(np.any(np.asarray(preds.patient_id) != ""))
    pids = preds.patient_id if has_patients else None
    threshold = fitted.threshold

    result = dict(isic_metrics.classification_metrics(
        cal, y, class_names, malignant_classes=malignant_classes, threshold=threshold,
        patient_ids=pids, pauc_min_tpr=settings.pauc_min_tpr,
        retrieval_top_k=settings.retrieval_top_k,
    ))
    result["loss"] = calibration.nll(raw, y)  # the model's own (uncalibrated) NLL, as training's
    y_bin, score = _malignant(cal, y, malignant_classes)
    _, raw_score = _malignant(raw, y, malignant_classes)
    result["probabilities"] = (
        f"calibrated: softmax(log(p) / {fitted.temperature:.4g}), temperature fitted on "
        f"{fitted.fitted_on}" if fitted.temperature != 1.0 else "raw model probabilities"
    )
    rates = isic_metrics.binary_rates(y_bin, score >= threshold)
    result["operating_point"] = {
        **fitted.to_json(),
        **{k: rates[k] for k in ("sensitivity", "specificity", "ppv", "npv")},
    }
    fixed = isic_metrics.binary_rates(y_bin, score >= fitted.fixed_threshold)
    result["fixed_threshold"] = {
        "threshold": fitted.fixed_threshold,
        **{k: fixed[k] for k in ("sensitivity", "specificity", "ppv", "npv")},
    }
    for spec in bootstrap.SPECIFICITIES:
        result[f"sens_at_spec_{bootstrap.level_name(spec)}"] = (
            operating_points.sensitivity_at_specificity(y_bin, score, spec))
    for sens in bootstrap.SENSITIVITIES:
        result[f"spec_at_sens_{bootstrap.level_name(sens)}"] = (
            operating_points.specificity_at_sensitivity(y_bin, score, sens))
    bins = int(settings.calibration_bins)
    result["calibration"] = {
        "num_bins": bins,
        "binning": "equal-width, as torchmetrics (confidence = malignant score)",
        "temperature": fitted.temperature,
        "fitted_on": fitted.fitted_on,
        "before": _calibration_block(raw, y, y_bin, raw_score, bins),
        "after": _calibration_block(cal, y, y_bin, score, bins),
    }
    result["calibration"]["ece_before"] = result["calibration"]["before"]["ece"]
    result["calibration"]["ece_after"] = result["calibration"]["after"]["ece"]

    members = subgroups.subgroup_members(metadata_of(preds), y.size)
    intervals: dict[str, Any] = {}
    if settings.bootstrap_samples > 0 and y.size > 0:
        intervals = _bootstrap(result, preds, cal, y, y_bin, score, raw_score, threshold,
                               members, settings)
    by_source = _by_source(preds, cal, y, class_names, malignant_classes, threshold, settings)
    if by_source:
        result["by_source"] = by_source
    result["subgroup_auc"] = subgroups.subgroup_auc(
        y_bin, score, metadata_of(preds),
        {k: v for k, v in intervals.items() if "/" in k},
    )
    return to_json_compatible(result), cal


# What metrics.json reports per source release of a several-release run.
SOURCE_METRICS = ("auc", "pauc_80", "balanced_accuracy", "sensitivity", "specificity",
                  "average_precision")


def _by_source(preds: Any, cal: np.ndarray, y: np.ndarray, class_names: Sequence[str],
               malignant_classes: Sequence[int], threshold: float, settings: EvalSettings
               ) -> dict[str, Any] | None:
    """{release: {num_examples, num_malignant, metrics at the operating threshold}} when the
    split holds several source releases (e.g. the AUC on the ISIC 2020 images alone), else
    None."""
    source = getattr(preds, "source", None)
    names = subgroups.as_names(source) if source is not None else None
    if names is None or len(set(names.tolist()) - {subgroups.UNKNOWN}) < 2:
        return None
    out = {}
    for name in sorted(set(names.tolist())):
        sel = names == name
        part = isic_metrics.classification_metrics(
            cal[sel], y[sel], class_names, malignant_classes=malignant_classes,
            threshold=threshold, pauc_min_tpr=settings.pauc_min_tpr)
        out[name] = {"num_examples": int(sel.sum()), "num_malignant": part.get("num_malignant"),
                     **{k: part.get(k) for k in SOURCE_METRICS}}
    return out


def _bootstrap(
    result: dict[str, Any],
    preds: Any,
    cal: np.ndarray,
    y: np.ndarray,
    y_bin: np.ndarray,
    score: np.ndarray,
    raw_score: np.ndarray,
    threshold: float,
    members: dict[str, dict[str, np.ndarray]],
    settings: EvalSettings,
) -> dict[str, Any]:
    """Adds the intervals (key + "_ci"), the ROC band and a "bootstrap" entry to `result`;
    returns the subgroup intervals ("variable/group": [low, high])."""
    start = time.perf_counter()
    has_patients = bool(np.any(np.asarray(preds.patient_id) != ""))
    units = bootstrap.resampling_units(preds.patient_id if has_patients else None, y.size)
    bins = int(settings.calibration_bins)
    fns = [
        bootstrap.binary_metrics_fn(
            y_bin, score, threshold=threshold, labels=y,
            predicted=isic_metrics.argmax_ties_wrong(cal), num_classes=cal.shape[1],
            pauc_min_tpr=settings.pauc_min_tpr,
            patient_unit=units.index if units.kind == "patient" else None,
            num_patients=units.num_patients, roc_grid=ROC_GRID,
        ),
        bootstrap.calibration_error_fn(score, y_bin, bins, prefix="after_"),
        bootstrap.calibration_error_fn(raw_score, y_bin, bins, prefix="before_"),
    ]
    if members:
        fns.append(bootstrap.group_auc_fn(y_bin, score, members))
    boot = bootstrap.Settings(int(settings.bootstrap_samples), int(settings.bootstrap_seed),
                              float(settings.ci_level))
    found, draws = bootstrap.intervals(fns, units, boot)
    for key in CI_METRICS:
        if key in found and (key != "patient_auc" or units.kind == "patient"):
            result[f"{key}_ci"] = found[key]
    for when in ("before", "after"):
        for name in ("ece", "mce"):
            result["calibration"][when][f"{name}_ci"] = found[f"{when}_{name}"]
    band = draws["roc_tpr"]
    alpha = (1.0 - boot.level) / 2.0
    with np.errstate(all="ignore"):
        ok = np.isfinite(band).any(axis=1)
        low, high = np.nanquantile(band[ok], [alpha, 1.0 - alpha], axis=0) if ok.any() else (
            np.full(ROC_GRID.size, np.nan), np.full(ROC_GRID.size, np.nan))
    result["roc_band"] = {"fpr": ROC_GRID.tolist(), "low": low.tolist(), "high": high.tolist(),
                          "pointwise": "TPR at FPR <= each grid value, per resample"}
    result["bootstrap"] = {
        "method": "percentile bootstrap",
        "unit": units.kind,
        "num_units": units.count,
        "num_resamples": boot.num_resamples,
        "seed": boot.seed,
        "level": boot.level,
        "num_valid": {k: v for k, v in found["_num_valid"].items() if "/" not in k},
        "seconds": round(time.perf_counter() - start, 3),
        "decision_metrics": "at the fixed operating threshold (not re-chosen per resample)",
    }
    return {k: v for k, v in found.items() if "/" in k}
