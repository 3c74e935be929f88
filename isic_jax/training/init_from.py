"""Where a run's weights start, and the input normalisation that goes with them.

    config, pre = resolve(config, workdir, num_classes, class_names, rng)

A fresh run (no checkpoint in the workdir yet) with `config.model.init_from` set reads and checks
the weights here (`training.weight_sources.load`), in phase 1 of the loop: a missing file, a wrong
architecture or width fails before anything is written. A run that resumes does not read them
again (its checkpoint holds the weights; the source may be gone).

`config.data.mean/std` = () resolves to the weights' normalisation (timm's config.json, the
source run's; ImageNet's for torchvision/timm ResNets), or ImageNet's when training from
scratch; on a resume, to what the run recorded in its config.json. The returned config holds the
resolved values, so config.json, every checkpoint, `evaluate` and `export` see them.
"""

from __future__ import annotations

import copy
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from isic_jax import config_utils
from isic_jax.data import image_ops
from isic_jax.models.weight_mapping import Pretrained
from isic_jax.training import checkpointing, weight_sources

RECORD_FILE = "init_from.json"  # in the workdir: where the first weights came from


def has_checkpoints(workdir: str | pathlib.Path) -> bool:
    """Whether the workdir holds a finished checkpoint (a step folder), i.e. the run resumes."""
    directory = pathlib.Path(workdir) / checkpointing.CHECKPOINTS_DIR
    if not directory.is_dir():
        return False
    return any(p.is_dir() and p.name.isdigit() for p in directory.iterdir())


def resolve(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    num_classes: int,
    class_names: Sequence[str] | None,
    rng: jax.Array | None,
) -> tuple[ml_collections.ConfigDict, Pretrained | None, list[str]]:
    """The run's config with config.data.mean/std resolved, the pretrained weights of a fresh
    run (None from scratch or on a resume), and lines to print.

    Args:
      config: the validated config (not changed: a copy is returned).
      workdir: the run folder (may not exist yet).
      num_classes, class_names: the dataset's.
      rng: key of a re-initialised head.

    Raises:
      PretrainedError: the weights cannot be read or do not fit the model.
    """
    config = copy.deepcopy(config)
    source = str(config.model.get("init_from", "") or "")
    resuming = has_checkpoints(workdir)
    messages: list[str] = []
    pre = None
    if source and not resuming:
        pre = weight_sources.load(source, config.model, num_classes,
                                  init_head=str(config.model.get("init_head", "auto")),
                                  class_names=class_names, rng=rng,
                                  image_size=int(config.data.image_size))
        messages.append(pre.summary())
        if str(config.model.get("metadata", "") or "").strip():
            messages.append("The metadata branch and the head (which then also sees the "
                            "metadata features) start from a random init; the backbone from "
                            "the weights.")
    elif source:
        messages.append(f"config.model.init_from={source!r} is not read: the run resumes from "
                        f"its own checkpoints.")

    explicit = bool(config.data.get("mean", ())) and bool(config.data.get("std", ()))
    if explicit:
        mean, std = image_ops.normalization(config.data)
        if pre is not None and not (np.allclose(mean, pre.mean) and np.allclose(std, pre.std)):
            messages.append(
                f"WARNING: the weights expect mean {_fmt(pre.mean)}, std {_fmt(pre.std)} "
                f"({pre.mean_std_from}); config.data.mean/std ({_fmt(mean)}, {_fmt(std)}) "
                f"override it.")
    elif pre is not None:
        mean, std = pre.mean, pre.std
    elif resuming:
        mean, std = _recorded_normalization(workdir)
    else:
        mean, std = image_ops.IMAGENET_MEAN, image_ops.IMAGENET_STD
    with config.data.ignore_type():
        config.data.mean = tuple(round(float(v), 6) for v in mean)
        config.data.std = tuple(round(float(v), 6) for v in std)
    return config, pre, messages


def _recorded_normalization(workdir: str | pathlib.Path) -> tuple[Any, Any]:
    """What a resumed run normalised with: its config.json's (ImageNet's for runs from before
    these keys, which is what they used)."""
    try:
        saved = config_utils.load_config(workdir)
    except (FileNotFoundError, ValueError):
        return image_ops.IMAGENET_MEAN, image_ops.IMAGENET_STD
    return image_ops.normalization(saved.get("data"))


def write_record(workdir: str | pathlib.Path, pre: Pretrained) -> pathlib.Path:
    """workdir/init_from.json: the source, the files read, the head decision, what was ignored
    (atomically; `export` copies it into model.json)."""
    path = pathlib.Path(workdir) / RECORD_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(pre.record(), indent=2) + "\n")
    tmp.replace(path)
    return path


def read_record(workdir: str | pathlib.Path) -> dict[str, Any] | None:
    """workdir/init_from.json, or None (trained from scratch, or before this record existed)."""
    path = pathlib.Path(workdir) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fmt(values: Any) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"
