"""The model card an export carries: MODEL_CARD.md for people, model_card.json for programs.

    card = build_card(meta, config, variables, validation=metrics, validation_source=how,
                      workdir=workdir)
    write_card(export_dir, card)    # -> MODEL_CARD.md, model_card.json

What it holds, each from where it is recorded (nothing is typed in by hand):
- the model and its size (model.json, the parameter count of the exported variables);
- the training data: release, dataset, image counts per class and split and the folds (the
  prepare report stored with the dataset), the citation, and attribution and licences where the
  source metadata had them;
- preprocessing (model.json) and the training recipe (the run's config);
- validation metrics with their bootstrap intervals, calibration, the operating threshold and
  subgroup results (the validation split's metrics.json: `evaluate.validation_metrics`);
- the cross-validation summary when the run folder or its parent holds `cv_metrics.json`;
- intended use and limitations (a research model, not a diagnostic device), software versions.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MARKDOWN_FILE = "MODEL_CARD.md"
JSON_FILE = "model_card.json"
CV_FILE = "cv_metrics.json"
CARD_VERSION = 1
# Distributions whose versions the card records.
SOFTWARE = ("isic-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
            "tensorflow-datasets", "numpy", "scikit-learn", "scipy", "pillow")

INTENDED_USE = (
    "Research on automated classification of dermoscopic images of skin lesions (benign vs "
    "malignant, or the release's diagnoses), e.g. benchmarking, method development and teaching. "
    "Outputs are probabilities for images resembling those it was trained on (dermoscopy of "
    "the ISIC archive or challenges), to be read by people who know what the metrics below mean."
)
NOT_INTENDED = (
    "This is a research model, not a medical device: it has no regulatory clearance and must not "
    "be used to diagnose, triage or rule out skin cancer in patients, nor to replace the "
    "examination of a lesion by a clinician."
)
LIMITATIONS = (
    "Validated retrospectively on one held-out fold of the same collection it was trained on; "
    "performance on other clinics, devices, populations or acquisition protocols is unknown and "
    "likely lower.",
    "ISIC collections under-represent darker skin types (Fitzpatrick IV-VI); subgroup results "
    "are reported only where the metadata records the variable, and small groups have wide "
    "intervals.",
    "Dermoscopic images only: clinical (macroscopic) photographs, total-body crops and "
    "non-lesion images are outside the training distribution, and the model does not detect "
    "that an image is out of distribution.",
    "The operating threshold and the temperature were fitted on the validation fold: on that fold "
    "the target sensitivity is met by construction; the bootstrap interval, not the point "
    "value, indicates what to expect elsewhere.",
    "Labels come from the source metadata (histopathology for many malignant lesions, consensus "
    "or follow-up for many benign ones) and carry their errors.",
)


# ---------------------------------------------------------------------------------------------
# Gathering.


def software_versions() -> dict[str, str | None]:
    """{distribution: version or None when not installed}, plus python and the platform."""
    out: dict[str, str | None] = {}
    for name in SOFTWARE:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = sys.version.split()[0]
    out["platform"] = platform.platform()
    return out


def parameter_count(variables: Mapping[str, Any]) -> dict[str, int]:
    """{"parameters": trainable, "batch_stats": BatchNorm statistics} element counts."""
    import jax

    def count(tree: Any) -> int:
        return int(sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree)))

    return {"parameters": count(variables.get("params", {})),
            "batch_stats": count(variables.get("batch_stats", {}))}


def prepare_report(config: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(the prepare report stored with the run's dataset, its citation) or (None, None) when
    the dataset is not prepared here."""
    from isic_jax.data.isic import make_builder, read_report

    data = config.data
    try:
        builder = make_builder(str(data.release), int(data.stored_size),
                               os.path.expanduser(str(data.data_dir)),
                               num_folds=int(data.get("num_folds", 5)))
        report = read_report(builder)
        citation = str(builder.info.citation or "") or None
    except Exception:  # noqa: BLE001 - no dataset here: the card says so instead
        return None, None
    return report, citation


def find_cv_summary(workdir: str | os.PathLike | None) -> tuple[dict[str, Any] | None, str | None]:
    """(cv_metrics.json of the run folder or of its parent, its path), or (None, None)."""
    if workdir is None:
        return None, None
    folder = pathlib.Path(workdir)
    for candidate in (folder / CV_FILE, folder.parent / CV_FILE):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text()), str(candidate)
            except (OSError, json.JSONDecodeError) as e:
                return {"error": f"cannot read {candidate}: {e}"}, str(candidate)
    return None, None


