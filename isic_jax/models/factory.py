"""Building a registered model: `create_model`, its parts, initial variables.

Importing this module registers every family (each family module registers itself).
"""

from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from isic_jax.models import resnet  # noqa: F401 - registers the family
from isic_jax.models.classifier import Classifier
from isic_jax.models.registry import family_of

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DTYPE_NAMES: tuple[str, ...] = tuple(_DTYPES)


def create_model(
    model_config: Any,
    num_classes: int,
    axis_name: str | None = None,
    frozen_bn: tuple[str, ...] = (),
    *,
    metadata: Any = None,
) -> Classifier:
    """Builds the network named by `model_config.name`.

    Args:
      model_config: `config.model` with `name` (a registered model), `dropout` (before the
        head; default 0), `msd_samples` (dropout masks of multi-sample dropout,
        `head.classifier_head`; default 1), `dtype` ("float32" or "bfloat16" compute;
        parameters stay float32; default "float32"), `lowering` ("auto": the CPU lowering of
        `cpu_lowering` on CPU, XLA's own elsewhere; "xla": XLA's own everywhere; default
        "auto"), the metadata branch keys, and the keys its family reads
        (`Family.config_keys`, e.g. ResNet's `width`).
      num_classes: size of the head.
      axis_name: the pmap axis BatchNorm averages its statistics over; None under jit.
      frozen_bn: parts (`part_of` names, no "head") whose BatchNorm layers keep their running
        statistics in training too (training.optim.FineTune.frozen_bn_parts); evaluation needs
        none (it always uses the running statistics).
      metadata: the run's fitted `data.metadata.MetadataEncoder` when config.model.metadata is
        set (its column groups and missing row shape the metadata branch), else None.

    Returns:
      A `Classifier`: `apply({"params", "batch_stats"}, x f32[B,H,W,3], train=bool,
      mutable=["batch_stats"], rngs={"dropout": key}) -> (logits f32[B, num_classes], updates)`.

    Raises:
      ValueError: unknown `config.model.name` (with the closest known name) or
        `config.model.dtype`.
    """
    name = model_config.name
    family = family_of(name)
    dtype_name = getattr(model_config, "dtype", "float32")
    if dtype_name not in _DTYPES:
        raise ValueError(f"Unknown config.model.dtype={dtype_name!r}; known: {', '.join(_DTYPES)}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    return family.module(
        **family.architectures[name],
        **family.options(model_config),
        num_classes=num_classes,
        dropout=float(getattr(model_config, "dropout", 0.0)),
        dtype=_DTYPES[dtype_name],
        axis_name=axis_name,
        frozen_bn=tuple(frozen_bn),
        metadata_groups=tuple(metadata.groups()) if metadata is not None else (),
        metadata_missing=tuple(float(v) for v in metadata.missing_row())
        if metadata is not None else (),
        metadata_hidden=int(getattr(model_config, "metadata_hidden", 128)),
        metadata_dropout=float(getattr(model_config, "metadata_dropout", 0.1)),
        lowering=str(getattr(model_config, "lowering", "auto")),
        msd_samples=int(getattr(model_config, "msd_samples", 1)),
    )


def model_parts(model_config: Any) -> tuple[str, ...]:
    """The backbone parts of the model named by `model_config.name`, input to output (the head
    excluded): ("stem", "stage1", ..., "stage4") for ResNet-18 ... 200."""
    return create_model(model_config, 1).parts()


def init_variables(
    model: nn.Module, rng: jax.Array, image_size: int | tuple[int, int]
) -> dict[str, Any]:
    """Initialises the model (jitted, on a 1-image float32 batch).

    Args:
      model: from `create_model`.
      rng: a PRNG key.
      image_size: side (or (height, width)) of the input images, px. Parameter shapes do not
        depend on it; it only sets the trace shape.

    Returns:
      {"params": pytree of float32 arrays, "batch_stats": pytree of float32 arrays}.
    """
    h, w = (image_size,) * 2 if isinstance(image_size, int | np.integer) else image_size
    dummy = jnp.zeros((1, h, w, 3), jnp.float32)
    width = int(getattr(model, "metadata_width", 0))
    meta = jnp.zeros((1, width), jnp.float32) if width else None
    # The default partitionable threefry compiles slowly on XLA:CPU (tiny ResNet init 3.3 s vs
    # 1.0 s; ResNet-50 6.3 s vs 4.2 s). Init runs unsharded, so the other bit stream is fine:
    # still deterministic given `rng`.
    toggle = getattr(jax, "threefry_partitionable", None)
    with toggle(False) if toggle is not None else contextlib.nullcontext():
        variables = jax.jit(lambda key, x, m: model.init(key, x, train=False, metadata=m))(
            rng, dummy, meta)
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays (or of jax.ShapeDtypeStruct)."""
    return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree.leaves(tree)))
