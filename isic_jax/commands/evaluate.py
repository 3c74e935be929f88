"""`isic-jax evaluate --workdir DIR [--split S] [--checkpoint latest|best|STEP] [--noreport]`.

Loads the config the run saved in DIR, restores the checkpoint on this machine's devices (any
count), runs the evaluation pipeline over the split and writes DIR/eval/<split>/metrics.json,
predictions.csv and the report's PNG figures (ROC, precision-recall, confusion matrix,
calibration, score distributions, AUC by subgroup, the most confident mistakes with Grad-CAM).
Exit status 2 when there is no such run, checkpoint or split.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from isic_jax import config_utils
from isic_jax.commands import checkpoint_flag_value, fail, no_arguments

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
flags.mark_flags_as_required(["workdir"])

EXIT_USAGE = 2


def main(argv: list[str]) -> None:
    no_arguments(argv)
    which = checkpoint_flag_value(_CHECKPOINT.value)
    from isic_jax.data import dataset
    from isic_jax.evaluation import evaluate

    try:
        result = evaluate.evaluate_checkpoint(
            _WORKDIR.value, _SPLIT.value, which, report=_REPORT.value
        )
    except (FileNotFoundError, config_utils.ConfigError, dataset.UnknownSplitError) as e:
        fail("evaluate", e, EXIT_USAGE)
    shown = {k: result[k] for k in ("step", "num_examples", "loss", "auc", "pauc_80",
                                    "balanced_accuracy", "sensitivity", "specificity")
             if k in result}
    print(json.dumps(shown, indent=1))
    out_dir = os.path.join(_WORKDIR.value, "eval", _SPLIT.value)
    print(f"wrote {out_dir}/metrics.json and predictions.csv")
    figures = result.get("figures") or []
    if figures:
        print(f"figures in {out_dir}/: {', '.join(figures)}")


if __name__ == "__main__":
    app.run(main)
