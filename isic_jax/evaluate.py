"""Run a checkpoint of a training run over a split and write its metrics and predictions.

    result = evaluate_checkpoint("runs/r50", split="val", checkpoint="best")
    # -> runs/r50/eval/val/metrics.json, runs/r50/eval/val/predictions.csv

The run's saved config (`workdir/config.json`) defines the data, the model and the evaluation
batch; the devices are whatever this process has (a checkpoint written on 4 devices evaluates on
1: the state is restored into a target built with `jax.eval_shape` and this process's sharding).
"""

from __future__ import annotations

import csv
import functools
import json
import os
import pathlib
from typing import Any

import jax
import numpy as np

from isic_jax import checkpointing, config_utils, parallel, train


def restore_for_eval(
    workdir: str | os.PathLike,
    config: Any,
    num_classes: int,
    par: parallel.DataParallel,
    checkpoint: str | int = "latest",
) -> tuple[train.TrainState, int]:
    """Restores one checkpoint of `workdir` onto `par`'s devices (replicated for `par`).

    Returns:
      (state as `par.compile_eval_step` expects it, the checkpoint's step).
    """
    from isic_jax.models import create_model
    from isic_jax.optim import create_optimizer

    ckpt = checkpointing.Checkpointer(pathlib.Path(workdir) / "checkpoints", read_only=True,
                                      best_metric=config.train.best_metric,
                                      best_mode=config_utils.best_metric_mode(
                                          config.train.best_metric))
    try:
        step = ckpt.resolve_step(checkpoint)
        model = create_model(config.model, num_classes)
        # The optimiser only shapes opt_state here (the schedule lengths do not matter).
        tx, _ = create_optimizer(config.optim, total_steps=1, steps_per_epoch=1)
        init_rng, _ = train.seed_keys(config.seed)
        use_ema = float(config.optim.ema_decay) > 0
        abstract = jax.eval_shape(
            lambda: train.create_train_state(
                model, tx, init_rng, int(config.data.image_size), use_ema=use_ema
            )
        )
        target = checkpointing.abstract_target(abstract, par.state_sharding())
        restored = ckpt.restore(step, target, with_rng=False, with_config=False)
    finally:
        ckpt.close()
    return par.replicate(restored.state), step


def write_predictions(path: pathlib.Path, preds: train.Predictions, class_names: list[str]) -> None:
    """CSV: image_id, patient_id, label, index, prob_<class> for each class."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["image_id", "patient_id", "label", "index", *[f"prob_{n}" for n in class_names]]
        )
        for i in range(len(preds.labels)):
            writer.writerow(
                [
                    preds.image_id[i],
                    preds.patient_id[i],
                    int(preds.labels[i]),
                    int(preds.index[i]),
                    *[f"{p:.6g}" for p in preds.probs[i]],
                ]
            )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return obj


def evaluate_checkpoint(
    workdir: str | os.PathLike,
    split: str = "val",
    checkpoint: str | int = "latest",
    *,
    devices: list[jax.Device] | None = None,
    data: train.InputData | None = None,
) -> dict[str, Any]:
    """Evaluates one checkpoint of a run on a split; writes metrics.json and predictions.csv.

    Args:
      workdir: the `isic-jax train` run folder.
      split: "val" (the validation fold), "train" (the other folds) or a builder split name.
      checkpoint: "latest", "best" or a step number.
      devices: devices to run on (default all of this process's).
      data: an `train.InputData` (default: opened from the saved config); for tests.

    Returns:
      The metrics dict written to `workdir/eval/<split>/metrics.json`.
    """
    workdir = pathlib.Path(workdir).absolute()
    config = config_utils.load_config(workdir)
    par = parallel.DataParallel.create(config.train.parallelism, devices)
    par.check_global_batch(int(config.eval.batch_size), "config.eval.batch_size")
    data = data or train.InputData(config)
    state, step = restore_for_eval(workdir, config, data.num_classes, par, checkpoint)

    from isic_jax.models import create_model

    model = create_model(config.model, data.num_classes)
    p_eval = par.compile_eval_step(
        functools.partial(train.eval_step, model=model, augment=train.augment_config(config))
    )
    preds = train.predict(p_eval, state, data.eval_batches(split), par,
                          prefetch=max(1, int(config.data.device_prefetch)))
    metrics = train.summarize(preds, data.class_names, data.malignant_classes,
                              float(config.eval.threshold))
    result = {
        "split": split,
        "checkpoint": str(checkpoint),
        "step": int(step),
        "ema": float(config.optim.ema_decay) > 0,
        "class_names": data.class_names,
        **metrics,
    }
    result = _jsonable(result)
    if jax.process_index() == 0:
        out_dir = workdir / "eval" / split
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        write_predictions(out_dir / "predictions.csv", preds, data.class_names)
    return result
