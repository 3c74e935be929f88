"""ResNet v1.5 in Flax Linen (He et al. 2016; stride in the bottleneck's 3x3 conv).

Layout follows torchvision's ResNet so that parameter counts match the reference (ResNet-18:
11,689,512; ResNet-50: 25,557,032 with a 1000-class head): bias-free convolutions with symmetric
padding, BatchNorm (momentum 0.9, epsilon 1e-5 in Flax's convention, i.e. PyTorch's 0.1), a
7x7/2 stem and a 3x3/2 max-pool, four stages (or fewer for the tiny test models), global average
pooling, optional dropout, one dense head.

Why Linen: the train step stays a pure function of (state, batch, rng) whose variables are plain
pytrees, which `jax.pmap` and `jax.jit` over a Mesh wrap alike (as the Flax ImageNet example and
big_vision do); NNX would need split/merge at every such boundary.

Input size: any size works, but on CPU use 65 px or more. At 64 px the last stage's feature map
is 2x2, smaller than the 3x3 kernel, and XLA:CPU falls back to a slow generic convolution loop
(~3-4x slower than at 80 px, measured on 2-core Zen CPUs).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from isic_jax.models import cpu_lowering
from isic_jax.models.head import classifier_head

ModuleDef = Any

# torchvision's kaiming_normal_(mode="fan_out", nonlinearity="relu").
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pad(kernel: int) -> list[tuple[int, int]]:
    """Symmetric 'same' padding of a square odd kernel, as PyTorch's `padding=k // 2`.

    For stride 2 on an even size, XLA's "SAME" pads (0, 1) while this pads (1, 1); the output
    sizes agree, and the numbers match torchvision weights exactly.
    """
    return [(kernel // 2, kernel // 2)] * 2


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34). Output channels = `filters`.

    x: [B, H, W, C_in] -> [B, ceil(H / strides), ceil(W / strides), filters].
    """

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[jax.Array], jax.Array] = nn.relu
    strides: int = 1

    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides, padding=_pad(3), name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), padding=_pad(3), name="conv2")(y)
        # Zero scale on the branch's last BN: each block starts as the identity (Goyal et al.).
        y = self.norm(scale_init=nn.initializers.zeros_init(), name="bn2")(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, padding=0, name="proj_conv")(
                residual
            )
            residual = self.norm(name="proj_bn")(residual)
        return self.act(residual + y)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (strided, v1.5) -> 1x1 convolutions (ResNet-50 and deeper).

    x: [B, H, W, C_in] -> [B, ceil(H / strides), ceil(W / strides), 4 * filters].
    """

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[jax.Array], jax.Array] = nn.relu
    strides: int = 1

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x
        y = self.conv(self.filters, (1, 1), padding=0, name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        # v1.5: the stride sits in the 3x3 conv, not in the first 1x1 (v1 loses 3/4 of the input).
        y = self.conv(self.filters, (3, 3), self.strides, padding=_pad(3), name="conv2")(y)
        y = self.act(self.norm(name="bn2")(y))
        y = self.conv(self.filters * self.expansion, (1, 1), padding=0, name="conv3")(y)
        y = self.norm(scale_init=nn.initializers.zeros_init(), name="bn3")(y)
        if residual.shape != y.shape:
            residual = self.conv(
                self.filters * self.expansion, (1, 1), self.strides, padding=0, name="proj_conv"
            )(residual)
            residual = self.norm(name="proj_bn")(residual)
        return self.act(residual + y)


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


class ResNet(nn.Module):
    """ResNet v1.5 classifier, optionally with a metadata branch fused before the head.

    Attributes:
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50. Stage i > 0 starts with a
        stride-2 block; stage i has `width * 2**i` filters (times 4 out for bottlenecks).
      block_cls: BasicBlock or BottleneckBlock.
      num_classes: size of the head.
      width: channels of the stem and of the first stage (64 standard).
      dropout: dropout rate on the pooled features, before the head (active only if train).
      msd_samples: multi-sample dropout: K dropout masks, head on each, logits averaged
        (training only; `head.classifier_head`). 1: plain dropout.
      dtype: compute dtype (float32 or bfloat16). Parameters stay float32; BatchNorm statistics
        are reduced in float32; pooling and the head run in float32, logits are float32.
      axis_name: BatchNorm averages its batch statistics over this mapped axis (pmap); None
        under jit over a Mesh, where the batch is already global.
      frozen_bn: parts ("stem", "stage1", ...) whose BatchNorm layers normalise with their
        running statistics and never update them, even when train=True (fine-tuning with
        frozen BatchNorm); the parameters are the same either way.
      metadata_groups, metadata_missing: the metadata encoder's column groups and missing row
        (`MetadataBranch`); empty: images only. With them, `__call__` takes `metadata`
        float32 [B, F] and the head sees [pooled image features, metadata features].
      metadata_hidden, metadata_dropout: `MetadataBranch.hidden` and `feature_dropout`.
      lowering: "auto": convolutions and max-pooling through `cpu_lowering` (its own lowering
        on CPU, XLA's native ops on GPU/TPU); "xla": XLA's native ops on every platform. The
        parameters and the numbers (to float rounding) are the same.
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int
    width: int = 64
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
        statistics and updates `batch_stats` (pass `mutable=["batch_stats"]`) and, if dropout > 0
        or with metadata, needs `rngs={"dropout": key}`. `return_embedding`: also the
        penultimate features float32 [B, D] (pooled image features, with the metadata
        branch's), as (logits, embedding).
        """
        if self.metadata_width and metadata is None:
            raise ValueError(f"this model takes metadata float32 [B, {self.metadata_width}]")
        if not self.metadata_width and metadata is not None:
            raise ValueError("this model has no metadata branch (config.model.metadata is empty)")
        conv = functools.partial(
            nn.Conv,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=_conv_init,
            conv_general_dilated=cpu_lowering.conv_general_dilated
            if self.lowering == "auto" else None,
        )
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            axis_name=self.axis_name,
        )
        # Frozen parts: inference-mode BatchNorm (no batch statistics, no collective, no update).
        frozen_norm = functools.partial(norm, use_running_average=True)
        part_norm = lambda part: frozen_norm if part in self.frozen_bn else norm
        x = conv(self.width, (7, 7), (2, 2), padding=_pad(7), name="stem_conv")(x)
        x = nn.relu(part_norm("stem")(name="stem_bn")(x))
        if self.lowering == "auto":
            x = cpu_lowering.max_pool(x, 3, 2, _pad(3))
        else:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                x = self.block_cls(
                    filters=self.width * 2**i,
                    strides=2 if i > 0 and j == 0 else 1,
                    conv=conv,
                    norm=part_norm(f"stage{i + 1}"),
                    name=f"stage{i + 1}_block{j + 1}",
                )(x)
        # Pool and classify in float32: cheap, and keeps bfloat16 rounding out of the logits.
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if self.metadata_width:
            branch = MetadataBranch(self.metadata_groups, self.metadata_missing,
                                    self.metadata_hidden, self.metadata_dropout, name="metadata")
            x = jnp.concatenate([x, branch(metadata, train)], axis=-1)
        embedding = x
        logits = classifier_head(x, num_classes=self.num_classes, dropout=self.dropout,
                                 msd_samples=self.msd_samples, train=train)
        return (logits, embedding) if return_embedding else logits


# name -> (block class, blocks per stage). The tiny ones are for tests and smoke runs.
ARCHITECTURES: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (BottleneckBlock, (3, 4, 6, 3)),
    "resnet101": (BottleneckBlock, (3, 4, 23, 3)),
    "resnet152": (BottleneckBlock, (3, 8, 36, 3)),
    "resnet200": (BottleneckBlock, (3, 24, 36, 3)),
    "resnet_tiny": (BasicBlock, (1, 1)),
    "resnet_tiny_bottleneck": (BottleneckBlock, (1, 1)),
}
