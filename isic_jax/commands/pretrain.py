"""`isic-jax pretrain --config C --workdir W [--config.a.b=value ...]`.

Self-supervised pretraining of a backbone (BYOL, Grill et al. 2020) on a prepared dataset whose
labels are not used for training: every fold but the held-out `data.val_fold` (-1: every fold),
one release or several joined by "+". The config needs a `config.pretrain` section: the presets
`pretrain_byol` (accelerators) and `pretrain_cpu_sample` (the real sample on 2 CPU cores). The
k-NN probe of the frozen features on the labelled held-out fold says whether they learn (at
step 0, the random-init baseline, and at each evaluation). Afterwards

    isic-jax train --config C2 --workdir W2 --config.model.init_from=W    (or `cv`)

starts from the online backbone (its projector and predictor dropped, the head new).

The same machinery as `isic-jax train`: a second run on the same workdir resumes exactly,
SIGTERM/SIGINT saves and exits 75, several processes and devices (jit or pmap), TensorBoard.

Exit status (`commands.ExitCode`, the same in every command):
  0   done (or nothing left to do)
  1   bad flags
  2   bad config value (no config.pretrain section, a batch too small for BatchNorm, ...), bad
      distributed setup, or a workdir of another kind (a training or cross-validation run)
  3   the loss became NaN/Inf (the latest checkpoint is the last good one)
  4   the dataset is not prepared, or cannot be pretrained on (empty, every image the same)
  5   the workdir's checkpoints cannot be used
  6   config.model.init_from (weights to start from) cannot be read or does not fit the model
  75  stopped by SIGTERM/SIGINT after saving a checkpoint (run it again to resume)
Every failure at start-up happens before anything in the workdir is changed.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from isic_jax import config_utils
from isic_jax.commands import ExitCode, fail, no_arguments, validated_config
from isic_jax.data import dataset
from isic_jax.evaluation import cv
from isic_jax.models import PretrainedError
from isic_jax.pretraining import task
from isic_jax.training import checkpointing, distributed, loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (or preset name) with get_config() and a config.pretrain "
    "section, e.g. pretrain_cpu_sample.", lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Pretraining folder: config.json, pretrain.json, checkpoints/, "
    "tensorboard/ (resumed if any).")
flags.mark_flags_as_required(["config", "workdir"])
config_utils.friendly_override_errors(_CONFIG)
_DIST = distributed.define_flags()
flags.adopt_module_key_flags(distributed)


def main(argv: list[str]) -> None:
    no_arguments(argv)
    config = validated_config("pretrain", _CONFIG)
    if cv.is_cv_workdir(_WORKDIR.value):
        fail("pretrain", f"{_WORKDIR.value} is a cross-validation workdir ({cv.MANIFEST}): "
             f"pretrain into a new --workdir", ExitCode.USAGE)
    try:
        _DIST.maybe_initialize()
    except distributed.DistributedError as e:
        fail("pretrain", e, ExitCode.USAGE)

    try:
        result = task.pretrain(config, _WORKDIR.value)
    except config_utils.ConfigError as e:
        fail("pretrain", e, ExitCode.USAGE)
    except loop.NonFiniteError as e:
        fail("pretrain", e, ExitCode.NON_FINITE)
    except (dataset.DataNotFoundError, task.PretrainDataError) as e:
        fail("pretrain", e, ExitCode.DATA)
    except checkpointing.CheckpointError as e:
        fail("pretrain", e, ExitCode.CHECKPOINT)
    except PretrainedError as e:
        fail("pretrain", e, ExitCode.WEIGHTS)
    if result.get("stopped_by_signal"):
        sys.exit(ExitCode.PREEMPTED)


if __name__ == "__main__":
    app.run(main)
