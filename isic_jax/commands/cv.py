"""`isic-jax cv --config C --workdir W [--folds 0,2] [--seeds 0,1,2] [--checkpoint last|best]`.

Patient-grouped K-fold cross-validation on the prepared dataset's folds: member `W/fold_k` is an
ordinary `train` run with `data.val_fold = k` (with `--seeds`, `W/fold_k_seed_s`, one per seed).
Overrides (`--config.a.b=value`) apply to every member. Rerunning resumes: a complete member is
skipped, an interrupted one resumes exactly as `train` does. Then it scores every complete
member on its own fold and writes W/oof_predictions.csv, W/cv_metrics.json and a table.

`--folds k` trains one fold only, so that several machines (a SLURM array, a Kubernetes indexed
Job: scripts/launch/) share the folds of one workdir; `isic-jax cv --workdir W --summarize`
(no --config) writes the summary of what is complete at any time.

`--checkpoint last` (default) scores the last checkpoint of each fold; `best` the best by
config.train.best_metric, which was chosen on that same fold, so its OOF figures are optimistic.

Exit status as `isic-jax train` (`commands.ExitCode`: 0 done, 1 bad flag, 2 bad config, folds or
workdir, 3 NaN loss, 4 dataset not prepared, 5 unusable checkpoints, 6 unusable pretrained
weights, 75 stopped by a signal after saving).
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from isic_jax import config_utils
from isic_jax.commands import ExitCode, fail, no_arguments, validated_config
from isic_jax.data import dataset
from isic_jax.evaluation import cv
from isic_jax.models import PretrainedError
from isic_jax.training import checkpointing, distributed, loop, weight_sources

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (or preset name) with get_config(); not needed with "
    "--summarize.", lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "The cross-validation folder (created).")
_FOLDS = flags.DEFINE_list("folds", None, "Validation folds to train (default: all).")
_SEEDS = flags.DEFINE_list(
    "seeds", None, "Train every fold once per seed, as more members (default: config.seed)."
)
_CHECKPOINT = flags.DEFINE_enum(
    "checkpoint", "last", ["last", "best"], "Checkpoint of each fold the summary scores."
)
_SUMMARIZE = flags.DEFINE_bool(
    "summarize", False, "Only write the summary of the complete folds (no training)."
)
flags.mark_flags_as_required(["workdir"])
config_utils.friendly_override_errors(_CONFIG)
_DIST = distributed.define_flags()
flags.adopt_module_key_flags(distributed)


def _ints(values: list[str] | None, flag: str) -> list[int] | None:
    if values is None:
        return None
    try:
        return [int(v) for v in values]
    except ValueError:
        raise app.UsageError(f"--{flag} takes comma-separated integers, got {values}") from None


def main(argv: list[str]) -> None:
    no_arguments(argv)
    folds, seeds = _ints(_FOLDS.value, "folds"), _ints(_SEEDS.value, "seeds")
    config = None
    if not _SUMMARIZE.value:
        if _CONFIG.value is None:
            raise app.UsageError("--config is required (only --summarize works without it)")
        config = validated_config("cv", _CONFIG)
    marker = pathlib.Path(_WORKDIR.value) / weight_sources.PRETRAIN_RECORD_FILE
    if marker.is_file():
        fail("cv", f"{_WORKDIR.value} is a pretraining workdir ({marker.name}): cross-validate "
             f"into a new --workdir (--config.model.init_from={_WORKDIR.value} starts every "
             f"fold from its backbone)", ExitCode.USAGE)
    try:
        _DIST.maybe_initialize()
    except distributed.DistributedError as e:
        fail("cv", e, ExitCode.USAGE)

    try:
        if _SUMMARIZE.value:
            cv.summarize_cv(_WORKDIR.value, checkpoint=_CHECKPOINT.value)
            return
        result = cv.run_cv(config, _WORKDIR.value, folds=folds, seeds=seeds,
                           checkpoint=_CHECKPOINT.value)
    except (cv.CVError, config_utils.ConfigError) as e:
        fail("cv", e, ExitCode.USAGE)
    except loop.NonFiniteError as e:
        fail("cv", e, ExitCode.NON_FINITE)
    except dataset.DataNotFoundError as e:
        fail("cv", e, ExitCode.DATA)
    except checkpointing.CheckpointError as e:
        fail("cv", e, ExitCode.CHECKPOINT)
    except PretrainedError as e:
        fail("cv", e, ExitCode.WEIGHTS)
    if result["stopped_by_signal"]:
        sys.exit(ExitCode.PREEMPTED)


if __name__ == "__main__":
    app.run(main)
