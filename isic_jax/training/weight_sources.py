"""Where pretrained weights come from (`config.model.init_from`), read and matched to a model.

    variables = load_pretrained("resnet50-0676ba61.pth", config.model, num_classes=2)
    pre = load("hf-hub:timm/efficientnet_b0.ra_in1k", config.model, 2, image_size=224)
    pre.variables, pre.mean, pre.std, pre.head, pre.ignored, pre.record()

Sources: weight files, Hub repositories and snapshot folders (`models.weight_files`), and this
project's own runs and exports, read here because they are checkpoints of the trainer: an
isic_jax export (model.json + variables/) or workdir (config.json + checkpoints/) gives the best
checkpoint by that run's train.best_metric, else the latest; the SWA or EMA weights when the run
kept them (what it evaluated with), checked against the checksums saved with them
(`training.integrity`). Matching to the model is `models.weight_mapping`.

A self-supervised pretraining workdir (`isic-jax pretrain`: config.json + checkpoints/ +
pretrain.json) gives the online backbone of its latest checkpoint (BYOL keeps the online encoder,
Grill et al. 2020; the latest, not a "best" one: the pretraining is not selected on labels),
checked alike: its projector and predictor are dropped (listed in `Pretrained.ignored`) and the
head is re-initialised (it has none).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from isic_jax import config_utils
from isic_jax.data.isic import labels
from isic_jax.models import weight_files
from isic_jax.models.weight_files import HUB_PREFIX, PretrainedError, Source, is_triple, short
from isic_jax.models.weight_mapping import (
    TRACE_SIZE,
    FlatKey,
    Pretrained,
    flatten,
    match,
)
from isic_jax.training import checkpointing, integrity

# The folders an isic_jax run and export write. inference/export.py sits above this layer:
# tests/test_pretrained.py checks that the export's names agree.
RUN_CONFIG_FILE = config_utils.CONFIG_FILENAME
RUN_CHECKPOINTS_DIR = checkpointing.CHECKPOINTS_DIR
RUN_STATE_ITEM = checkpointing.STATE
EXPORT_METADATA_FILE = "model.json"
EXPORT_VARIABLES_DIR = "variables"
# What marks a self-supervised pretraining workdir (written by isic_jax.pretraining, which sits
# above this layer): the method, the backbone, the modules that are not the classifier's.
PRETRAIN_RECORD_FILE = "pretrain.json"
PRETRAIN_MODULES = ("projector", "predictor")  # dropped when the backbone is taken

PyTree = Any


def load_pretrained(
    source: str | os.PathLike,
    model_config: Any,
    num_classes: int,
    *,
    init_head: str = "auto",
    class_names: Sequence[str] | None = None,
    rng: jax.Array | None = None,
    image_size: int = TRACE_SIZE,
) -> dict[str, PyTree]:
    """Variables for `create_model(model_config, num_classes)` from pretrained weights.

    Args:
      source: a `config.model.init_from` value (see the module docstring).
      model_config: `config.model` (name, width; the rest does not shape the variables).
      num_classes: the model's classes.
      init_head: "auto" or "reinit" (see the module docstring).
      class_names: this model's classes in order, when known: an isic_jax source's head is
        kept only when they are its classes.
      rng: PRNG key of a re-initialised head (default key(0)).
      image_size: the training input side, px (a ViT's position embedding depends on it).

    Returns:
      {"params": ..., "batch_stats": ...} of float32 jax arrays, ready for
      `model.apply(variables, x, train=False)`.

    Raises:
      PretrainedError: the source is missing or unreadable, or does not fit the model.
    """
    pre = load(source, model_config, num_classes, init_head=init_head,
               class_names=class_names, rng=rng, image_size=image_size)
    return jax.tree.map(jnp.asarray, pre.variables)



def load(
    source: str | os.PathLike,
    model_config: Any,
    num_classes: int,
    *,
    init_head: str = "auto",
    class_names: Sequence[str] | None = None,
    rng: jax.Array | None = None,
    image_size: int = TRACE_SIZE,
) -> Pretrained:
    """`load_pretrained` with what was done: the variables as host numpy arrays, the head
    decision, the ignored keys, the normalisation and the provenance (see `Pretrained`)."""
    return match(read_source(source), model_config, num_classes, init_head=init_head,
                 class_names=class_names, rng=rng, image_size=image_size)



def read_source(spec: str | os.PathLike) -> Source:
    """Resolves and reads `config.model.init_from` (see the module docstring).

    Raises:
      PretrainedError: nothing there, an unknown kind of file, or unreadable contents.
    """
    spec = os.fspath(spec)
    if not spec:
        raise PretrainedError("config.model.init_from is empty: nothing to load")
    if spec.startswith(HUB_PREFIX):
        return weight_files.read_hub(spec)
    path = pathlib.Path(spec).expanduser()
    if not path.exists():
        raise PretrainedError(
            f"config.model.init_from={spec!r}: {path.absolute()} does not exist (a weights file, "
            f"an isic_jax workdir or export folder, or {HUB_PREFIX}ORG/NAME)")
    path = path.absolute()
    if path.is_dir():
        return _read_folder(spec, path)
    return weight_files.read_weights_file(spec, path)



def _read_folder(spec: str, path: pathlib.Path) -> Source:
    if (path / EXPORT_METADATA_FILE).is_file() and (path / EXPORT_VARIABLES_DIR).is_dir():
        return _read_isic_export(spec, path)
    if (path / RUN_CONFIG_FILE).is_file() and (path / RUN_CHECKPOINTS_DIR).is_dir():
        return _read_isic_workdir(spec, path)
    src = weight_files.read_weights_folder(spec, path)
    if src is not None:
        return src
    raise PretrainedError(
        f"config.model.init_from={spec!r}: {path} is a folder but neither an isic_jax export "
        f"({EXPORT_METADATA_FILE} + {EXPORT_VARIABLES_DIR}/), an isic_jax workdir "
        f"({RUN_CONFIG_FILE} + {RUN_CHECKPOINTS_DIR}/), nor a weights folder "
        f"({' or '.join(weight_files.HUB_WEIGHT_FILES)})")



def _read_isic_export(spec: str, path: pathlib.Path) -> Source:
    meta_path = path / EXPORT_METADATA_FILE
    try:
        meta = json.loads(meta_path.read_text())
        model = meta["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PretrainedError(f"{meta_path}: not an isic_jax model.json ({short(e)})") from e
    src = Source(spec=spec, kind="isic_jax", origin="isic_jax-export", path=path)
    src.variables = _restore_numpy(path / EXPORT_VARIABLES_DIR, ("params", "batch_stats"))
    _verify(spec, src, f"The export {path}", lambda: integrity.check_saved_arrays(
        path / EXPORT_VARIABLES_DIR, _dotted(src.variables)))
    src.architecture, src.width = str(model.get("name")), int(model.get("width", 64))
    src.class_names = [str(c) for c in meta.get("class_names", [])] or None
    pre = meta.get("preprocessing", {})
    if is_triple(pre.get("mean")) and is_triple(pre.get("std")):
        src.mean, src.std = tuple(pre["mean"]), tuple(pre["std"])
    checkpoint = meta.get("checkpoint", {})
    src.details.update({"step": checkpoint.get("step"), "run": checkpoint.get("workdir"),
                        "ema": bool(meta.get("variables", {}).get("ema", False)),
                        "release": meta.get("release"), "task": meta.get("task")})
    return src



def _read_isic_workdir(spec: str, path: pathlib.Path) -> Source:
    try:
        config = json.loads((path / RUN_CONFIG_FILE).read_text())
        model = config["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PretrainedError(f"{path / RUN_CONFIG_FILE}: not an isic_jax run config "
                              f"({short(e)})") from e
    directory = path / RUN_CHECKPOINTS_DIR
    pretrain = read_pretrain_record(path)
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    with ocp.CheckpointManager(directory, options=options) as manager:
        steps = sorted(manager.all_steps())
        if not steps:
            raise PretrainedError(f"{directory} holds no finished checkpoint")
        metric = str(config.get("train", {}).get("best_metric", "auc"))
        best = _best_step(steps, metric, config_utils.best_metric_mode(metric), manager.metrics)
    if pretrain is not None:
        best = None  # the latest: a pretraining is not selected on the probe's labels
    step = best if best is not None else steps[-1]
    state = directory / str(step) / RUN_STATE_ITEM
    tree = _restore_numpy(state, ("params", "batch_stats", "ema", "swa"))
    if pretrain is not None:
        src = _pretrain_source(spec, path, config, pretrain, step, tree)
        _verify(spec, src, f"Checkpoint step {step} of {path}",
                lambda: integrity.check_checkpoint_arrays(directory / str(step), RUN_STATE_ITEM,
                                                          _dotted(tree)))
        return src
    ema = {k[1:]: v for k, v in tree.items() if k[0] == "ema"}
    # The weights evaluation uses (TrainState.eval_variables): SWA once it holds a snapshot.
    swa = {k[1:]: v for k, v in tree.items() if k[0] == "swa" and k[1] != "count"}
    use_swa = bool(swa) and int(tree.get(("swa", "count"), 0)) > 0
    use_ema = bool(ema) and not use_swa
    live = {k: v for k, v in tree.items() if k[0] not in ("ema", "swa")}
    variables = swa if use_swa else ema if use_ema else live
    src = Source(spec=spec, kind="isic_jax", origin="isic_jax-workdir", path=path,
                 variables=variables)
    src.architecture, src.width = str(model.get("name")), int(model.get("width", 64))
    src.class_names = _run_class_names(config.get("data", {}))
    data = config.get("data", {})
    if is_triple(data.get("mean")) and is_triple(data.get("std")):
        src.mean, src.std = tuple(data["mean"]), tuple(data["std"])
    src.details.update({
        "step": int(step), "checkpoint": "best" if best is not None else "latest",
        "best_metric": metric if best is not None else None, "ema": use_ema, "swa": use_swa,
        "release": data.get("release"), "task": data.get("task"),
    })
    which = f"best by {metric}" if best is not None else "latest: no step has validation metrics"
    src.notes.append(f"Checkpoint step {step} of {path} ({which}; "
                     f"{'SWA' if use_swa else 'EMA' if use_ema else 'live'} weights).")
    _verify(spec, src, f"Checkpoint step {step} of {path}",
            lambda: integrity.check_checkpoint_arrays(directory / str(step), RUN_STATE_ITEM,
                                                      _dotted(tree)))
    return src


def _dotted(flat: Mapping[FlatKey, np.ndarray]) -> dict[str, np.ndarray]:
    """Flat keys -> the dotted names of the checksums ("params.conv_init.kernel")."""
    return {".".join(key): value for key, value in flat.items()}


def _verify(spec: str, src: Source, what: str, check: Any) -> None:
    """Checks an isic_jax source's weights against the checksums saved with them (`check()`
    -> status): a difference is a PretrainedError naming the array; a source without
    checksums gets a note."""
    try:
        status = check()
    except integrity.IntegrityError as e:
        raise PretrainedError(f"config.model.init_from={spec!r}: {e}") from e
    if status == integrity.ABSENT:
        src.notes.append(integrity.absent_note(what))



def read_pretrain_record(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """A pretraining workdir's pretrain.json (None: not a pretraining workdir).

    Raises:
      PretrainedError: the file is there but unreadable.
    """
    path = pathlib.Path(workdir) / PRETRAIN_RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise PretrainedError(f"{path}: not an isic_jax pretraining record ({short(e)})") from e
    return record


def _pretrain_source(spec: str, path: pathlib.Path, config: Mapping[str, Any],
                     record: Mapping[str, Any], step: int,
                     tree: Mapping[FlatKey, np.ndarray]) -> Source:
    """The online backbone of a pretraining checkpoint: its projector and predictor (and any
    other module the record names) dropped with a reason, no head, no class names."""
    method = str(record.get("method", "self-supervised")).upper()
    dropped = tuple(record.get("dropped_modules") or PRETRAIN_MODULES)
    variables, ignored = {}, []
    for key, value in tree.items():
        if key[0] == "ema" or key[0] not in ("params", "batch_stats"):
            continue
        if key[1] in dropped:
            ignored.append(f"{'/'.join(key)}: the {method} {key[1]} (pretraining only)")
        else:
            variables[key] = value
    model, data = config.get("model", {}), config.get("data", {})
    src = Source(spec=spec, kind="isic_jax", origin="isic_jax-pretrain", path=path,
                 variables=variables, ignored=ignored)
    src.architecture, src.width = str(model.get("name")), int(model.get("width", 64))
    src.class_names = None  # no head
    if is_triple(data.get("mean")) and is_triple(data.get("std")):
        src.mean, src.std = tuple(data["mean"]), tuple(data["std"])
    probe = record.get("probe") or {}
    src.details.update({
        "step": int(step), "checkpoint": "latest", "ema": False, "weights": "online",
        "self_supervised": {k: record.get(k) for k in ("method", "paper", "release",
                                                       "held_out_fold", "images")},
        "release": data.get("release"), "task": None,
        "knn_auc": probe.get("knn_auc"), "knn_auc_initial": probe.get("knn_auc_initial"),
    })
    src.notes.append(
        f"Self-supervised {method} pretraining, step {step} of {path} (latest checkpoint; the "
        f"online backbone; {len(ignored)} projector/predictor tensors dropped).")
    return src


def _best_step(steps: list[int], metric: str, mode: str, metrics_of: Any) -> int | None:
    """The step with the best finite `metric` (ties: the later step); None when none has it."""
    best, best_value = None, None
    for step in steps:
        try:
            value = float((metrics_of(step) or {}).get(metric))
        except (TypeError, ValueError):
            continue
        if not np.isfinite(value):
            continue
        better = best_value is None or (value >= best_value if mode == "max"
                                        else value <= best_value)
        if better:
            best, best_value = step, value
    return best



def _run_class_names(data: Mapping[str, Any]) -> list[str] | None:
    if data.get("task") == "binary":
        return list(labels.LABEL_NAMES)
    return list(labels.DIAGNOSIS_CLASSES.get(str(data.get("release")), [])) or None



def _restore_numpy(path: pathlib.Path, keys: Sequence[str]) -> dict[FlatKey, np.ndarray]:
    """The `keys` subtrees of an Orbax PyTree checkpoint as host numpy arrays (nothing else
    is read: an optimiser state stays on disk), flattened."""
    try:
        out = integrity.restore_tree(path, keys)
    except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many types
        raise PretrainedError(f"{path}: the checkpoint cannot be read ({short(e)})") from e
    return {k: np.asarray(v) for k, v in flatten(out).items()}
