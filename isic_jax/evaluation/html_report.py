"""One self-contained HTML file per evaluation: the tables of metrics.json and its figures.

    write_html_report(out_dir, metrics)   # -> out_dir/report.html

Readable offline and by mail: the figures are embedded as base64 PNGs, the style is inline, and
there is no script, font or link to anything outside the file. Every number comes from
`metrics` (what metrics.json holds), with its bootstrap interval where there is one.
"""

from __future__ import annotations

import base64
import datetime
import html
import math
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from isic_jax.evaluation import subgroups

REPORT_FILE = "report.html"
# Figures shown across the page (grids of images need the width).
_WIDE = frozenset({"mistakes.png"})

# (file, caption) in the order shown; files absent from the folder are skipped.
FIGURE_CAPTIONS: tuple[tuple[str, str], ...] = (
    ("roc.png", "ROC curve of the malignant score, with the pointwise bootstrap band, the partial "
     "area above 80 % sensitivity (ISIC 2024) and the operating point."),
    ("operating_point.png", "Sensitivity, specificity and PPV against the threshold; the dashed "
     "line is the operating threshold."),
    ("calibration.png", "Reliability diagram (equal-width bins of the ECE) before and after "
     "temperature scaling, over the histogram of the calibrated scores."),
    ("pr.png", "Precision-recall curve of the malignant score."),
    ("confusion_matrix.png", "Confusion matrix at the operating threshold (binary) or of the "
     "argmax (several classes)."),
    ("score_distribution.png", "Distribution of the malignant score by true class."),
    ("auc_by_subgroup.png", "AUC within each subgroup, with bootstrap intervals."),
    ("mistakes.png", "The most confident mistakes, with Grad-CAM."),
)

