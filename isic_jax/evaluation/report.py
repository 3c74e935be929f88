"""Evaluation report: PNG figures beside `metrics.json`, and the AUC by subgroup.

    breakdown = write_report(out_dir, probs=probs, labels=labels, class_names=names,
                             malignant_classes=[1], threshold=0.5, metadata=meta)
    # out_dir/{roc,pr,confusion_matrix,calibration,score_distribution,auc_by_subgroup}.png

The binary view (ROC, precision-recall, calibration, score histograms, subgroups) uses the
malignant score, the sum of the malignant classes' probabilities, against "is malignant", as
`metrics.classification_metrics` does. The confusion matrix is over the classes for a multi-class
task (argmax, ties left out) and at `threshold` for a binary one, i.e. the decision that
`metrics.json`'s sensitivity and specificity describe.

Figures are drawn on `matplotlib.figure.Figure` objects (Agg canvas, no pyplot state), so this
runs headless and leaks no figures.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure
from sklearn import metrics as skm

from isic_jax import metrics as isic_metrics
from isic_jax.evaluation import calibration
from isic_jax.evaluation.subgroups import (
    AGE_BANDS,
    SEX_NAMES,
    TITLES,
    age_bands,
    subgroup_auc,
)

__all__ = [
    "AGE_BANDS",
    "FIGURES",
    "SEX_NAMES",
    "age_bands",
    "subgroup_auc",
    "write_report",
]

MIN_TPR = 0.8

FIGURES: tuple[str, ...] = (
    "roc.png",
    "pr.png",
    "operating_point.png",
    "confusion_matrix.png",
    "calibration.png",
    "score_distribution.png",
    "auc_by_subgroup.png",
)

_BENIGN_COLOR = "tab:blue"
_MALIGNANT_COLOR = "tab:red"
_DPI = 110
# matplotlib 3.10 replaced boxplot's `vert` by `orientation` (and deprecates `vert` in 3.11).
_HORIZONTAL = (
    {"orientation": "horizontal"}
    if tuple(int(v) for v in matplotlib.__version__.split(".")[:2]) >= (3, 10)
    else {"vert": False}
)


# ---------------------------------------------------------------------------------------------
# Figures


def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.4, 5.2), **kw):
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _save(fig: Figure, path: pathlib.Path) -> None:
    fig.savefig(path, dpi=_DPI)


def _no_data(ax, message: str) -> None:
    ax.text(
        0.5, 0.5, message, ha="center", va="center", fontsize=11, wrap=True, transform=ax.transAxes
    )
    ax.set_xticks([])
    ax.set_yticks([])


def _line(display: Any) -> Any:
    line = display.line_
    return line[0] if isinstance(line, list) else line


def _both(y: np.ndarray) -> bool:
    return y.size > 0 and 0 < int(y.sum()) < y.size


def _roc_axes(ax, xlabel: str, ylabel: str) -> None:
    """Square unit ROC axes, with a margin so that curves along the border stay visible."""
    ax.set(xlabel=xlabel, ylabel=ylabel, xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal")


def ci_text(summary: Mapping[str, Any] | None, key: str, digits: int = 3) -> str:
    """" (95% CI a-b)" from summary[f"{key}_ci"] and the bootstrap level, or ""."""
    if not summary:
        return ""
    ci = summary.get(f"{key}_ci")
    if not ci or ci[0] is None or ci[1] is None:
        return ""
    level = (summary.get("bootstrap") or {}).get("level", 0.95)
    return f" ({level:.0%} CI {ci[0]:.{digits}f}-{ci[1]:.{digits}f})"


def plot_roc(
    path: pathlib.Path,
    y_bin: np.ndarray,
    score: np.ndarray,
    threshold: float,
    probs: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    summary: Mapping[str, Any] | None = None,
) -> None:
    """ROC of malignant vs benign with its bootstrap band, TPR >= 0.8 region shaded, the
    operating point; multi-class adds one-vs-rest curves."""
    multi = len(class_names) > 2
    fig, axes = _figure(1, 2 if multi else 1, size=(12.4, 6.0) if multi else (6.6, 6.0))
    ax = axes[0, 0]
    n_pos, n = int(y_bin.sum()), y_bin.size
    ax.set_title(f"ROC: malignant vs benign (n={n}, {n_pos} malignant)")
    if _both(y_bin):
        disp = skm.RocCurveDisplay.from_predictions(y_bin, score, name="malignant score", ax=ax)
        auc = isic_metrics.roc_auc(y_bin, score)
        _line(disp).set(color="tab:blue", linewidth=2,
                        label=f"AUC = {auc:.3f}{ci_text(summary, 'auc')}")
        band = (summary or {}).get("roc_band")
        if band:
            level = (summary.get("bootstrap") or {}).get("level", 0.95)
            low = np.asarray([np.nan if v is None else v for v in band["low"]], np.float64)
            high = np.asarray([np.nan if v is None else v for v in band["high"]], np.float64)
            ax.fill_between(band["fpr"], low, high, step="post", color="tab:blue", alpha=0.18,
                            linewidth=0, label=f"{level:.0%} bootstrap band "
                            f"({summary['bootstrap']['unit']}s resampled)")
        fpr, tpr = disp.fpr, disp.tpr  # the curve just drawn
        pauc = isic_metrics.partial_auc_above_tpr(y_bin, score, MIN_TPR)
        # The area between the curve and TPR = 0.8 is exactly the Kaggle pAUC (see metrics).
        ax.fill_between(
            fpr,
            MIN_TPR,
            tpr,
            where=tpr >= MIN_TPR,
            interpolate=True,
            color="tab:orange",
            alpha=0.35,
            label=f"pAUC above {MIN_TPR:.0%} TPR = {pauc:.4f}{ci_text(summary, 'pauc_80', 4)}",
        )
        ax.axhline(MIN_TPR, color="tab:orange", linestyle=":", linewidth=1)
        sens, spec = isic_metrics.sensitivity_specificity(y_bin, score, threshold)
        op = (summary or {}).get("operating_point") or {}
        how = f", {op['description']}" if op.get("description") else ""
        ax.plot(
            1 - spec,
            sens,
            "o",
            color="k",
            markersize=7,
            label=f"threshold {threshold:.3g}{how}:\nsens {sens:.2f}, spec {spec:.2f}",
        )
        ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="chance (AUC = 0.5)")
        ax.legend(loc="lower right", fontsize=8)
    else:
        _no_data(ax, "ROC undefined: only one class in the labels")
    _roc_axes(ax, "False positive rate (1 - specificity)", "True positive rate (sensitivity)")
    if multi:
        ax = axes[0, 1]
        ax.set_title("ROC: each class vs the rest")
        drawn = False
        for c, name in enumerate(class_names):
            yc = (labels == c).astype(np.int64)
            if not _both(yc):
                continue
            disp = skm.RocCurveDisplay.from_predictions(yc, probs[:, c], name=name, ax=ax)
            auc = isic_metrics.roc_auc(yc, probs[:, c])
            _line(disp).set_label(f"{name} (n={int(yc.sum())}, AUC = {auc:.3f})")
            drawn = True
        if drawn:
            ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1)
            ax.legend(loc="lower right", fontsize=8)
        else:
            _no_data(ax, "no class with both positives and negatives")
        _roc_axes(ax, "False positive rate", "True positive rate")
    _save(fig, path)


def plot_pr(path: pathlib.Path, y_bin: np.ndarray, score: np.ndarray, threshold: float,
            summary: Mapping[str, Any] | None = None) -> None:
    """Precision-recall of the malignant score, with the prevalence (chance) line."""
    fig, axes = _figure(size=(6.6, 5.6))
    ax = axes[0, 0]
    n_pos, n = int(y_bin.sum()), y_bin.size
    ax.set_title(f"Precision-recall: malignant (n={n}, {n_pos} malignant)")
    if _both(y_bin):
        disp = skm.PrecisionRecallDisplay.from_predictions(
            y_bin, score, name="malignant score", ax=ax
        )
        ap = disp.average_precision
        _line(disp).set(color="tab:blue", linewidth=2,
                        label=f"AP = {ap:.4f}{ci_text(summary, 'average_precision', 3)}")
        prevalence = n_pos / n
        ax.axhline(
            prevalence,
            linestyle="--",
            color="grey",
            linewidth=1,
            label=f"chance (prevalence {prevalence:.3f})",
        )
        pred = score >= threshold
        tp = int(np.sum(pred & (y_bin == 1)))
        if pred.any():
            precision, recall = tp / int(pred.sum()), tp / n_pos
            ax.plot(
                recall,
                precision,
                "o",
                color="k",
                markersize=7,
                label=f"threshold {threshold:g}: recall {recall:.2f}, precision {precision:.2f}",
            )
        # Lower left: a useful model's curve runs along the top (where "upper right" hid it and
        # the threshold point), and the chance line of skin-lesion data is near the bottom.
        ax.legend(loc="lower left", fontsize=9)
    else:
        _no_data(ax, "precision-recall undefined: only one class in the labels")
    ax.set(
        xlabel="Recall (sensitivity)",
        ylabel="Precision (PPV)",
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.05),
    )
    _save(fig, path)


def plot_confusion(
    path: pathlib.Path,
    probs: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    y_bin: np.ndarray,
    score: np.ndarray,
    threshold: float,
) -> None:
    """Counts and row-normalised (recall) confusion matrices."""
    if len(class_names) > 2:
        cm = isic_metrics.confusion_matrix(labels, probs)
        names = list(class_names)
        how = "argmax over classes (ties left out)"
    else:
        pred = (score >= threshold).astype(np.int64)
        cm = skm.confusion_matrix(y_bin, pred, labels=[0, 1])
        names = ["benign", "malignant"]
        how = f"malignant iff score >= {threshold:g}"
    k = len(names)
    side = max(4.6, 0.62 * k + 2.4)
    # Extra height: the square matrices then bind on width, and constrained layout (which does not
    # foresee fixed-aspect axes) keeps the rotated tick labels and titles inside the figure. Two
    # classes have short horizontal labels: less is needed, and more would be blank bands.
    fig, axes = _figure(1, 2, size=(2 * side + 1.0, side + (1.4 if k > 2 else 0.6)))
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, np.float64), where=rows > 0)
    rotation = 45 if k > 2 else "horizontal"
    small = {"fontsize": 8} if k > 5 else {}
    skm.ConfusionMatrixDisplay(cm, display_labels=names).plot(
        ax=axes[0, 0],
        cmap="Blues",
        values_format="d",
        colorbar=False,
        xticks_rotation=rotation,
        text_kw=small,
    )
    axes[0, 0].set_title(f"Counts (n={int(cm.sum())})")
    skm.ConfusionMatrixDisplay(norm, display_labels=names).plot(
        ax=axes[0, 1],
        cmap="Blues",
        values_format=".2f",
        colorbar=False,
        xticks_rotation=rotation,
        text_kw=small,
        im_kw={"vmin": 0.0, "vmax": 1.0},
    )
    axes[0, 1].set_title("Normalised by true class (row = recall)")
    for ax in axes.flat:
        ax.set(xlabel="Predicted", ylabel="True")
    fig.suptitle(f"Confusion matrix: {how}")
    _save(fig, path)


def plot_calibration(
    path: pathlib.Path,
    y_bin: np.ndarray,
    score: np.ndarray,
    raw_score: np.ndarray | None = None,
    temperature: float | None = None,
    num_bins: int = calibration.DEFAULT_BINS,
    summary: Mapping[str, Any] | None = None,
) -> None:
    """Reliability diagram of the malignant score in `num_bins` equal-width bins (the ECE's
    bins), before temperature scaling (raw_score) and after (score), over the histogram."""
    fig, axes = _figure(2, 1, size=(6.6, 7.4), height_ratios=[3, 1.3], sharex=True)
    ax, ax_hist = axes[0, 0], axes[1, 0]
    n_pos, n = int(y_bin.sum()), y_bin.size
    ax.set_title(f"Calibration of the malignant score (n={n}, {n_pos} malignant)")
    if _both(y_bin):
        curves = []
        if raw_score is not None and temperature is not None and temperature != 1.0:
            curves.append(("before temperature scaling", raw_score, "tab:orange", "s"))
            curves.append((f"after (T = {temperature:.3g})", score, "tab:blue", "o"))
        else:
            curves.append(("malignant score", score, "tab:blue", "o"))
        for (name, values, color, marker), when in zip(
                curves, ("before", "after") if len(curves) == 2 else ("after",), strict=True):
            rel = calibration.binary_calibration(values, y_bin, num_bins)
            ci = (((summary or {}).get("calibration") or {}).get(when) or {}).get("ece_ci")
            ece_ci = f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci and None not in ci else ""
            xs = [b["confidence"] for b in rel["bins"]]
            ys = [b["accuracy"] for b in rel["bins"]]
            brier = skm.brier_score_loss(y_bin, np.clip(values, 0.0, 1.0))
            ax.plot(xs, ys, marker=marker, color=color, linewidth=1.5, markersize=5,
                    label=f"{name}: ECE {rel['ece']:.3f}{ece_ci}, MCE {rel['mce']:.3f}, "
                          f"Brier {brier:.3f}")
        # Images per bin of the last (reported) curve: a bin of 3 images swings as far as one of
        # 300 and should not be read the same.
        for b in rel["bins"]:
            ax.annotate(
                f"{b['count']}",
                (b["confidence"], b["accuracy"]),
                xytext=(0, -13 if b["accuracy"] > 0.9 else 8),
                textcoords="offset points",
                ha="center",
                va="center",
                fontsize=7,
                color=color,
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85},
                zorder=5,
            )
        ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfectly calibrated")
        ax.legend(
            loc="upper left",
            fontsize=8,
            title=f"{num_bins} equal-width bins; numbers: images per bin",
            title_fontsize=8,
            alignment="left",
        )
    else:
        _no_data(ax, "calibration undefined: only one class in the labels")
    ax.set(xlabel="", ylabel="Fraction malignant (per bin)", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    bins = np.linspace(0.0, 1.0, 21)
    ax_hist.hist(np.clip(score, 0, 1), bins=bins, color="grey", edgecolor="white")
    ax_hist.set(xlabel="Predicted malignant probability (mean per bin)", ylabel="Images (log)")
    if n:
        ax_hist.set_yscale("log")
        # Plain numbers (40, 100) rather than 4x10^1: LogFormatter labels minor ticks only when
        # the range spans few decades, as the default does.
        ax_hist.yaxis.set_major_formatter(ticker.LogFormatter())
        ax_hist.yaxis.set_minor_formatter(ticker.LogFormatter(minor_thresholds=(2, 0.5)))
    _save(fig, path)


def plot_operating_point(
    path: pathlib.Path,
    y_bin: np.ndarray,
    score: np.ndarray,
    threshold: float,
    summary: Mapping[str, Any] | None = None,
) -> None:
    """Sensitivity, specificity and PPV as functions of the threshold, the chosen one marked."""
    fig, axes = _figure(size=(7.0, 5.8))
    ax = axes[0, 0]
    n_pos, n = int(y_bin.sum()), y_bin.size
    ax.set_title(f"Operating point on the malignant score (n={n}, {n_pos} malignant)")
    if _both(y_bin):
        fpr, tpr, thr = skm.roc_curve(y_bin, score, drop_intermediate=False)
        finite = np.isfinite(thr)
        thr, fpr, tpr = thr[finite], fpr[finite], tpr[finite]
        called = tpr * n_pos + fpr * (n - n_pos)
        ppv = np.divide(tpr * n_pos, called, out=np.full(called.shape, np.nan), where=called > 0)
        x = np.clip(thr, 0.0, 1.0)
        ax.step(x, tpr, where="post", color=_MALIGNANT_COLOR, label="sensitivity")
        ax.step(x, 1 - fpr, where="post", color=_BENIGN_COLOR, label="specificity")
        ax.step(x, ppv, where="post", color="tab:green", linestyle="--", linewidth=1,
                label=f"PPV (prevalence {n_pos / n:.3f})")
        sens, spec = isic_metrics.sensitivity_specificity(y_bin, score, threshold)
        op = (summary or {}).get("operating_point") or {}
        how = f" ({op['description']})" if op.get("description") else ""
        ax.axvline(threshold, color="k", linestyle="--", linewidth=1,
                   label=f"threshold {threshold:.3g}{how}:\nsens {sens:.2f}"
                         f"{ci_text(summary, 'sensitivity', 2)}, spec {spec:.2f}"
                         f"{ci_text(summary, 'specificity', 2)}")
        # Below the axes: inside, it hides the curves wherever it goes.
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8)
    else:
        _no_data(ax, "operating point undefined: only one class in the labels")
    ax.set(xlabel="Threshold on the malignant score (malignant iff score >= threshold)",
           ylabel="Rate", xlim=(0, 1), ylim=(-0.01, 1.01))
    _save(fig, path)


def plot_score_distribution(
    path: pathlib.Path,
    y_bin: np.ndarray,
    score: np.ndarray,
    threshold: float,
    labels: np.ndarray,
    class_names: Sequence[str],
    malignant_classes: Sequence[int],
) -> None:
    """Histograms of the malignant score per true class (multi-class: a box per class too)."""
    multi = len(class_names) > 2
    fig, axes = _figure(1, 2 if multi else 1, size=(13.0, 5.2) if multi else (7.0, 5.0))
    ax = axes[0, 0]
    bins = np.linspace(0.0, 1.0, 41)
    for value, name, color in ((0, "benign", _BENIGN_COLOR), (1, "malignant", _MALIGNANT_COLOR)):
        sel = y_bin == value
        if not sel.any():
            continue
        ax.hist(
            np.clip(score[sel], 0, 1),
            bins=bins,
            density=True,
            histtype="stepfilled",
            alpha=0.35,
            color=color,
            label=f"{name} (n={int(sel.sum())})",
        )
        ax.hist(
            np.clip(score[sel], 0, 1),
            bins=bins,
            density=True,
            histtype="step",
            color=color,
            linewidth=1.5,
        )
    ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set(
        title="Malignant score by true class (each normalised to area 1)",
        xlabel="Malignant score (sum of malignant class probabilities)",
        ylabel="Density",
        xlim=(0, 1),
    )
    ax.legend(fontsize=9)
    if multi:
        ax = axes[0, 1]
        present = [c for c in range(len(class_names)) if np.any(labels == c)]
        data = [np.clip(score[labels == c], 0, 1) for c in present]
        if data:
            box = ax.boxplot(
                data,
                patch_artist=True,
                showfliers=True,
                flierprops={"markersize": 2},
                **_HORIZONTAL,
            )
            mal = {int(c) for c in malignant_classes}
            for patch, c in zip(box["boxes"], present, strict=True):
                patch.set_facecolor(_MALIGNANT_COLOR if c in mal else _BENIGN_COLOR)
                patch.set_alpha(0.5)
            ax.set_yticks(
                range(1, len(present) + 1),
                [f"{class_names[c]} (n={int(np.sum(labels == c))})" for c in present],
            )
            ax.invert_yaxis()
        ax.axvline(threshold, color="k", linestyle="--", linewidth=1)
        ax.set(
            title="Malignant score per true class (red: malignant classes)",
            xlabel="Malignant score",
            xlim=(0, 1),
        )
    _save(fig, path)


def plot_subgroups(
    path: pathlib.Path,
    breakdown: Mapping[str, Mapping[str, Mapping[str, Any]]],
    overall_auc: float,
) -> None:
    """One horizontal bar panel per variable: AUC with its interval (the bootstrap's where
    `breakdown` has auc_ci, else 1.96 SE), n per group."""
    variables = list(breakdown)
    sizes = [max(1, len(breakdown[v])) for v in variables] or [1]
    height = 1.2 + 0.38 * sum(sizes) + 0.7 * len(sizes)
    fig, axes = _figure(len(sizes), 1, size=(8.0, height), height_ratios=sizes)
    if not variables:
        _no_data(axes[0, 0], "no subgroup metadata (site, sex, age, skin type) in this split")
    # Whiskers: the bootstrap interval where there is one, else AUC +- 1.96 SE (Hanley-McNeil),
    # clipped to [0, 1]; the x range starts low enough to show them.
    def interval(g: Mapping[str, Any]) -> tuple[float, float]:
        if g["auc"] is None:
            return math.nan, math.nan
        if g.get("auc_ci"):
            return float(g["auc_ci"][0]), float(g["auc_ci"][1])
        half = 1.96 * (g["auc_se"] or 0.0)
        return max(0.0, g["auc"] - half), min(1.0, g["auc"] + half)

    bootstrapped = any(g.get("auc_ci") for groups in breakdown.values() for g in groups.values())
    lows = [interval(g)[0] for groups in breakdown.values() for g in groups.values()
            if g["auc"] is not None]
    x_min = max(0.0, math.floor(10 * min([0.5, *lows]) - 0.5) / 10)
    for ax, variable in zip(axes[:, 0], variables, strict=False):
        groups = breakdown[variable]
        ypos = np.arange(len(groups))
        aucs = np.array([np.nan if g["auc"] is None else g["auc"] for g in groups.values()])
        bounds = np.array([interval(g) for g in groups.values()]).reshape(-1, 2)
        ok = np.isfinite(aucs)
        xerr = np.stack([aucs[ok] - bounds[ok, 0], bounds[ok, 1] - aucs[ok]])
        ax.barh(
            ypos[ok],
            aucs[ok] - 0.5,
            left=0.5,
            color="tab:blue",
            alpha=0.7,
            height=0.6,
            xerr=xerr,
            error_kw={"capsize": 3, "linewidth": 1},
        )
        for y, a in zip(ypos, aucs, strict=True):
            text = f"{a:.3f}" if np.isfinite(a) else "n/a (one class)"
            ax.text(
                1.02,  # clear of the whisker caps at AUC 1
                y,
                text,
                va="center",
                ha="left",
                fontsize=8,
                transform=ax.get_yaxis_transform(),
            )
        ax.set_yticks(
            ypos,
            [f"{k} (n={g['n']}, {g['num_malignant']} mal.)" for k, g in groups.items()],
            fontsize=8,
        )
        # Every row, the first on top, with half a row of margin: autoscaling sees the bars only,
        # and a group without AUC (no bar) at either end would sit on the axis edge.
        ax.set_ylim(len(groups) - 0.5, -0.5)
        ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
        if math.isfinite(overall_auc):
            ax.axvline(overall_auc, color="tab:red", linestyle=":", linewidth=1.5)
        ax.set(xlim=(x_min, 1.0), title=TITLES.get(variable, variable))
    axes[-1, 0].set_xlabel(
        "ROC AUC, malignant vs benign (bars from 0.5; whiskers: "
        + ("95 % bootstrap interval)" if bootstrapped else "1.96 SE, Hanley-McNeil)")
    )
    if math.isfinite(overall_auc):
        fig.suptitle(f"AUC by subgroup (red dotted line: all images, AUC = {overall_auc:.3f})")
    else:
        fig.suptitle("AUC by subgroup (all images: AUC undefined, one class only)")
    _save(fig, path)


def write_report(
    out_dir: str | os.PathLike,
    *,
    probs: Any,
    labels: Any,
    class_names: Sequence[str],
    malignant_classes: Sequence[int],
    threshold: float = 0.5,
    metadata: Mapping[str, Any] | None = None,
    summary: Mapping[str, Any] | None = None,
    raw_probs: Any | None = None,
) -> dict[str, Any]:
    """Writes the report's PNG figures into `out_dir` and returns the AUC by subgroup.

    Args:
      out_dir: folder for the figures (created).
      probs: f32[N, C] class probabilities (after temperature scaling, when there is one),
        C = len(class_names).
      labels: int[N] true classes.
      class_names: the C class names.
      malignant_classes: indices of the malignant classes (binary task: [1]).
      threshold: on the malignant score (malignant iff score >= threshold).
      metadata: {"sex": int32[N] (SEX_NAMES index), "age": int32[N] (-1 missing),
        "anatom_site": str/bytes[N], "fitzpatrick": str[N], "patient_id": str/bytes[N]}, any
        key optional, or None.
      summary: the split's metrics (`analysis.analyse`): bootstrap intervals and band, the
        operating point, calibration and subgroup AUCs are drawn from it when present.
      raw_probs: f32[N, C] before temperature scaling (the calibration figure shows both).

    Returns:
      JSON-ready {"subgroup_auc": summary's, else `subgroup_auc(...)` ({} without metadata),
      "figures": [file names written, in FIGURES order]}. auc_by_subgroup.png is written only
      when some subgroup variable is known.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or p.shape[1] != len(class_names):
        raise ValueError(f"probs must be [N, {len(class_names)}], got shape {p.shape}")
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if y.shape[0] != p.shape[0]:
        raise ValueError(f"{y.shape[0]} labels for {p.shape[0]} rows of probabilities")
    y_bin, score = isic_metrics.malignant_score(p, y, malignant_classes)
    raw_score = None
    if raw_probs is not None:
        raw_score = isic_metrics.malignant_score(raw_probs, y, malignant_classes)[1]
    cal = (summary or {}).get("calibration") or {}

    plot_roc(out / "roc.png", y_bin, score, threshold, p, y, class_names, summary)
    plot_pr(out / "pr.png", y_bin, score, threshold, summary)
    plot_operating_point(out / "operating_point.png", y_bin, score, threshold, summary)
    plot_confusion(out / "confusion_matrix.png", p, y, class_names, y_bin, score, threshold)
    plot_calibration(out / "calibration.png", y_bin, score, raw_score,
                     cal.get("temperature"), int(cal.get("num_bins", calibration.DEFAULT_BINS)),
                     summary)
    plot_score_distribution(
        out / "score_distribution.png", y_bin, score, threshold, y, class_names, malignant_classes
    )
    if summary is not None and "subgroup_auc" in summary:
        breakdown = summary["subgroup_auc"]
    else:
        breakdown = subgroup_auc(y_bin, score, metadata)
    written = list(FIGURES[:-1])
    if breakdown:
        plot_subgroups(out / "auc_by_subgroup.png", breakdown, isic_metrics.roc_auc(y_bin, score))
        written.append(FIGURES[-1])
    return {"subgroup_auc": breakdown, "figures": written}
