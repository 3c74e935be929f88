"""Run a checkpoint of a training run over a split and write its metrics, predictions and report.

    result = evaluate_checkpoint("runs/r50", split="val", checkpoint="best")
    # -> runs/r50/eval/val/metrics.json, predictions.csv, the report's PNG figures (roc, pr,
    #    operating_point, confusion_matrix, calibration, score_distribution, auc_by_subgroup:
    #    report.py; mistakes.png: the most confident mistakes with Grad-CAM, gradcam.py) and
    #    report.html, all of it in one self-contained file (html_report.py)

metrics.json (analysis.py): point estimates with bootstrap intervals, calibration before/after
temperature scaling, the operating threshold. On the validation split ("val") the temperature and
the threshold are fitted; another split reuses those of `eval/val/metrics.json` when it is from
the same checkpoint (else they are fitted on that split, and metrics.json says so).

The run's saved config (`workdir/config.json`) defines the data, the model and the evaluation
batch; the devices are whatever this process has (a checkpoint written on 4 devices evaluates on
1: the state is restored into a target built with `jax.eval_shape` and this process's sharding).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
from typing import Any

import jax
import numpy as np

from isic_jax import config_utils
from isic_jax import metrics as metrics_lib
from isic_jax.data import dataset, device_augment, image_ops, metadata
from isic_jax.evaluation import analysis, features, gradcam, html_report
from isic_jax.evaluation import report as report_lib
from isic_jax.models import create_model
from isic_jax.training import checkpointing, integrity, parallel, predictions, steps
from isic_jax.training import state as train_state
from isic_jax.utils import as_bytes, to_json_compatible

# Images in the mistakes figure (a 4 x 4 grid of image + Grad-CAM pairs).
NUM_MISTAKES = 16
MISTAKES_FIGURE = "mistakes.png"
VALIDATION_SPLIT = "val"


def restore_for_eval(
    workdir: str | os.PathLike,
    config: Any,
    num_classes: int,
    par: parallel.DataParallel,
    checkpoint: str | int = "latest",
) -> tuple[train_state.TrainState, int, dict[str, Any] | None]:
    """Restores one checkpoint of `workdir` onto `par`'s devices (replicated for `par`).

    Returns:
      (state as `par.compile_eval_step` expects it, the checkpoint's step, the validation
      metrics saved with it (None when it has none)).

    Raises:
      integrity.IntegrityError: the checkpoint's content differs from the checksums saved with
        it (the message names the step and the array).
    """
    abstract = train_state.abstract_train_state(config, num_classes,
                                                metadata.load_encoder(workdir))
    with checkpointing.open_checkpointer(workdir, config, read_only=True) as ckpt:
        step = ckpt.resolve_step(checkpoint)
        target = checkpointing.abstract_target(abstract, par.state_sharding())
        restored = ckpt.restore(step, target, with_rng=False, with_config=False)
        metrics = ckpt.metrics(step)
    if restored.checksums == integrity.ABSENT and jax.process_index() == 0:
        print(integrity.absent_note(f"Checkpoint {ckpt.step_path(step)}"), flush=True)
    return par.replicate(restored.state), step, metrics


def mistake_images(
    source: Any, preds: predictions.Predictions, rows: np.ndarray, image_size: int
) -> np.ndarray:
    """The evaluation pipeline's images of some predictions, re-read from the split's source.

    Args:
      source: the split's random-access records (`InputData.source(split)`), which
        `preds.index` indexes.
      preds: predictions over that split.
      rows: int[K] rows of `preds`.
      image_size: config.data.image_size.

    Returns:
      uint8 [K, S, S, 3], `image_ops.eval_image` of each record (what the model was given).

    Raises:
      ValueError: a record's image_id is not the prediction's (source and predictions disagree).
    """
    images = np.zeros((len(rows), image_size, image_size, 3), np.uint8)
    for k, row in enumerate(np.asarray(rows, np.int64)):
        record = source[int(preds.index[row])]
        if "image_id" in record and preds.image_id[row]:
            found = as_bytes(record["image_id"]).decode("utf-8", "replace")
            if found != preds.image_id[row]:
                raise ValueError(
                    f"record {int(preds.index[row])} of the split is {found!r}, but the "
                    f"prediction is for {preds.image_id[row]!r}"
                )
        images[k] = image_ops.eval_image(as_bytes(record["image"]), image_size)
    return images


def write_report(
    out_dir: pathlib.Path,
    preds: predictions.Predictions,
    *,
    class_names: list[str],
    malignant_classes: list[int],
    threshold: float,
    source: Any,
    image_size: int,
    model: Any,
    variables: dict[str, Any],
    preprocess: Any,
    num_mistakes: int = NUM_MISTAKES,
    summary: dict[str, Any] | None = None,
    calibrated_probs: np.ndarray | None = None,
    metadata_encoder: Any = None,
) -> dict[str, Any]:
    """The evaluation report: `report.write_report`'s figures and the mistakes' Grad-CAM grid.

    Args:
      out_dir: folder for the PNGs (beside metrics.json).
      preds: the split's predictions (with sex, age, anatom_site, patient_id for the subgroups).
      class_names, malignant_classes, threshold: as for `predictions.summarize`.
      source: the split's records (`InputData.source(split)`), for the mistakes' images.
      image_size: config.data.image_size (the evaluation crop).
      model: the evaluated `flax.linen.Module` (no axis_name).
      variables: {"params", "batch_stats"} the evaluation used (EMA ones when kept), one copy,
        on the host or this process's default device.
      preprocess: uint8 [B, S, S, 3] -> model input float32, as the eval step does it.
      num_mistakes: images in mistakes.png.
      summary: the split's metrics (`analysis.analyse`), for intervals, operating point and
        calibration in the figures.
      calibrated_probs: f64 [N, C] after temperature scaling (the figures' probabilities; the
        raw ones then appear in the calibration figure as "before").
      metadata_encoder: the run's `metadata.MetadataEncoder` (a model with a metadata branch:
        Grad-CAM is computed with each mistake's own metadata).

    Returns:
      JSON-ready {"subgroup_auc": {variable: {group: {n, num_malignant, num_patients, auc,
      auc_se}}}, "figures": [PNG file names written], "most_confident_mistakes": [{image_id,
      label, predicted, probability, index}] in figure order}.
    """
    rep = report_lib.write_report(
        out_dir,
        probs=preds.probs if calibrated_probs is None else calibrated_probs,
        labels=preds.labels,
        class_names=class_names,
        malignant_classes=malignant_classes,
        threshold=threshold,
        metadata=analysis.metadata_of(preds),
        summary=summary,
        raw_probs=None if calibrated_probs is None else preds.probs,
    )
    rows = gradcam.most_confident_mistakes(preds.probs, preds.labels, num_mistakes)
    mistakes = gradcam.write_mistakes_figure(
        out_dir / MISTAKES_FIGURE,
        model,
        variables,
        mistake_images(source, preds, rows, image_size),
        probs=preds.probs[rows],
        labels=preds.labels[rows],
        class_names=class_names,
        image_ids=list(preds.image_id[rows]),
        preprocess=preprocess,
        metadata=None if metadata_encoder is None else metadata_encoder.encode_records(
            [source[int(preds.index[r])] for r in rows]),
    )
    for entry, row in zip(mistakes, rows, strict=True):
        entry["index"] = int(preds.index[row])  # record index in the split's source
    return {
        "subgroup_auc": rep["subgroup_auc"],
        "figures": [*rep["figures"], MISTAKES_FIGURE],
        "most_confident_mistakes": mistakes,
    }


def evaluate_checkpoint(
    workdir: str | os.PathLike,
    split: str = "val",
    checkpoint: str | int = "latest",
    *,
    report: bool = True,
    features_path: str | os.PathLike | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Evaluates one checkpoint of a run on a split, on all of this process's devices, with the
    data the run's saved config names; see `evaluate_run` (`features_path` too). `overrides`:
    `analysis.EvalSettings` fields (None keeps the run's value), e.g. bootstrap_samples=2000.

    Raises:
      config_utils.ConfigError: a bad override (checked before anything runs).
    """
    workdir = pathlib.Path(workdir).absolute()
    config = config_utils.load_config(workdir)
    settings = analysis.EvalSettings.from_config(config, **overrides)
    par = parallel.DataParallel.create(config.train.parallelism)
    data = dataset.InputData.for_run(config, workdir, read_train_labels=False)  # no sampling
    return evaluate_run(workdir, config, data, par, split, checkpoint, report=report,
                        settings=settings, features_path=features_path)


