"""Two evaluated runs on the same split: the paired difference in AUC (and pAUC, AP) with its
interval and p-value.

    result = compare_runs("runs/a", "runs/b", split="val")
    result["auc"]["difference"], result["auc"]["ci"], result["auc"]["p_value"]

Each run is a workdir with `eval/<split>/predictions.csv` (written by `isic-jax evaluate`), or
such an eval folder itself. The two must hold the same images with the same labels (the same
split of the same prepared dataset): anything else is refused with the first image that differs.

Two analyses of the difference B - A:
- paired bootstrap: the same resamples of patients (where the predictions have patient ids, else
  of images) for both runs; percentile interval, and the two-sided p-value 2 x min(P(d <= 0),
  P(d >= 0)) with the (1 + count) / (1 + B) correction;
- DeLong's test (AUC only, `delong.py`): a normal approximation that treats the images as
  independent (too optimistic when patients have several images).
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from isic_jax import metrics as isic_metrics
from isic_jax.evaluation import bootstrap, delong
from isic_jax.utils import to_json_compatible

PREDICTIONS_FILE = "predictions.csv"
METRICS_FILE = "metrics.json"
COMPARED = ("auc", "pauc_80", "average_precision")


class CompareError(ValueError):
    """The two runs cannot be compared (missing predictions, other images or labels)."""


def eval_folder(run: str | os.PathLike, split: str) -> pathlib.Path:
    """The folder holding predictions.csv of a run (a workdir or an eval folder)."""
    path = pathlib.Path(run)
    for folder in (path / "eval" / split, path):
        if (folder / PREDICTIONS_FILE).is_file():
            return folder
    raise CompareError(
        f"{path / 'eval' / split / PREDICTIONS_FILE} not found: run `isic-jax evaluate "
        f"--workdir {path} --split {split}` first (or give the eval folder itself)"
    )


def read_predictions(folder: pathlib.Path) -> dict[str, Any]:
    """{image_id str[N], patient_id str[N], label int[N], score f64[N] (malignant probability),
    metrics (metrics.json or {})} of an eval folder."""
    metrics = {}
    if (folder / METRICS_FILE).is_file():
        metrics = json.loads((folder / METRICS_FILE).read_text())
    path = folder / PREDICTIONS_FILE
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    if "image_id" not in fields or "label" not in fields:
        raise CompareError(f"{path}: no image_id/label columns (not written by isic-jax evaluate)")
    names = metrics.get("class_names") or [c[len("prob_"):] for c in fields
                                            if c.startswith("prob_")]
    malignant = metrics.get("malignant_classes") or ([1] if len(names) == 2 else None)
    if "malignant_probability" in fields:
        score = [float(r["malignant_probability"]) for r in rows]
    elif malignant is not None:
        cols = [f"prob_{names[c]}" for c in malignant]
        score = [sum(float(r[c]) for c in cols) for r in rows]
    else:
        raise CompareError(f"{path}: no malignant_probability column and no malignant_classes "
                           f"in {folder / METRICS_FILE}")
    try:
        labels = np.asarray([int(r["label"]) for r in rows], np.int64)
    except ValueError as e:
        raise CompareError(f"{path}: a label is not an integer ({e})") from e
    return {
        "image_id": np.asarray([r["image_id"] for r in rows], dtype=object),
        "patient_id": np.asarray([r.get("patient_id", "") for r in rows], dtype=object),
        "label": labels,
        "is_malignant": (np.isin(labels, malignant).astype(np.int64) if malignant is not None
                         else labels),
        "score": np.asarray(score, np.float64),
        "metrics": metrics,
    }


def align(a: dict[str, Any], b: dict[str, Any], names: Sequence[str]) -> np.ndarray:
    """Row order of b that matches a's images: int64[N]. Raises CompareError naming the first
    image that only one run has, or whose label differs."""
    ids_a, ids_b = list(a["image_id"]), list(b["image_id"])
    if len(set(ids_a)) != len(ids_a) or len(set(ids_b)) != len(ids_b):
        raise CompareError("an image appears twice in a predictions.csv")
    pos_b = {i: k for k, i in enumerate(ids_b)}
    only_a = [i for i in ids_a if i not in pos_b]
    only_b = sorted(set(ids_b) - set(ids_a))
    if only_a or only_b:
        raise CompareError(
            f"the runs were evaluated on different images ({len(ids_a)} in {names[0]}, "
            f"{len(ids_b)} in {names[1]}; e.g. {(only_a or only_b)[0]!r} is only in "
            f"{names[0] if only_a else names[1]}): compare runs on the same split of the same "
            "prepared dataset")
    order = np.asarray([pos_b[i] for i in ids_a], np.int64)
    differ = np.flatnonzero(a["label"] != b["label"][order])
    if differ.size:
        i = int(differ[0])
        raise CompareError(
            f"image {ids_a[i]!r} has label {int(a['label'][i])} in {names[0]} but "
            f"{int(b['label'][order][i])} in {names[1]} ({differ.size} labels differ)")
    return order


def _paired_fn(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> bootstrap.MetricFn:
    sa, sb = bootstrap.SortedScores(y, score_a), bootstrap.SortedScores(y, score_b)

    def metrics_of(roc: bootstrap.WeightedRoc) -> dict[str, np.ndarray]:
        return {"auc": bootstrap.auc(roc), "pauc_80": bootstrap.partial_auc_above_tpr(roc, 0.8),
                "average_precision": bootstrap.average_precision(roc)}

    def fn(weights: np.ndarray) -> dict[str, np.ndarray]:
        ma, mb = metrics_of(sa.roc(weights)), metrics_of(sb.roc(weights))
        return {k: mb[k] - ma[k] for k in ma}

    return fn


def bootstrap_p_value(differences: np.ndarray) -> float:
    """Two-sided p-value of "no difference" from paired bootstrap differences f[B]."""
    d = np.asarray(differences, np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return float("nan")
    low = (1 + np.sum(d <= 0)) / (1 + d.size)
    high = (1 + np.sum(d >= 0)) / (1 + d.size)
    return float(min(1.0, 2.0 * min(low, high)))


def compare_runs(
    run_a: str | os.PathLike,
    run_b: str | os.PathLike,
    split: str = "val",
    *,
    num_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Compares two evaluated runs on `split` (see the module docstring).

    Returns:
      JSON-ready {"runs": {a, b}, "split", "num_examples", "num_malignant", "bootstrap": {unit,
      num_units, num_resamples, seed, level, seconds}, metric: {a, b, difference (b - a), ci,
      p_value} for auc, pauc_80, average_precision; "auc" also has "delong": {difference, se,
      z, p_value, ci}}.

    Raises:
      CompareError: a run without predictions, or the runs hold other images or labels.
    """
    if num_resamples < 1:
        raise CompareError(f"the paired bootstrap needs >= 1 resample, got {num_resamples}")
    folders = [eval_folder(run_a, split), eval_folder(run_b, split)]
    names = [str(run_a), str(run_b)]
    a, b = (read_predictions(f) for f in folders)
    order = align(a, b, names)
    y = a["is_malignant"]
    sa, sb = a["score"], b["score"][order]
    if y.min() == y.max():
        raise CompareError("the split holds one class only: AUCs are undefined")
    start = time.perf_counter()
    has_patients = bool(np.any(a["patient_id"] != ""))
    units = bootstrap.resampling_units(a["patient_id"] if has_patients else None, y.size)
    draws = bootstrap.bootstrap(_paired_fn(y, sa, sb), units, num_resamples, seed)
    seconds = time.perf_counter() - start
    point = {
        key: (fn(y, sa), fn(y, sb))
        for key, fn in (("auc", isic_metrics.roc_auc),
                        ("pauc_80", isic_metrics.partial_auc_above_tpr),
                        ("average_precision", isic_metrics.average_precision))
    }
    result: dict[str, Any] = {
        "runs": {"a": str(folders[0]), "b": str(folders[1])},
        "split": split,
        "num_examples": int(y.size),
        "num_malignant": int(y.sum()),
        "bootstrap": {"method": "paired percentile bootstrap", "unit": units.kind,
                      "num_units": units.count, "num_resamples": num_resamples, "seed": seed,
                      "level": level, "seconds": round(seconds, 3)},
    }
    for key in COMPARED:
        va, vb = point[key]
        result[key] = {"a": va, "b": vb, "difference": vb - va,
                       "ci": list(bootstrap.percentile_interval(draws[key], level)),
                       "p_value": bootstrap_p_value(draws[key])}
    result["auc"]["delong"] = {k: v for k, v in delong.delong_test(y, sa, sb, level).items()
                               if k not in ("auc_a", "auc_b")}
    return to_json_compatible(result)


