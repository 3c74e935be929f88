"""Training and evaluation runs with injected devices, data and interruptions (tests, benchmarks).

    result = runs.train(config, workdir, devices=jax.devices()[:2], data=in_memory_data,
                        stop_after_step=4)     # returns after step 4, as if killed there
    result = runs.pretrain(pretrain_config, workdir, data=in_memory_data)   # the same for BYOL
    metrics = runs.evaluate(workdir, "val", "latest", data=in_memory_data)

The same phases as `isic-jax train` and `isic-jax evaluate`; only where data and devices come
from, and where the run stops, differ.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import ml_collections

from isic_jax import config_utils
from isic_jax.data.dataset import InputData
from isic_jax.evaluation import evaluate as evaluate_lib
from isic_jax.pretraining import task as pretrain_task
from isic_jax.testing import hooks
from isic_jax.training import loop, parallel


def train(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    devices: list[jax.Device] | None = None,
    data: InputData | None = None,
    stop_after_step: int | None = None,
) -> dict[str, Any]:
    """`loop.train_and_evaluate` on `devices` with `data`; `stop_after_step` returns right
    after that step, saving nothing more (as a killed process would). The kill hooks of
    `ISIC_JAX_TEST_KILL_AT` are installed (`hooks.install`)."""
    hooks.install()
    return loop.run(loop.set_up(config, workdir, devices=devices, data=data),
                    until=stop_after_step)


def pretrain(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    devices: list[jax.Device] | None = None,
    data: InputData | None = None,
    stop_after_step: int | None = None,
) -> dict[str, Any]:
    """`pretraining.task.pretrain` on `devices` with `data`, as `train` (`stop_after_step`: as
    if killed right after that step)."""
    hooks.install()
    return loop.run(pretrain_task.set_up(config, workdir, devices=devices, data=data),
                    until=stop_after_step)


def evaluate(
    workdir: str | pathlib.Path,
    split: str = "val",
    checkpoint: str | int = "latest",
    *,
    devices: list[jax.Device] | None = None,
    data: InputData | None = None,
    report: bool = True,
) -> dict[str, Any]:
    """`evaluate.evaluate_checkpoint` on `devices` with `data` (default: what the run's saved
    config names)."""
    workdir = pathlib.Path(workdir).absolute()
    config = config_utils.load_config(workdir)
    par = parallel.DataParallel.create(config.train.parallelism, devices)
    data = data or InputData.for_run(config, workdir, read_train_labels=False)
    return evaluate_lib.evaluate_run(workdir, config, data, par, split, checkpoint, report=report)
