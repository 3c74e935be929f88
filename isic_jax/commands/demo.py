"""`isic-jax demo`: the main job on generated data, end to end, on this machine's CPU (or devices).

isic-jax demo [--workdir runs/demo] [--num-images 1000] [--seed 0] [--num-epochs 12]

Runs, each as the `isic-jax` command a user would type (printed before it runs):
  1. synth    a synthetic ISIC 2020-style download in WORKDIR/download
  2. prepare  the TFDS dataset in WORKDIR/tfds (128 px, 5 patient-grouped folds)
  3. train    configs/demo.py (a small ResNet-18) in WORKDIR/train; resumes if interrupted
  4. evaluate the validation fold: WORKDIR/train/eval/val/metrics.json + figures
Steps already done are reused, so running it again finishes an interrupted demo.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess
import sys

from absl import flags

from isic_jax import config_utils
from isic_jax.commands import no_arguments, underscore_alias

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Folder for data, checkpoints, metrics.")
_NUM_IMAGES = underscore_alias(
    flags.DEFINE_integer("num-images", 1000, "Synthetic images to generate.", 50)
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic data.")
_NUM_EPOCHS = underscore_alias(
    flags.DEFINE_float("num-epochs", None, "Overrides config.train.num_epochs.")
)
_CONFIG = flags.DEFINE_string(
    "config", "demo", "Config to train with: a preset name or a config file."
)

STORED_SIZE = 128


def _run(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "isic_jax", *args]
    print(f"\n$ isic-jax {shlex.join(args)}", flush=True)
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        print(f"isic-jax demo: `isic-jax {args[0]}` failed (exit {done.returncode})",
              file=sys.stderr)
        sys.exit(done.returncode)


def main(argv: list[str]) -> None:
    no_arguments(argv)
    workdir = pathlib.Path(_WORKDIR.value).expanduser().absolute()
    config = config_utils.config_file(_CONFIG.value)
    if config == _CONFIG.value:  # a path, not a preset: absolute, as the steps run elsewhere
        config = str(pathlib.Path(config).absolute())
    download, data_dir, run = workdir / "download", workdir / "tfds", workdir / "train"
    workdir.mkdir(parents=True, exist_ok=True)

    if not (download / "ISIC_2020_Training_GroundTruth_v2.csv").exists():
        _run(["synth", f"--output={download}", "--format=isic2020",
              f"--num-images={_NUM_IMAGES.value}", f"--seed={_SEED.value}"])
    _run(["prepare", f"--source={download}", f"--data-dir={data_dir}", "--format=isic2020",
          f"--image-size={STORED_SIZE}", f"--report={workdir / 'prepare_report.json'}"])
    train_args = ["train", f"--config={config}", f"--workdir={run}",
                  f"--config.data.data_dir={data_dir}",
                  f"--config.data.stored_size={STORED_SIZE}"]
    if _NUM_EPOCHS.value is not None:
        train_args.append(f"--config.train.num_epochs={_NUM_EPOCHS.value}")
    _run(train_args)
    _run(["evaluate", f"--workdir={run}", "--split=val", "--checkpoint=latest"])

    metrics_path = run / "eval" / "val" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    print("\nDemo finished.")
    for key in ("auc", "pauc_80", "balanced_accuracy", "sensitivity", "specificity"):
        if metrics.get(key) is not None:
            print(f"  validation {key:<18} {metrics[key]:.4f}")
    print(f"  metrics:     {metrics_path}")
    print(f"  figures:     {metrics_path.parent}{os.sep}*.png")
    print(f"  checkpoints: {run / 'checkpoints'}")
    print(f"  TensorBoard: tensorboard --logdir {run}")