def summary_text(result: dict[str, Any]) -> str:
    """The comparison as a few lines of text."""
    boot = result["bootstrap"]
    lines = [f"{result['split']} split: {result['num_examples']} images "
             f"({result['num_malignant']} malignant); A = {result['runs']['a']}, "
             f"B = {result['runs']['b']}"]
    for key, label in (("auc", "AUC"), ("pauc_80", "pAUC above 80% TPR"),
                       ("average_precision", "average precision")):
        r = result[key]
        ci = r["ci"]
        lines.append(f"  {label:<20} A {r['a']:.4f}  B {r['b']:.4f}  B - A {r['difference']:+.4f} "
                     f"({boot['level']:.0%} CI {ci[0]:+.4f} to {ci[1]:+.4f}), p = "
                     f"{r['p_value']:.4g}")
    d = result["auc"]["delong"]
    if d.get("p_value") is not None:
        lines.append(f"  DeLong (images independent): AUC B - A {d['difference']:+.4f}, "
                     f"SE {d['se']:.4f}, z {d['z']:.2f}, p = {d['p_value']:.4g}")
    lines.append(f"  paired bootstrap: {boot['num_resamples']} resamples of {boot['num_units']} "
                 f"{boot['unit']}s (seed {boot['seed']}) in {boot['seconds']:.2f} s")
    return "\n".join(lines)