_STYLE = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1180px;color:#1d2125;line-height:1.4;padding:0 16px}
h1{font-size:1.6em;margin-bottom:0.2em}h2{font-size:1.25em;border-bottom:1px solid #d0d7de;
padding-bottom:4px;margin-top:1.8em}h3{font-size:1.05em;margin-bottom:0.3em}
.meta{color:#57606a;font-size:0.92em}
table{border-collapse:collapse;margin:8px 0 16px 0;font-size:0.92em}
th,td{border:1px solid #d0d7de;padding:4px 9px;text-align:right;vertical-align:top}
th{background:#f6f8fa;font-weight:600}td.l,th.l{text-align:left}
tr:nth-child(even) td{background:#fbfcfd}
.note{background:#fff8c5;border:1px solid #e3d27a;padding:8px 12px;border-radius:4px;
font-size:0.92em}
.grid{display:flex;flex-wrap:wrap;gap:18px}.fig{flex:1 1 540px;max-width:100%}
.fig.wide{flex-basis:100%}.fig img{max-width:100%;border:1px solid #d0d7de}
.fig p{font-size:0.88em;color:#57606a;margin:4px 0 0 0}.na{color:#8c959f}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return '<span class="na">n/a</span>'
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{float(value):.{digits}f}"


def _ci(ci: Sequence[Any] | None, digits: int = 3) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return '<span class="na">-</span>'
    return f"{float(ci[0]):.{digits}f} &ndash; {float(ci[1]):.{digits}f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], left: int = 1) -> str:
    """HTML table; cells are HTML already (escape text with _esc); the first `left` columns are
    left-aligned."""
    cls = lambda i: ' class="l"' if i < left else ""  # noqa: E731
    head = "".join(f"<th{cls(i)}>{h}</th>" for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# (key, label, digits) of the headline table.
_HEADLINE: tuple[tuple[str, str, int], ...] = (
    ("auc", "ROC AUC (malignant vs benign)", 3),
    ("pauc_80", "Partial AUC above 80 % TPR (ISIC 2024, max 0.2)", 4),
    ("average_precision", "Average precision", 3),
    ("balanced_accuracy", "Balanced multiclass accuracy (argmax, ties wrong)", 3),
    ("patient_auc", "Patient-level AUC (max score per patient)", 3),
    ("sensitivity", "Sensitivity at the operating threshold", 3),
    ("specificity", "Specificity at the operating threshold", 3),
    ("ppv", "PPV at the operating threshold", 3),
    ("npv", "NPV at the operating threshold", 3),
    ("sens_at_spec_90", "Sensitivity at specificity >= 0.90", 3),
    ("sens_at_spec_95", "Sensitivity at specificity >= 0.95", 3),
    ("spec_at_sens_90", "Specificity at sensitivity >= 0.90", 3),
    ("spec_at_sens_95", "Specificity at sensitivity >= 0.95", 3),
)


def headline_rows(metrics: Mapping[str, Any]) -> list[tuple[str, Any, Any, int]]:
    """(label, estimate, [low, high] or None, digits) of the headline metrics present."""
    rows = []
    for key, label, digits in _HEADLINE:
        if key == "patient_auc" and metrics.get("num_patients") in (None, 0):
            continue
        rows.append((label, metrics.get(key), metrics.get(f"{key}_ci"), digits))
    if metrics.get("pauc_min_tpr") not in (None, 0.8):
        rows.insert(2, (f"Partial AUC above {metrics['pauc_min_tpr']:.0%} TPR", metrics.get("pauc"),
                        metrics.get("pauc_ci"), 4))
    return rows


def _headline(metrics: Mapping[str, Any]) -> str:
    level = (metrics.get("bootstrap") or {}).get("level", 0.95)
    rows = [(_esc(label), _num(v, d), _ci(ci, d)) for label, v, ci, d in headline_rows(metrics)]
    top = metrics.get("top_k_retrieval")
    if top:
        rows.append((
            _esc(f"Top-{top['k']} retrieval sensitivity per patient (ISIC 2024; "
                 f"{top['num_found']}/{top['num_malignant']} malignant images found)"),
            _num(top.get("sensitivity")), '<span class="na">-</span>'))
    return _table(["Metric", "Estimate", f"{level:.0%} CI"], rows)


def _operating_point(metrics: Mapping[str, Any]) -> str:
    op = metrics.get("operating_point") or {}
    fixed = metrics.get("fixed_threshold") or {}
    if not op:
        return ""
    rows = [
        ("Operating threshold (" + _esc(op.get("description", "")) + ")",
         _num(op.get("threshold"), 4), _num(op.get("sensitivity")), _num(op.get("specificity")),
         _num(op.get("ppv")), _num(op.get("npv"))),
    ]
    if fixed:
        rows.append(("Fixed threshold (config.eval.threshold)", _num(fixed.get("threshold"), 4),
                     _num(fixed.get("sensitivity")), _num(fixed.get("specificity")),
                     _num(fixed.get("ppv")), _num(fixed.get("npv"))))
    text = _table(["Decision rule: malignant iff score &ge; threshold", "Threshold",
                   "Sensitivity", "Specificity", "PPV", "NPV"], rows)
    if op.get("threshold_uncalibrated") is not None:
        text += (f'<p class="meta">The same rule on uncalibrated scores (<code>predict '
                 f'--no-calibration</code>): threshold {_num(op["threshold_uncalibrated"], 4)}.'
                 f'</p>')
    return text


def _calibration(metrics: Mapping[str, Any]) -> str:
    cal = metrics.get("calibration") or {}
    if not cal:
        return ""
    rows = []
    after = f"After temperature scaling (T = {cal.get('temperature', 1):.4g})"
    for when, label in (("before", "Raw model probabilities"), ("after", after)):
        block = cal.get(when) or {}
        rows.append((_esc(label), _num(block.get("ece"), 4), _ci(block.get("ece_ci"), 4),
                     _num(block.get("mce"), 4), _num(block.get("nll"), 4),
                     _num(block.get("brier"), 4)))
    text = _table(["Probabilities", "ECE", "ECE CI", "MCE", "NLL", "Brier"], rows)
    text += (f'<p class="meta">{_esc(cal.get("num_bins"))} equal-width bins '
             f'(torchmetrics\' binning); temperature fitted on {_esc(cal.get("fitted_on"))}.</p>')
    return text


def _per_class(metrics: Mapping[str, Any]) -> str:
    per_class = metrics.get("per_class") or {}
    if not per_class:
        return ""
    keys = ("support", "recall", "sensitivity", "specificity", "ppv", "npv", "auc",
            "auc_sens_80", "average_precision")
    rows = [[_esc(name), *[_num(v.get(k)) for k in keys]] for name, v in per_class.items()]
    return (_table(["Class", "Support", "Recall (argmax)", "Sens (p&gt;0.5)", "Spec", "PPV",
                    "NPV", "AUC", "auc_sens_80", "AP"], rows)
            + '<p class="meta">One class against the rest, as isic-challenge-scoring computes '
              'them (decision "probability &gt; 0.5"; auc_sens_80 is its raw partial AUC, not '
              'the Kaggle pAUC). Undefined ratios are n/a (the official scorer scores them '
              '1.0).</p>')


def _subgroups(metrics: Mapping[str, Any]) -> str:
    breakdown = subgroups.ordered(metrics.get("subgroup_auc") or {})
    if not breakdown:
        return '<p class="meta">The split records no subgroup variable.</p>'
    titles = subgroups.TITLES
    rows = []
    for variable, groups in breakdown.items():
        for group, g in groups.items():
            rows.append((_esc(titles.get(variable, variable)), _esc(group), _num(g.get("n")),
                         _num(g.get("num_malignant")), _num(g.get("num_patients")),
                         _num(g.get("auc")), _ci(g.get("auc_ci"))))
    return _table(["Variable", "Group", "Images", "Malignant", "Patients", "AUC", "CI"], rows,
                  left=2)


def _by_source(metrics: Mapping[str, Any]) -> str:
    by_source = metrics.get("by_source") or {}
    if not by_source:
        return ""
    keys = ("num_examples", "num_malignant", "auc", "pauc_80", "balanced_accuracy",
            "sensitivity", "specificity")
    rows = [[_esc(name), *[_num(v.get(k)) for k in keys]] for name, v in by_source.items()]
    return ("<h2>By source release</h2>"
            + _table(["Release", "Images", "Malignant", "AUC", "pAUC80", "Balanced acc.",
                      "Sensitivity", "Specificity"], rows)
            + '<p class="meta">Each release\'s images alone, at the operating threshold (their '
              'AUC intervals are in the subgroup table).</p>')


def _confusion(metrics: Mapping[str, Any]) -> str:
    cm, names = metrics.get("confusion_matrix"), metrics.get("confusion_matrix_labels")
    counts = metrics.get("binary_counts")
    if names and len(names) == 2 and counts:
        # Two classes: the decision the operating threshold makes (what predict writes).
        rows = [["true benign", _num(counts["tn"]), _num(counts["fp"])],
                ["true malignant", _num(counts["fn"]), _num(counts["tp"])]]
        return (_table(["", "called benign", "called malignant"], rows)
                + f'<p class="meta">At the operating threshold '
                  f'{_num(metrics.get("threshold"), 4)} (malignant iff score &ge; threshold).'
                  "</p>")
    if not cm or not names:
        return ""
    rows = [[_esc(f"true {n}"), *[_num(int(v)) for v in row]] for n, row in zip(names, cm,
                                                                                 strict=False)]
    return (_table(["", *[_esc(f"pred. {n}") for n in names]], rows)
            + '<p class="meta">Argmax over the classes; argmax ties left out '
              f'({_num(metrics.get("num_argmax_ties"))}).</p>')


def _mistakes(metrics: Mapping[str, Any]) -> str:
    mistakes = metrics.get("most_confident_mistakes") or []
    if not mistakes:
        return ""
    rows = [(_esc(m.get("image_id")), _esc(m.get("label")), _esc(m.get("predicted")),
             _num(m.get("probability"))) for m in mistakes]
    return _table(["Image", "True", "Predicted", "Probability"], rows, left=3)


def _figure_html(out_dir: pathlib.Path, names: Iterable[str]) -> str:
    parts = []
    captions = dict(FIGURE_CAPTIONS)
    order = [f for f, _ in FIGURE_CAPTIONS]
    for name in sorted(set(names), key=lambda n: order.index(n) if n in order else len(order)):
        path = out_dir / name
        if not path.is_file():
            continue
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        cls = "fig wide" if name in _WIDE else "fig"
        parts.append(f'<div class="{cls}"><img alt="{_esc(name)}" '
                     f'src="data:image/png;base64,{data}"><p>{_esc(captions.get(name, name))}'
                     f'</p></div>')
    return '<div class="grid">' + "".join(parts) + "</div>" if parts else ""


def render(metrics: Mapping[str, Any], out_dir: str | os.PathLike, run: str | None = None) -> str:
    """The HTML text of the report of `metrics` (figures read from `out_dir`)."""
    out = pathlib.Path(out_dir)
    boot = metrics.get("bootstrap") or {}
    title = f"isic_jax evaluation: {metrics.get('split', '?')} split"
    facts = [
        f"checkpoint {_esc(metrics.get('checkpoint'))} (step {_esc(metrics.get('step'))})",
        f"{_num(metrics.get('num_examples'))} images, {_num(metrics.get('num_malignant'))} "
        f"malignant",
    ]
    if metrics.get("num_patients"):
        facts.append(f"{_num(metrics['num_patients'])} patients")
    if metrics.get("class_names"):
        facts.append("classes: " + _esc(", ".join(metrics["class_names"])))
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    intervals = (
        f"Intervals: {boot.get('level', 0.95):.0%} {_esc(boot.get('method', ''))}, "
        f"{_num(boot.get('num_resamples'))} resamples of {_num(boot.get('num_units'))} "
        f"{_esc(boot.get('unit', ''))}s (seed {_esc(boot.get('seed'))}); decision metrics at "
        "the fixed operating threshold."
        if boot else "No bootstrap intervals (config.eval.bootstrap_samples = 0)."
    )
    body = [
        f"<h1>{_esc(title)}</h1>",
        f'<p class="meta">{" &middot; ".join(facts)}<br>'
        + (f"run {_esc(run)} &middot; " if run else "") + f"written {when}</p>",
        f'<p class="meta">Probabilities: {_esc(metrics.get("probabilities", "raw"))}. '
        f"{intervals}</p>",
        '<p class="note">A research model evaluated on retrospective dermoscopy images; not a '
        "diagnostic device. On the split the threshold and temperature were fitted on, the "
        "operating sensitivity meets its target by construction.</p>",
        "<h2>Discrimination and operating point</h2>",
        _headline(metrics),
        "<h3>Operating point</h3>",
        _operating_point(metrics),
        "<h2>Calibration</h2>",
        _calibration(metrics),
        "<h2>Figures</h2>",
        _figure_html(out, [*(metrics.get("figures") or []), *(f for f, _ in FIGURE_CAPTIONS)]),
        _by_source(metrics),
        "<h2>Subgroups</h2>",
        _subgroups(metrics),
        "<h2>Per class (one vs rest)</h2>",
        _per_class(metrics),
        "<h2>Confusion matrix</h2>",
        _confusion(metrics),
    ]
    mistakes = _mistakes(metrics)
    if mistakes:
        body += ["<h2>Most confident mistakes (argmax of the model's probabilities)</h2>",
                 mistakes]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_esc(title)}</title><style>{_STYLE}</style></head><body>\n"
        + "\n".join(body) + "\n</body></html>\n"
    )


def write_html_report(
    out_dir: str | os.PathLike, metrics: Mapping[str, Any], run: str | None = None
) -> pathlib.Path:
    """Writes out_dir/report.html (atomically) and returns its path."""
    out = pathlib.Path(out_dir)
    path = out / REPORT_FILE
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render(metrics, out, run), encoding="utf-8")
    tmp.replace(path)
    return path
