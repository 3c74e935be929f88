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

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from isic_jax.models import cpu_lowering, layers
from isic_jax.models.classifier import Classifier
from isic_jax.models.registry import Family, FlatKey, WeightLayout, register

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


class ResNet(Classifier, kw_only=True):
    """ResNet v1.5 backbone under the shared `Classifier` head.

    Attributes (besides `Classifier`'s):
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50. Stage i > 0 starts with a
        stride-2 block; stage i has `width * 2**i` filters (times 4 out for bottlenecks).
      block_cls: BasicBlock or BottleneckBlock.
      width: channels of the stem and of the first stage (64 standard).

    Top-level modules: stem_conv, stem_bn, stage{i}_block{j}; parts: stem, stage1 ... stageN.
    With lowering "auto", convolutions and max-pooling go through `cpu_lowering` (its own
    lowering on CPU, XLA's native ops on GPU/TPU); the parameters and the numbers (to float
    rounding) are the same as with "xla".
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    width: int = 64

    def parts(self) -> tuple[str, ...]:
        return ("stem", *(f"stage{i + 1}" for i in range(len(self.stage_sizes))))

    def features(self, x: jax.Array, train: bool) -> jax.Array:
        """x: float32 [B, H, W, 3] -> globally average-pooled float32 [B, C]."""
        conv = layers.conv(self, use_bias=False, kernel_init=_conv_init)
        # Frozen parts: inference-mode BatchNorm (no batch statistics, no collective, no update).
        part_norm = lambda part: layers.batch_norm(self, part, train, epsilon=1e-5)
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
        # Pool in float32: cheap, and keeps bfloat16 rounding out of the logits.
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


# config.model.name -> architecture. The tiny ones are for tests and smoke runs; timm and
# torchvision name the others alike (pretrained weights: `torch_key`).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    name: {"block_cls": block, "stage_sizes": sizes}
    for name, block, sizes in [
        ("resnet18", BasicBlock, (2, 2, 2, 2)),
        ("resnet34", BasicBlock, (3, 4, 6, 3)),
        ("resnet50", BottleneckBlock, (3, 4, 6, 3)),
        ("resnet101", BottleneckBlock, (3, 4, 23, 3)),
        ("resnet152", BottleneckBlock, (3, 8, 36, 3)),
        ("resnet200", BottleneckBlock, (3, 24, 36, 3)),
        ("resnet_tiny", BasicBlock, (1, 1)),
        ("resnet_tiny_bottleneck", BottleneckBlock, (1, 1)),
    ]
}


def torch_key(key: FlatKey) -> tuple[str, str]:
    """The torchvision/timm tensor name of a ResNet variable, and its layout change.

        conv1.weight                     -> params/stem_conv/kernel           OIHW -> HWIO
        bn1.{weight,bias}                -> params/stem_bn/{scale,bias}
        bn1.{running_mean,running_var}   -> batch_stats/stem_bn/{mean,var}
        layerS.I.convK / bnK             -> stageS_block{I+1}/convK / bnK
        layerS.0.downsample.0 / .1       -> stageS_block1/proj_conv / proj_bn
        fc.weight [C, F], fc.bias [C]    -> params/head/kernel [F, C], bias [C]

    Returns:
      (name, kind) with kind "conv" (OIHW -> HWIO), "dense" (transposed) or "same".

    Raises:
      ValueError: a variable the mapping does not know.
    """
    collection, *modules, leaf = key
    top, rest = modules[0], modules[1:]
    if top == "stem_conv":
        prefix = "conv1"
    elif top == "stem_bn":
        prefix = "bn1"
    elif top == "head":
        prefix = "fc"
    else:
        match = re.fullmatch(r"stage(\d+)_block(\d+)", top)
        if not match or len(rest) != 1:
            raise ValueError(f"no torchvision name for {'/'.join(key)}")
        stage, block = int(match[1]), int(match[2]) - 1
        sub = {"proj_conv": "downsample.0", "proj_bn": "downsample.1"}.get(rest[0], rest[0])
        prefix = f"layer{stage}.{block}.{sub}"
    return layers.torch_leaf(collection, prefix, leaf, dense=top == "head")


def recognise(tensors: Mapping[str, np.ndarray]) -> str | None:
    """What a torchvision/timm ResNet state dict is: "a resnet50 (bottleneck blocks 3-4-6-3,
    width 64): set ...", a ResNet-D deep stem, or None when it is no ResNet."""
    if "conv1.0.weight" in tensors and "layer1.0.conv1.weight" in tensors:
        return ("a ResNet with a deep stem (conv1.0/1/3/4/6: timm's resnet*d / ResNet-D), "
                "which isic_jax's ResNet does not implement")
    stem = tensors.get("conv1.weight")
    if stem is None or stem.ndim != 4 or "layer1.0.conv1.weight" not in tensors:
        return None
    sizes = []
    while True:
        prefix = f"layer{len(sizes) + 1}."
        blocks = {k[len(prefix):].split(".")[0] for k in tensors if k.startswith(prefix)}
        if not blocks:
            break
        sizes.append(len(blocks))
    bottleneck = "layer1.0.conv3.weight" in tensors
    width = int(stem.shape[0])
    name = next((n for n, arch in ARCHITECTURES.items()
                 if tuple(arch["stage_sizes"]) == tuple(sizes)
                 and (arch["block_cls"] is BottleneckBlock) == bottleneck), None)
    kind = "bottleneck" if bottleneck else "basic"
    layout = f"{kind} blocks {'-'.join(map(str, sizes))}, width {width}"
    if name is None:
        return f"a ResNet-like network ({layout}) that matches no isic_jax architecture"
    return f"a {name} ({layout}): set --config.model.name={name} --config.model.width={width}"


FAMILY = register(Family(
    name="resnet",
    module=ResNet,
    architectures=ARCHITECTURES,
    options=lambda model_config: {"width": int(getattr(model_config, "width", 64))},
    weights=WeightLayout(torch_key=torch_key, recognise=recognise),
    config_keys=("width",),
))