def predict_checkpoint(
    workdir: pathlib.Path,
    config: Any,
    data: dataset.InputData,
    par: parallel.DataParallel,
    split: str = "val",
    checkpoint: str | int = "latest",
    *,
    with_embedding: bool = False,
) -> tuple[predictions.Predictions, int, Any, Any]:
    """One checkpoint of a run over one padded pass of a split (`with_embedding`: also the
    penultimate features of every image, `Predictions.embedding`).

    Returns:
      (predictions, the checkpoint's step, the restored state (replicated for `par`), the model).
    """
    par.check_global_batch(int(config.eval.batch_size), "config.eval.batch_size")
    state, step, _ = restore_for_eval(workdir, config, data.num_classes, par, checkpoint)
    model = create_model(config.model, data.num_classes, metadata=data.metadata)
    aug = steps.augment_config(config)
    step_fn = steps.embed_step if with_embedding else steps.eval_step
    p_eval = par.compile_eval_step(functools.partial(step_fn, model=model, augment=aug))
    preds = predictions.predict_split(p_eval, state, data.eval_batches(split), par,
                                      prefetch=max(1, int(config.data.device_prefetch)))
    return preds, step, state, model


def evaluate_run(
    workdir: pathlib.Path,
    config: Any,
    data: dataset.InputData,
    par: parallel.DataParallel,
    split: str = "val",
    checkpoint: str | int = "latest",
    *,
    report: bool = True,
    write: bool = True,
    settings: analysis.EvalSettings | None = None,
    features_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluates one checkpoint of a run on a split; writes metrics.json, predictions.csv and
    (with `report`) the report's figures (see `write_report`) and report.html.

    Args:
      workdir: the `isic-jax train` run folder (absolute).
      config: its saved config (`config_utils.load_config(workdir)`).
      data: the run's data (`dataset.InputData(config)`).
      par: the devices to run on.
      split: "val" (the validation fold), "train" (the other folds) or a builder split name.
      checkpoint: "latest", "best" or a step number.
      report: also write the PNG figures and report.html, and add "figures" and
        "most_confident_mistakes" to the metrics (process 0 only).
      write: False computes the metrics without writing anything (export uses it).
      settings: evaluation settings (default: from config).
      features_path: also write the stacking features of every image there (.csv or .parquet;
        `evaluation.features`).

    Returns:
      The metrics dict written to `workdir/eval/<split>/metrics.json`.
    """
    preds, step, state, model = predict_checkpoint(workdir, config, data, par, split, checkpoint,
                                                   with_embedding=features_path is not None)
    settings = settings or analysis.EvalSettings.from_config(config)
    fitted = fitted_for(workdir, split, int(step), preds, data.malignant_classes, settings)
    result, calibrated = evaluation_result(preds, data, config, split, checkpoint, step,
                                           settings, fitted)
    if jax.process_index() != 0 or not write:
        return result
    # Metrics and predictions first: they stay even if drawing the report fails.
    out_dir = write_evaluation(workdir, split, result, preds, data, calibrated,
                               float(fitted.threshold))
    if features_path is not None:
        layouts = {d["release"]: d.get("tabular_columns") or ()
                   for d in (data.info.datasets or ())}
        table = features.feature_table(preds, data.class_names, data.malignant_classes,
                                       data.source(split), layouts)
        result["features_file"] = str(features.write_table(table, features_path))
    if report:
        # One host copy of what was evaluated (EMA when kept): Grad-CAM then runs on this
        # process's default device alone, whatever the sharding of the restored state.
        variables = jax.device_get(par.unreplicate(state).eval_variables())
        result.update(
            write_report(
                out_dir,
                preds,
                class_names=data.class_names,
                malignant_classes=data.malignant_classes,
                threshold=float(fitted.threshold),
                source=data.source(split),
                image_size=int(config.data.image_size),
                model=model,
                variables=variables,
                preprocess=lambda x: device_augment.preprocess_eval(
                    x, steps.augment_config(config)),
                summary=result,
                calibrated_probs=calibrated,
                metadata_encoder=data.metadata,
            )
        )
        result = to_json_compatible(result)
        _write_json(out_dir / "metrics.json", result)
        html_report.write_html_report(out_dir, result, run=str(workdir))
        result["report"] = html_report.REPORT_FILE
        _write_json(out_dir / "metrics.json", result)
    return result


def evaluation_result(
    preds: predictions.Predictions, data: dataset.InputData, config: Any, split: str,
    checkpoint: str | int, step: int, settings: analysis.EvalSettings,
    fitted: analysis.Fitted,
) -> tuple[dict[str, Any], np.ndarray]:
    """metrics.json's content (JSON-ready: which checkpoint on which split, and everything
    `analysis.analyse` reports) and the calibrated probabilities f64 [N, C]."""
    summary, calibrated = analysis.analyse(preds, data.class_names, data.malignant_classes,
                                           settings, fitted)
    result = to_json_compatible({
        "split": split,
        "checkpoint": str(checkpoint),
        "step": int(step),
        "ema": float(config.optim.ema_decay) > 0,
        "class_names": data.class_names,
        **summary,
    })
    return result, calibrated


def write_evaluation(
    workdir: pathlib.Path, split: str, result: dict[str, Any], preds: predictions.Predictions,
    data: dataset.InputData, calibrated: np.ndarray, threshold: float,
) -> pathlib.Path:
    """Writes `workdir/eval/<split>/{metrics.json, predictions.csv}`; returns that folder."""
    out_dir = workdir / "eval" / split
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "metrics.json", result)
    _, malignant = metrics_lib.malignant_score(calibrated, preds.labels, data.malignant_classes)
    predictions.write_predictions(out_dir / "predictions.csv", preds, data.class_names,
                                  malignant_probability=malignant, threshold=threshold)
    return out_dir


def fitted_for(
    workdir: pathlib.Path,
    split: str,
    step: int,
    preds: predictions.Predictions,
    malignant_classes: list[int],
    settings: analysis.EvalSettings,
) -> analysis.Fitted:
    """The temperature and threshold to evaluate `split` with: fitted on it when it is the
    validation split; for another split, those of `workdir/eval/val/metrics.json` when that is
    the same checkpoint, threshold method and target, else fitted on the split itself
    (with a warning: its sensitivity then meets the target by construction)."""
    if split != VALIDATION_SPLIT:
        path = workdir / "eval" / VALIDATION_SPLIT / "metrics.json"
        if path.is_file():
            fitted = analysis.Fitted.from_metrics(json.loads(path.read_text()))
            same_target = (settings.threshold_method != "sensitivity"
                           or fitted is not None
                           and fitted.target_sensitivity == settings.target_sensitivity)
            if (fitted is not None and fitted.step == step
                    and fitted.method == settings.threshold_method and same_target):
                return fitted
        logging.warning(
            "No evaluation of the validation split for step %d in %s: the temperature and the "
            "operating threshold are fitted on %r itself. Run `isic-jax evaluate --split val` "
            "for this checkpoint first to apply the validation fold's.", step, path.parent, split)
    return analysis.fit(preds.probs, preds.labels, malignant_classes, settings, split=split,
                        step=step)


def _write_json(path: pathlib.Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def validation_metrics(
    workdir: str | os.PathLike, config: Any, step: int
) -> tuple[dict[str, Any] | None, str]:
    """The validation split's metrics of one checkpoint, for an export and its model card.

    `workdir/eval/val/metrics.json` when it is of this step and has the calibration and
    operating point, else an evaluation of the validation split run now, in memory (nothing is
    written, one device), when the run's dataset is prepared here.

    Returns:
      (metrics or None, how they were obtained, or why there are none).
    """
    workdir = pathlib.Path(workdir).absolute()
    path = workdir / "eval" / VALIDATION_SPLIT / "metrics.json"
    if path.is_file():
        found = json.loads(path.read_text())
        if found.get("step") == step and analysis.Fitted.from_metrics(found) is not None:
            return found, f"{path} (isic-jax evaluate, step {step})"
    try:
        data = dataset.InputData.for_run(config, workdir, read_train_labels=False)
    except (FileNotFoundError, ValueError) as e:  # DataNotFoundError is a FileNotFoundError
        return None, (f"not evaluated: no evaluation of step {step} in {path.parent}, and the "
                      f"run's dataset cannot be opened here ({' '.join(str(e).split())[:300]})")
    par = parallel.DataParallel.create("jit", [jax.local_devices()[0]])
    found = evaluate_run(workdir, config, data, par, VALIDATION_SPLIT, step, report=False,
                         write=False)
    return found, f"evaluated at export (validation split, step {step})"