def _fold_names(counts: Mapping[str, Any]) -> list[str]:
    return sorted(counts, key=lambda s: (len(s), s))


def training_data(config: Any, report: Mapping[str, Any] | None,
                  citation: str | None) -> dict[str, Any]:
    """The card's training data section (counts per class and split from the prepare report)."""
    from isic_jax.data.isic import train_val_splits

    data = config.data
    key = "label_counts" if str(data.task) == "binary" else "diagnosis_counts"
    out: dict[str, Any] = {
        "release": str(data.release),
        "task": str(data.task),
        "dataset": (report or {}).get("dataset") or f"isic/{data.release}_{data.stored_size}",
        "stored_size": int(data.stored_size),
        "citation": citation,
    }
    if not report:
        out["note"] = ("the prepared dataset was not found under config.data.data_dir when "
                       "exporting: counts, folds and sources are not recorded")
        return out
    per_fold = report.get(key) or {}
    folds = _fold_names(per_fold)
    num_folds = int((report.get("options") or {}).get("num_folds") or len(folds))
    val_fold = int(data.val_fold)
    train_split, val_split = train_val_splits(num_folds, val_fold)
    classes = list(next(iter(per_fold.values())).keys()) if per_fold else []

    def total(splits: Sequence[str]) -> dict[str, int]:
        return {c: int(sum(per_fold.get(s, {}).get(c, 0) for s in splits)) for c in classes}

    out.update({
        "num_examples": report.get("num_examples"),
        "num_folds": num_folds,
        "fold_grouping": "patient, else lesion, else image; stratified by label",
        "fold_seed": (report.get("options") or {}).get("fold_seed"),
        "validation_fold": val_fold,
        "splits": {
            "train": {"folds": train_split, "counts": total(train_split.split("+"))},
            "validation": {"folds": val_split, "counts": total([val_split])},
        },
        "counts_per_fold": {f: per_fold[f] for f in folds},
        "num_skipped": report.get("num_skipped"),
        "source": report.get("source"),
    })
    for field in ("attributions", "licenses"):
        if report.get(field):
            out[field] = report[field]
    if "attributions" not in out:
        out["attribution_note"] = ("the source metadata recorded no attribution or licence per "
                                   "image; see the release's own terms")
    return out


def initial_weights(record: Mapping[str, Any] | None) -> str | None:
    """Where the run's weights started (its init_from.json, copied into model.json), in words;
    None from scratch."""
    if not record:
        return None
    where = f"{record.get('source')} ({record.get('origin')}"
    if record.get("step") is not None:
        where += f", step {record.get('step')}"
    where += ")"
    ssl = record.get("self_supervised") or {}
    if ssl:
        where += (f": self-supervised {str(ssl.get('method') or '').upper()} pretraining on "
                  f"{ssl.get('release')} without labels, its online backbone")
    return where + f"; head {record.get('head')}"


def _validation_section(metrics: Mapping[str, Any]) -> dict[str, Any]:
    from isic_jax.evaluation import html_report

    boot = metrics.get("bootstrap") or {}
    return {
        "split": metrics.get("split"),
        "step": metrics.get("step"),
        "num_examples": metrics.get("num_examples"),
        "num_malignant": metrics.get("num_malignant"),
        "num_patients": metrics.get("num_patients"),
        "probabilities": metrics.get("probabilities"),
        "metrics": [
            {"name": label, "value": value, "ci": ci}
            for label, value, ci, _ in html_report.headline_rows(metrics)
        ],
        "top_k_retrieval": metrics.get("top_k_retrieval"),
        "intervals": (f"{boot.get('level', 0.95):.0%} percentile bootstrap, "
                      f"{boot.get('num_resamples')} resamples of {boot.get('num_units')} "
                      f"{boot.get('unit')}s (seed {boot.get('seed')})" if boot else None),
        "per_class": metrics.get("per_class"),
    }


