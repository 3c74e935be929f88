"""The classifier every backbone shares: pooled features -> [metadata branch] -> dropout (or
multi-sample dropout) -> head.

A family subclasses `Classifier` and implements `features(x, train) -> f32 [B, D]` (the pooled
backbone output). `features` runs inside the compact `__call__`, so the modules it creates are
top-level modules of the model (`stem_conv`, `stage1_block1`, ...), next to `metadata` and
`head`: parameter paths stay flat, as the ResNets of earlier runs have them.

Top-level module names follow one convention that the optimiser, freezing and layer decay read:
the part a module belongs to is the text before its first "_" ("stage3_block2" -> "stage3"),
and "head" and "metadata" are the head (`part_of`). Each family lists its parts in input-to-
output order (`models.registry.Family.parts`).
"""

from __future__ import annotations

import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from isic_jax.models.head import classifier_head

HEAD = "head"
_HEAD_MODULES = ("head", "metadata")


def natural_key(name: str) -> tuple:
    """Sort key that orders "block10" after "block9"."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def part_of(name: str) -> str:
    """The part a top-level module belongs to: "stem_conv" -> "stem", "stage3_block2" ->
    "stage3", "head" and "metadata" -> "head"."""
    if name in _HEAD_MODULES:
        return HEAD
    return name.split("_", 1)[0]


class MetadataBranch(nn.Module):
    """A small MLP on the encoded patient/lesion metadata, fused with the image features.

    Feature dropout (training only): each feature of each example is replaced by its "missing"
    encoding with probability `feature_dropout` (ISIC 2019's winners used 0.1), so the model
    learns to do without any one of them, as at inference where values are often missing.

    Attributes:
      groups: the feature index of each input column (F columns, `MetadataEncoder.groups()`).
      missing: the encoding of a row with every feature missing (F values).
      hidden: width of the two dense layers.
      feature_dropout: probability of dropping one feature of one example in training.
    """

    groups: tuple[int, ...]
    missing: tuple[float, ...]
    hidden: int = 128
    feature_dropout: float = 0.1

    @nn.compact
    def __call__(self, m: jax.Array, train: bool = False) -> jax.Array:
        """m: float32 [B, F] encoded metadata -> float32 [B, hidden]."""
        m = m.astype(jnp.float32)
        if train and self.feature_dropout > 0:
            num_features = max(self.groups) + 1
            drop = jax.random.bernoulli(self.make_rng("dropout"), self.feature_dropout,
                                        (m.shape[0], num_features))
            m = jnp.where(drop[:, jnp.asarray(self.groups)], jnp.asarray(self.missing), m)
        dense = functools.partial(nn.Dense, dtype=jnp.float32, param_dtype=jnp.float32)
        m = nn.silu(dense(self.hidden, name="dense1")(m))
        return nn.silu(dense(self.hidden, name="dense2")(m))


class Classifier(nn.Module, kw_only=True):
    """Base of every model: a backbone's pooled features, optionally fused with a metadata
    branch, then dropout and one dense head.

    Attributes:
      num_classes: size of the head.
      dropout: dropout rate on the pooled features, before the head (active only if train).
      dtype: compute dtype of the backbone (float32 or bfloat16). Parameters stay float32;
        pooling, the metadata branch and the head run in float32, logits are float32.
      axis_name: BatchNorm averages its batch statistics over this mapped axis (pmap); None
        under jit over a Mesh, where the batch is already global.
      frozen_bn: parts whose BatchNorm layers normalise with their running statistics and never
        update them, even when train=True (fine-tuning with frozen BatchNorm).
      metadata_groups, metadata_missing: the metadata encoder's column groups and missing row
        (`MetadataBranch`); empty: images only. With them, `__call__` takes `metadata`
        float32 [B, F] and the head sees [pooled image features, metadata features].
      metadata_hidden, metadata_dropout: `MetadataBranch.hidden` and `feature_dropout`.
      lowering: "auto": convolutions through `cpu_lowering` where the family uses it (its own
        lowering on CPU, XLA's native ops on GPU/TPU); "xla": XLA's native ops everywhere.
      msd_samples: dropout masks of multi-sample dropout on the pooled features
        (`head.classifier_head`); 1: plain dropout.
    """

    num_classes: int
    dropout: float = 0.0
    dtype: Any = jnp.float32
    axis_name: str | None = None
    frozen_bn: tuple[str, ...] = ()
    metadata_groups: tuple[int, ...] = ()
    metadata_missing: tuple[float, ...] = ()
    metadata_hidden: int = 128
    metadata_dropout: float = 0.1
    lowering: str = "auto"
    msd_samples: int = 1

    @property
    def metadata_width(self) -> int:
        """F, the metadata columns the model takes (0: images only)."""
        return len(self.metadata_groups)

    def features(self, x: jax.Array, train: bool) -> jax.Array:
        """The backbone: x float32 [B, H, W, 3] -> pooled features [B, D] (any float dtype).

        Called inside the compact `__call__`: the modules it creates are the model's top-level
        modules, named `<part>_<what>`."""
        raise NotImplementedError

    def parts(self) -> tuple[str, ...]:
        """The backbone's parts, input to output ("stem", "stage1", ...; the head excluded):
        what `config.finetune.freeze_stages` counts and `layer_decay` runs over."""
        raise NotImplementedError

    def cam_layer(self, params: Any) -> str:
        """The top-level module whose output (f32 [B, h, w, C]) Grad-CAM explains: by default
        the last module (in natural order: block10 after block9) of the last part that has one.

        Raises:
          ValueError: params hold no module of any part.
        """
        for part in reversed(self.parts()):
            names = [name for name in params if part_of(name) == part]
            if names:
                return max(names, key=natural_key)
        raise ValueError(f"no module of the parts {self.parts()} among {sorted(params)}")

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        train: bool = False,
        metadata: jax.Array | None = None,
        return_embedding: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """x: float32 [B, H, W, 3] normalised image -> logits float32 [B, num_classes].

        metadata: float32 [B, F] (models with a metadata branch only). Train mode uses batch
        statistics and updates `batch_stats` (pass `mutable=["batch_stats"]`) and, if dropout > 0,
        with metadata, or with stochastic depth, needs `rngs={"dropout": key}`.
        `return_embedding`: also the penultimate features float32 [B, D] (pooled image
        features, with the metadata branch's), as (logits, embedding).
        """
        if self.metadata_width and metadata is None:
            raise ValueError(f"this model takes metadata float32 [B, {self.metadata_width}]")
        if not self.metadata_width and metadata is not None:
            raise ValueError("this model has no metadata branch (config.model.metadata is empty)")
        # Classify in float32: cheap, and keeps bfloat16 rounding out of the logits.
        x = self.features(x, train).astype(jnp.float32)
        if self.metadata_width:
            branch = MetadataBranch(self.metadata_groups, self.metadata_missing,
                                    self.metadata_hidden, self.metadata_dropout, name="metadata")
            x = jnp.concatenate([x, branch(metadata, train)], axis=-1)
        embedding = x
        logits = classifier_head(x, num_classes=self.num_classes, dropout=self.dropout,
                                 msd_samples=self.msd_samples, train=train)
        return (logits, embedding) if return_embedding else logits
