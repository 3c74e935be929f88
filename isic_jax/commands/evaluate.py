"""`isic-jax evaluate --workdir DIR [--split S] [--checkpoint latest|best|STEP] [--noreport]
[--bootstrap-samples N] [--threshold-method sensitivity|youden|fixed] [--target-sensitivity S]
[--features FILE.csv|FILE.parquet]`.

Loads the config the run saved in DIR, restores the checkpoint on this machine's devices (any
count), runs the evaluation pipeline over the split and writes DIR/eval/<split>/metrics.json
(point estimates with bootstrap confidence intervals, calibration before and after temperature
scaling, the operating threshold), predictions.csv, the report's PNG figures (ROC with its
bootstrap band, precision-recall, operating point, confusion matrix, reliability diagram, score
distributions, AUC by subgroup, the most confident mistakes with Grad-CAM) and report.html (all
of it in one self-contained file). On --split val the temperature and the threshold are fitted;
other splits reuse those of eval/val for the same checkpoint. The flags override the run's
config.eval values. `--features FILE` also writes, per image, the probabilities, the
penultimate-layer embedding, the metadata and the patient context, for a tabular stacker
(CSV or Parquet by the file's extension). Exit status (`commands.ExitCode`): 2 when there is no
such run, checkpoint or split, or a bad value; 4 when the run's dataset is not prepared; 8 when
the checkpoint's content differs from the checksums saved with it.
"""

from __future__ import annotations

import os

from absl import app, flags

from isic_jax import config_utils
from isic_jax.commands import (
    ExitCode,
    checkpoint_flag_value,
    fail,
    no_arguments,
    refuse_pretraining_workdir,
    underscore_alias,
)
from isic_jax.data import dataset
from isic_jax.evaluation import evaluate
from isic_jax.training import integrity

_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder written by `isic-jax train`.")
_SPLIT = flags.DEFINE_string(
    "split", "val", "val (the validation fold), train (the other folds), or a split of the "
    "prepared dataset, e.g. fold3."
)
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "latest, best, or a step number.")
_REPORT = flags.DEFINE_boolean(
    "report", True, "Also write the report's PNG figures (ROC, PR, confusion matrix, calibration, "
    "score distributions, AUC by subgroup, most confident mistakes with Grad-CAM); --noreport: "
    "metrics.json and predictions.csv only."
)
_BOOTSTRAP = underscore_alias(flags.DEFINE_integer(
    "bootstrap-samples", None, "Bootstrap resamples of the confidence intervals (0: none); "
    "default: the run's config.eval.bootstrap_samples (1000)."))
_METHOD = underscore_alias(flags.DEFINE_enum(
    "threshold-method", None, list(config_utils.THRESHOLD_METHODS),
    "How the operating threshold is chosen on the validation split; default: the run's "
    "config.eval.threshold_method (sensitivity)."))
_TARGET = underscore_alias(flags.DEFINE_float(
    "target-sensitivity", None, "Sensitivity the threshold must reach (threshold method "
    "sensitivity); default: the run's config.eval.target_sensitivity (0.90)."))
_FEATURES = flags.DEFINE_string(
    "features", None, "Also write stacking features per image (probabilities, embedding, "
    "metadata, patient context) to this .csv or .parquet file.")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    no_arguments(argv)
    which = checkpoint_flag_value(_CHECKPOINT.value)
    refuse_pretraining_workdir("evaluate", _WORKDIR.value)
    try:
        result = evaluate.evaluate_checkpoint(
            _WORKDIR.value, _SPLIT.value, which, report=_REPORT.value,
            bootstrap_samples=_BOOTSTRAP.value, threshold_method=_METHOD.value,
            target_sensitivity=_TARGET.value, features_path=_FEATURES.value,
        )
    except dataset.DataNotFoundError as e:
        fail("evaluate", e, ExitCode.DATA)
    except integrity.IntegrityError as e:  # a damaged checkpoint (before the ValueErrors)
        fail("evaluate", e, ExitCode.DAMAGED)
    except (FileNotFoundError, config_utils.ConfigError, dataset.UnknownSplitError,
            ValueError) as e:
        fail("evaluate", e, ExitCode.USAGE)
    print(summary_text(result))
    out_dir = os.path.join(_WORKDIR.value, "eval", _SPLIT.value)
    print(f"wrote {out_dir}/metrics.json and predictions.csv")
    figures = result.get("figures") or []
    if figures:
        print(f"figures in {out_dir}/: {', '.join(figures)}")
    if result.get("report"):
        print(f"report: {os.path.join(out_dir, result['report'])}")
    if result.get("features_file"):
        print(f"stacking features: {result['features_file']}")


def summary_text(result: dict) -> str:
    """The headline numbers of a metrics.json with their intervals, one per line."""
    level = (result.get("bootstrap") or {}).get("level", 0.95)

    def line(key: str, label: str, digits: int = 4) -> str | None:
        value = result.get(key)
        if value is None:
            return None
        ci = result.get(f"{key}_ci")
        interval = (f"  ({level:.0%} CI {ci[0]:.{digits}f}-{ci[1]:.{digits}f})"
                    if ci and None not in ci else "")
        return f"  {label:<34} {value:.{digits}f}{interval}"

    op = result.get("operating_point") or {}
    cal = result.get("calibration") or {}
    lines = [f"{result.get('split')} split, step {result.get('step')}: "
             f"{result.get('num_examples')} images ({result.get('num_malignant')} malignant)"]
    for key, label in (("auc", "AUC"), ("pauc_80", "pAUC above 80% TPR"),
                       ("balanced_accuracy", "balanced accuracy"),
                       ("patient_auc", "patient-level AUC"),
                       ("sensitivity", "sensitivity"), ("specificity", "specificity"),
                       ("sens_at_spec_90", "sensitivity at specificity 0.90"),
                       ("spec_at_sens_90", "specificity at sensitivity 0.90")):
        text = line(key, label)
        if text:
            lines.append(text)
    if op:
        lines.append(f"  threshold {op['threshold']:.4g}: {op.get('description', '')}")
    if cal:
        lines.append(f"  ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f} after temperature "
                     f"scaling (T = {cal['temperature']:.3g}, {cal['num_bins']} bins)"
                     if cal.get("ece_before") is not None else "  ECE undefined")
    boot = result.get("bootstrap")
    if boot:
        lines.append(f"  intervals: {boot['num_resamples']} resamples of {boot['num_units']} "
                     f"{boot['unit']}s in {boot['seconds']:.2f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
