"""The model registry: every `config.model.name` and what the trainer needs from its family.

A family is one module that defines a `Classifier` subclass and registers its names:

    register(Family(
        name="resnet",
        module=ResNet,
        architectures={"resnet18": {"block_cls": BasicBlock, "stage_sizes": (2, 2, 2, 2)}, ...},
        options=lambda model_config: {"width": int(model_config.get("width", 64))},
        weights=WeightLayout(torch_key=..., recognise=..., head=("fc.weight", "fc.bias")),
    ))

From the module the rest of the trainer reads the parts (`Classifier.parts`: freezing, per-part
learning rates, layer decay), the Grad-CAM layer (`Classifier.cam_layer`) and the head, dropout,
metadata branch and embedding (`Classifier.__call__`, the same for every family); from the
entry, the pretrained key mapping and input normalisation (`WeightLayout`) and whether the
model carries BatchNorm statistics. `docs/models.md` walks through adding a family.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from isic_jax.data import image_ops
from isic_jax.models.classifier import Classifier

FlatKey = tuple[str, ...]

IMAGENET_MEAN: tuple[float, ...] = tuple(float(v) for v in image_ops.IMAGENET_MEAN)
IMAGENET_STD: tuple[float, ...] = tuple(float(v) for v in image_ops.IMAGENET_STD)


@dataclasses.dataclass(frozen=True)
class WeightLayout:
    """How a family's variables are named in timm (and torchvision) state dicts.

    Attributes:
      torch_key: a flat variable key ("params"|"batch_stats", module, ..., leaf) -> (the torch
        tensor name, its layout change: "conv" OIHW -> HWIO, "dense" [out, in] -> [in, out],
        or "same"); raises ValueError for a variable it does not know.
      recognise: a state dict -> a short description ("a resnet50 (bottleneck blocks 3-4-6-3,
        width 64): set --config.model.name=resnet50") when it is of this family, else None.
      head: the source's classifier weight and bias names.
      mean, std: the normalisation the family's ImageNet weights were trained with (a timm
        config.json, when the source has one, wins).
      ignored_suffixes: source tensors with no counterpart that are dropped silently (with a
        reason in `Pretrained.ignored`), e.g. BatchNorm's `num_batches_tracked`.
      resize: (torch name, source array, the shape this model needs) -> the array adapted to
        it, or None when it cannot be (e.g. a ViT position embedding resampled to another
        grid); None: shapes must match as they are.
    """

    torch_key: Callable[[FlatKey], tuple[str, str]]
    recognise: Callable[[Mapping[str, np.ndarray]], str | None]
    head: tuple[str, str] = ("fc.weight", "fc.bias")
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    ignored_suffixes: tuple[str, ...] = (".num_batches_tracked",)
    resize: Callable[[str, np.ndarray, tuple[int, ...]], np.ndarray | None] | None = None


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
      name: the family ("resnet", "efficientnet", ...).
      module: its `Classifier` subclass.
      architectures: `config.model.name` -> the module's architecture arguments.
      options: `config.model` -> the module arguments the family reads from the config besides
        the shared ones (e.g. ResNet's width, stochastic depth rates).
      weights: how timm names its tensors, or None when no pretrained layout is known.
      batch_norm: whether the model carries BatchNorm statistics (`batch_stats` non-empty).
      config_keys: the `config.model` keys `options` reads (listed in errors and docs).
    """

    name: str
    module: type[Classifier]
    architectures: Mapping[str, Mapping[str, Any]]
    options: Callable[[Any], dict[str, Any]] = lambda model_config: {}
    weights: WeightLayout | None = None
    batch_norm: bool = True
    config_keys: tuple[str, ...] = ()


FAMILIES: dict[str, Family] = {}
_BY_MODEL: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Adds a family and its model names.

    Raises:
      ValueError: the family or one of its model names is registered already.
    """
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is registered already")
    taken = sorted(set(family.architectures) & set(_BY_MODEL))
    if taken:
        raise ValueError(f"model names {taken} of {family.name!r} are registered already")
    FAMILIES[family.name] = family
    for name in family.architectures:
        _BY_MODEL[name] = family
    return family


def model_names() -> tuple[str, ...]:
    """Every registered `config.model.name`."""
    return tuple(_BY_MODEL)


def family_of(name: str) -> Family:
    """The family of a model name.

    Raises:
      ValueError: an unknown name; the message lists the known ones by family and suggests the
        closest.
    """
    family = _BY_MODEL.get(name)
    if family is None:
        raise ValueError(unknown_model_message(name))
    return family


def unknown_model_message(name: str) -> str:
    """"Unknown config.model.name='x': must be a registered model; got ... (did you mean
    ...? known: resnet: resnet18, ...; ...)"."""
    return f"Unknown config.model.name={name!r}: {check_name(name)}."


def check_name(name: Any) -> str | None:
    """None for a registered model name; else what is wrong, with the closest known name and
    every known one by family (the config check's message)."""
    if name in _BY_MODEL:
        return None
    close = difflib.get_close_matches(str(name), list(_BY_MODEL), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    known = "; ".join(f"{f.name}: {', '.join(f.architectures)}" for f in FAMILIES.values())
    return f"must be a registered model, got {name!r} ({hint}known: {known})"