def build_card(
    meta: Mapping[str, Any],
    config: Any,
    variables: Mapping[str, Any],
    *,
    validation: Mapping[str, Any] | None,
    validation_source: str,
    workdir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The model card as a JSON-ready dict (see the module docstring).

    Args:
      meta: the export's model.json.
      config: the run's resolved config.
      variables: the exported {"params", "batch_stats"}.
      validation: the validation split's metrics.json (None when there is none).
      validation_source: where they come from, or why there are none.
      workdir: the run folder (for a cross-validation summary).
    """
    from isic_jax.evaluation import subgroups
    from isic_jax.utils import to_json_compatible

    report, citation = prepare_report(config)
    cv, cv_path = find_cv_summary(workdir)
    model = dict(meta.get("model", {}))
    model.update(parameter_count(variables))
    model.update({
        "input": meta.get("input"),
        "class_names": meta.get("class_names"),
        "malignant_classes": meta.get("malignant_classes"),
        "export_bytes": (meta.get("export") or {}).get("bytes"),
        "platforms": (meta.get("export") or {}).get("platforms"),
        "checkpoint_step": (meta.get("checkpoint") or {}).get("step"),
        "ema_weights": (meta.get("variables") or {}).get("ema"),
        "swa_weights": (meta.get("variables") or {}).get("swa", False),
        "initial_weights": initial_weights(meta.get("init_from")),
    })
    train = config.train
    card: dict[str, Any] = {
        "card_version": CARD_VERSION,
        "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": model,
        "training_data": training_data(config, report, citation),
        "preprocessing": (meta.get("preprocessing") or {}).get("steps"),
        "training": {
            "optimizer": str(config.optim.name),
            "learning_rate": float(config.optim.learning_rate),
            "batch_size": int(train.batch_size),
            "epochs": float(train.num_epochs) if int(train.num_steps) < 0 else None,
            "steps": int(train.num_steps) if int(train.num_steps) > 0 else None,
            "loss": str(config.loss.name),
            "label_smoothing": float(config.loss.label_smoothing),
            "class_weights": str(config.loss.class_weights),
            "balanced_sampling": bool(config.data.balanced_sampling),
            "augmentation": dict(config.data.augment),
            "image_size": int(config.data.image_size),
            "seed": int(config.seed),
        },
        "validation": None,
        "validation_source": validation_source,
        "calibration": meta.get("calibration"),
        "operating_point": meta.get("operating_point"),
        "threshold": meta.get("threshold"),
        "subgroups": None,
        "cross_validation": ({"file": cv_path, "summary": cv} if cv is not None else None),
        "intended_use": INTENDED_USE,
        "not_intended_for": NOT_INTENDED,
        "limitations": list(LIMITATIONS),
        "software": software_versions(),
    }
    if validation:
        card["validation"] = _validation_section(validation)
        card["subgroups"] = subgroups.ordered(validation.get("subgroup_auc") or {}) or None
        cal = validation.get("calibration") or {}
        card["calibration"] = {
            **(meta.get("calibration") or {}),
            "ece_before": (cal.get("before") or {}).get("ece"),
            "ece_before_ci": (cal.get("before") or {}).get("ece_ci"),
            "ece_after": (cal.get("after") or {}).get("ece"),
            "ece_after_ci": (cal.get("after") or {}).get("ece_ci"),
            "mce_before": (cal.get("before") or {}).get("mce"),
            "mce_after": (cal.get("after") or {}).get("mce"),
            "num_bins": cal.get("num_bins"),
        }
    return to_json_compatible(card)


# ---------------------------------------------------------------------------------------------
# Markdown.


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|")


def _ci(ci: Sequence[Any] | None, digits: int = 3) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return "-"
    return f"{ci[0]:.{digits}f}-{ci[1]:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _cv_lines(cv: Mapping[str, Any]) -> list[str]:
    """A table of the scalar summary metrics of a cv_metrics.json, whatever its layout: values
    with mean/std (a "summary" or "mean" mapping, or {metric: {mean, std}}) where present."""
    summary = cv.get("summary") if isinstance(cv.get("summary"), Mapping) else cv
    rows = []
    for name, value in summary.items():
        if isinstance(value, Mapping) and "mean" in value:
            extra = f"{_fmt(value.get('std'))}" if "std" in value else "-"
            rows.append([name, _fmt(value.get("mean")), extra])
        elif isinstance(value, int | float) and not isinstance(value, bool):
            rows.append([name, _fmt(value), "-"])
    if not rows:
        return ["```json", json.dumps(cv, indent=1)[:4000], "```", ""]
    return _table(["Metric", "Mean over folds", "Std"], rows)


def _stem_width(model: Mapping[str, Any]) -> str:
    """"stem width 64, " for the families that have the knob (ResNets), else ""."""
    from isic_jax.models import family_of, model_names

    name = str(model.get("name"))
    if name in model_names() and "width" not in family_of(name).config_keys:
        return ""
    return f"stem width {model.get('width')}, "


def render_markdown(card: Mapping[str, Any]) -> str:
    """MODEL_CARD.md of a `build_card` dict."""
    m = card["model"]
    data = card["training_data"]
    lines = [f"# Model card: {m.get('name')} for ISIC {data.get('release')} ({data.get('task')})",
             "", f"Written {card['written']} by isic_jax {card['software'].get('isic-jax')}.", ""]
    lines += ["## Intended use", "", card["intended_use"], "", f"**{card['not_intended_for']}**",
              ""]
    lines += ["## Model", ""]
    size = m.get("input", {}).get("image_size") if m.get("input") else None
    lines += _table(["", ""], [
        ["Architecture", f"{m.get('name')} ({_stem_width(m)}{m.get('dtype')} compute, "
                         f"dropout {m.get('dropout')})"],
        ["Parameters", f"{_fmt(m.get('parameters'))} (+ {_fmt(m.get('batch_stats'))} BatchNorm "
                       "statistics)"],
        ["Classes (output order)", ", ".join(m.get("class_names") or [])],
        ["Input", f"uint8 RGB [b, {size}, {size}, 3]; probabilities out"],
        ["Export", f"jax.export StableHLO, {_fmt(m.get('export_bytes'))} bytes, platforms "
                   f"{', '.join(m.get('platforms') or [])}"],
        ["Weights", f"checkpoint step {m.get('checkpoint_step')}"
                    + (" (EMA)" if m.get("ema_weights") else "")
                    + (" (SWA)" if m.get("swa_weights") else "")],
        ["Initial weights", m.get("initial_weights") or "a random init (trained from scratch)"],
    ])
    lines += ["## Training data", ""]
    if data.get("note"):
        lines += [f"Dataset `{data.get('dataset')}`: {data['note']}.", ""]
    else:
        splits = data["splits"]
        classes = list(splits["train"]["counts"])
        lines += [f"Dataset `{data['dataset']}` ({_fmt(data.get('num_examples'))} images, stored "
                  f"at {data['stored_size']} px), {data['num_folds']} folds grouped by "
                  f"{data['fold_grouping']} (seed {data.get('fold_seed')}); fold "
                  f"{data['validation_fold']} held out for validation. "
                  f"{_fmt(data.get('num_skipped'))} source files were skipped at prepare time "
                  "(listed in the prepare report).", ""]
        lines += _table(["Split", "Folds", *classes, "Total"], [
            [name, s["folds"], *[_fmt(s["counts"][c]) for c in classes],
             _fmt(sum(s["counts"].values()))]
            for name, s in (("train", splits["train"]), ("validation", splits["validation"]))
        ])
    if data.get("citation"):
        lines += [f"Citation: {data['citation']}", ""]
    if data.get("attributions"):
        lines += ["Attribution (images per source, from the source metadata):", ""]
        lines += _table(["Attribution", "Images"],
                        [[_fmt(k), _fmt(v)] for k, v in data["attributions"].items()])
    if data.get("licenses"):
        lines += _table(["Licence", "Images"],
                        [[_fmt(k), _fmt(v)] for k, v in data["licenses"].items()])
    if data.get("attribution_note"):
        lines += [f"Attribution and licences: {data['attribution_note']}.", ""]
    lines += ["## Preprocessing", ""]
    lines += [f"{i + 1}. {step}" for i, step in enumerate(card.get("preprocessing") or [])] + [""]
    t = card["training"]
    length = f"{t['epochs']:g} epochs" if t.get("epochs") else f"{t.get('steps')} steps"
    lines += ["## Training", "",
              f"{t['optimizer']} (peak learning rate {t['learning_rate']:g}), batch "
              f"{t['batch_size']}, {length}, {t['loss']} loss (label smoothing "
              f"{t['label_smoothing']:g}, class weights {t['class_weights']}), balanced "
              f"sampling {_fmt(t['balanced_sampling'])}, {t['image_size']} px crops, seed "
              f"{t['seed']}. Augmentation: "
              + ", ".join(f"{k}={v}" for k, v in (t.get("augmentation") or {}).items()) + ".", ""]
    lines += ["## Validation", ""]
    val = card.get("validation")
    if val:
        lines += [f"{_fmt(val['num_examples'])} images ({_fmt(val['num_malignant'])} malignant"
                  + (f", {_fmt(val['num_patients'])} patients" if val.get("num_patients") else "")
                  + f") of the {val['split']} split, checkpoint step {val['step']}; source: "
                  f"{card['validation_source']}. Probabilities: {val.get('probabilities')}. "
                  f"Intervals: {val.get('intervals') or 'none'}.", ""]
        lines += _table(["Metric", "Estimate", "95% CI"],
                        [[r["name"], _fmt(r["value"]), _ci(r["ci"])] for r in val["metrics"]])
        top = val.get("top_k_retrieval")
        if top:
            lines += [f"Top-{top['k']} retrieval sensitivity per patient (ISIC 2024): "
                      f"{_fmt(top.get('sensitivity'))} ({top['num_found']} of "
                      f"{top['num_malignant']} malignant images).", ""]
    else:
        lines += [f"No validation metrics: {card['validation_source']}.", ""]
    lines += ["## Operating threshold", ""]
    op = card.get("operating_point")
    if op:
        lines += [f"`predict` calls an image malignant when its malignant probability is >= "
                  f"**{op['threshold']:.4g}** ({op.get('description')}); with "
                  f"`--no-calibration` the equivalent threshold on raw probabilities is "
                  f"{op.get('threshold_uncalibrated', float('nan')):.4g}. On the validation "
                  f"split: sensitivity {_fmt(op.get('sensitivity'))}, specificity "
                  f"{_fmt(op.get('specificity'))}, PPV {_fmt(op.get('ppv'))}, NPV "
                  f"{_fmt(op.get('npv'))}.", ""]
    else:
        lines += [f"Threshold {_fmt(card.get('threshold'))} on the malignant probability "
                  "(config.eval.threshold; no validation operating point).", ""]
    lines += ["## Calibration", ""]
    cal = card.get("calibration") or {}
    if cal.get("ece_after") is not None:
        lines += [f"Temperature scaling on the validation split: T = {cal['temperature']:.4g} "
                  f"(applied by `predict`; `--no-calibration` turns it off). ECE "
                  f"({cal.get('num_bins')} equal-width bins) {_fmt(cal.get('ece_before'), 4)} "
                  f"({_ci(cal.get('ece_before_ci'), 4)}) before, "
                  f"{_fmt(cal.get('ece_after'), 4)} ({_ci(cal.get('ece_after_ci'), 4)}) after; "
                  f"MCE {_fmt(cal.get('mce_before'), 4)} -> {_fmt(cal.get('mce_after'), 4)}.", ""]
    else:
        lines += [f"Temperature {(cal or {}).get('temperature', 1.0)} (not fitted).", ""]
    lines += ["## Subgroups", ""]
    subgroups = card.get("subgroups")
    if subgroups:
        titles = {"anatom_site": "anatomic site", "sex": "sex", "age_band": "age band",
                  "fitzpatrick": "Fitzpatrick skin type"}
        rows = [[titles.get(v, v), g, _fmt(r["n"]), _fmt(r["num_malignant"]), _fmt(r["auc"]),
                 _ci(r.get("auc_ci"))] for v, groups in subgroups.items()
                for g, r in groups.items()]
        lines += _table(["Variable", "Group", "Images", "Malignant", "AUC", "95% CI"], rows)
        missing = [titles[v] for v in titles if v not in subgroups]
        if missing:
            lines += [f"Not recorded in this dataset's metadata: {', '.join(missing)}.", ""]
    else:
        lines += ["No subgroup variable is recorded for the validation split (or it was not "
                  "evaluated).", ""]
    cv = card.get("cross_validation")
    if cv:
        lines += ["## Cross-validation", "", f"From `{cv['file']}`:", ""]
        lines += _cv_lines(cv["summary"])
    lines += ["## Limitations", ""] + [f"- {item}" for item in card["limitations"]] + [""]
    lines += ["## Software", ""]
    lines += _table(["Package", "Version"],
                    [[k, _fmt(v)] for k, v in card["software"].items()])
    return "\n".join(lines)


def write_card(folder: str | os.PathLike, card: Mapping[str, Any]) -> None:
    """Writes MODEL_CARD.md and model_card.json into `folder`."""
    folder = pathlib.Path(folder)
    (folder / JSON_FILE).write_text(json.dumps(card, indent=2) + "\n")
    (folder / MARKDOWN_FILE).write_text(render_markdown(card))
