"""`isic-jax train --config configs/X.py --workdir DIR [--config.a.b=value ...]`.

Trains with the config file's `get_config()` plus command-line overrides; a second run on the same
workdir resumes from its newest readable checkpoint (on any number of devices or processes).

Several processes (one per host, each driving its local devices) run on JAX's own distributed
runtime: under SLURM, Open MPI, a Cloud TPU pod or a Kubernetes indexed Job the cluster is detected
and `jax.distributed.initialize()` is called before anything touches a device; elsewhere pass
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` to every process. Every process
runs the same command; process 0 prints and writes the logs, all write checkpoints.

SIGTERM or SIGINT (a scheduler's preemption, a time limit, `kubectl delete`, Ctrl-C): every process
finishes its current step, they all save a checkpoint of that same step and exit with status 75;
rerunning the same command resumes. A second signal or SIGKILL ends a process at once; the last
completed checkpoint is kept.

Exit status (`commands.ExitCode`, the same in every command):
  0   training done (or nothing left to do)
  1   bad flags (absl: unknown flag, `--config.a.b` override of an unknown key or of the wrong type)
  2   bad config value, or bad distributed setup (incomplete flags, coordinator port in use),
      or a workdir of another kind (a cross-validation or a pretraining workdir)
  3   the loss became NaN/Inf (the latest checkpoint is the last good one)
  4   the dataset config.data names is not prepared under config.data.data_dir
  5   the workdir's checkpoints cannot be used: another model's, or none readable
  6   the pretrained weights (config.model.init_from) cannot be read or do not fit the model
  75  stopped by SIGTERM/SIGINT after saving a checkpoint (EX_TEMPFAIL: run it again to resume;
      Kubernetes and SLURM recipes in scripts/launch restart on it)
Every failure at start-up (1, 2, 4, 5, 6) happens before the checkpoint folder is changed.
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
from isic_jax.training import checkpointing, distributed, loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Python config file with get_config(), e.g. configs/default.py.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run folder: config.json, checkpoints/, tensorboard/, eval/ (resumed if any)."
)
flags.mark_flags_as_required(["config", "workdir"])
config_utils.friendly_override_errors(_CONFIG)
_DIST = distributed.define_flags()
flags.adopt_module_key_flags(distributed)


def main(argv: list[str]) -> None:
    no_arguments(argv)
    config = validated_config("train", _CONFIG)
    if cv.is_cv_workdir(_WORKDIR.value):
        fail("train", f"{_WORKDIR.value} is a cross-validation workdir ({cv.MANIFEST}): resume "
             f"it with `isic-jax cv --config ... --workdir {_WORKDIR.value}`, or train into a new "
             f"--workdir", ExitCode.USAGE)
    # First JAX call of the process: joining the other processes must come before anything
    # touches a device (importing jax alone does not).
    try:
        _DIST.maybe_initialize()
    except distributed.DistributedError as e:
        fail("train", e, ExitCode.USAGE)

    try:
        result = loop.train_and_evaluate(config, _WORKDIR.value)
    except config_utils.ConfigError as e:
        fail("train", e, ExitCode.USAGE)
    except loop.NonFiniteError as e:
        fail("train", e, ExitCode.NON_FINITE)
    except dataset.DataNotFoundError as e:
        fail("train", e, ExitCode.DATA)
    except checkpointing.CheckpointError as e:
        fail("train", e, ExitCode.CHECKPOINT)
    except PretrainedError as e:
        fail("train", e, ExitCode.WEIGHTS)
    if result.get("stopped_by_signal"):
        sys.exit(ExitCode.PREEMPTED)


if __name__ == "__main__":
    app.run(main)
