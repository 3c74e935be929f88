"""ConvNeXt (Liu et al. 2022) in timm's layout: `convnext_tiny`, `convnext_small`, `convnext_base`.

timm's `ConvNeXt` with its defaults: a 4x4/4 "patchify" stem convolution and LayerNorm; four
stages, each after the first opened by LayerNorm + a 2x2/2 convolution; blocks of a 7x7
depthwise convolution, LayerNorm (channels last, eps 1e-6), an MLP (4x, exact GELU), layer scale
(gamma, initialised to 1e-6) and stochastic depth on the residual branch; global average pooling,
LayerNorm on the pooled features (timm's `head.norm`), the classifier (`head.fc`). No BatchNorm:
the model has no `batch_stats`.

Stochastic depth (`config.model.drop_path`): linspace(0, rate, number of blocks) over the blocks,
as timm.

Top-level modules (timm names):
    stem_conv, stem_norm                stem.0, stem.1
    stage{i}_downsample (i > 1)         stages.{i-1}.downsample.{0: norm, 1: conv}
    stage{i}_block{j}                   stages.{i-1}.blocks.{j-1} (conv_dw, norm, mlp.fc1,
                                        mlp.fc2, gamma)
    final_norm                          head.norm
    head                                head.fc
Parts: stem, stage1 ... stage4, final. Grad-CAM reads `final_features` (the last stage's output).

On CPU the depthwise convolutions are XLA's own (`cpu_lowering` takes no grouped convolutions);
the stem and downsampling convolutions go through `cpu_lowering` with lowering "auto".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from isic_jax.models import layers
from isic_jax.models.classifier import Classifier
from isic_jax.models.registry import Family, FlatKey, WeightLayout, register

LAYER_SCALE_INIT = 1e-6


class ConvNeXtBlock(nn.Module):
    """timm's `ConvNeXtBlock` (conv_mlp=False): x + drop_path(gamma * mlp(norm(conv_dw(x)))).

    x: [B, H, W, C] -> [B, H, W, C].
    """

    conv: Callable[..., nn.Conv]
    dense: Callable[..., nn.Dense]
    norm: Callable[..., nn.LayerNorm]
    drop_path: float = 0.0
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        y = self.conv(channels, (7, 7), padding=layers.symmetric_padding(7),
                      feature_group_count=channels, name="conv_dw")(x)
        y = self.norm(name="norm")(y)
        y = layers.Mlp(4 * channels, self.dense, name="mlp")(y)
        gamma = self.param("gamma", nn.initializers.constant(LAYER_SCALE_INIT), (channels,),
                           jnp.float32)
        y = y * gamma.astype(y.dtype)
        return x + layers.drop_path(self, y, self.drop_path, self.train)


class Downsample(nn.Module):
    """timm's stage downsampling: LayerNorm then a 2x2/2 convolution (bias).

    x: [B, H, W, C_in] -> [B, H // 2, W // 2, out].
    """

    out: int
    conv: Callable[..., nn.Conv]
    norm: Callable[..., nn.LayerNorm]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.norm(name="norm")(x)
        return self.conv(self.out, (2, 2), 2, padding=0, name="conv")(x)


class ConvNeXt(Classifier, kw_only=True):
    """ConvNeXt under the shared `Classifier` head (see the module docstring).

    Attributes (besides `Classifier`'s):
      depths: blocks per stage ((3, 3, 9, 3) for tiny).
      dims: channels per stage ((96, 192, 384, 768) for tiny).
      drop_path: stochastic depth rate of the last block (0: off).
    """

    depths: Sequence[int]
    dims: Sequence[int]
    drop_path: float = 0.0

    def parts(self) -> tuple[str, ...]:
        return ("stem", *(f"stage{i + 1}" for i in range(len(self.depths))), "final")

    def cam_layer(self, params: Any) -> str:
        return "final_features"

    def features(self, x: jax.Array, train: bool) -> jax.Array:
        """x: float32 [B, H, W, 3] -> pooled, LayerNorm-ed float32 [B, dims[-1]]."""
        conv = layers.conv(self, use_bias=True, kernel_init=layers.trunc_normal)
        dense = layers.dense(self, kernel_init=layers.trunc_normal)
        norm = layers.layer_norm(self.dtype)
        x = conv(self.dims[0], (4, 4), 4, padding=0, name="stem_conv")(x)
        x = norm(name="stem_norm")(x)
        rates = layers.drop_path_rates(self.drop_path, sum(self.depths))
        index = 0
        for i, (depth, dim) in enumerate(zip(self.depths, self.dims, strict=True)):
            if i > 0:
                x = Downsample(dim, conv, norm, name=f"stage{i + 1}_downsample")(x)
            for j in range(depth):
                x = ConvNeXtBlock(conv, dense, norm, drop_path=rates[index], train=train,
                                  name=f"stage{i + 1}_block{j + 1}")(x)
                index += 1
        x = layers.Tap(name="final_features")(x)
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return layers.layer_norm(jnp.float32)(name="final_norm")(pooled)


ARCHITECTURES: dict[str, dict[str, Any]] = {
    "convnext_tiny": {"depths": (3, 3, 9, 3), "dims": (96, 192, 384, 768)},
    "convnext_small": {"depths": (3, 3, 27, 3), "dims": (96, 192, 384, 768)},
    "convnext_base": {"depths": (3, 3, 27, 3), "dims": (128, 256, 512, 1024)},
    # For tests and smoke runs (no timm counterpart).
    "convnext_test": {"depths": (1, 1, 1, 1), "dims": (16, 24, 32, 48)},
}


def torch_key(key: FlatKey) -> tuple[str, str]:
    """The timm tensor name of a ConvNeXt variable, and its layout change:

        stem_conv / stem_norm              -> stem.0 / stem.1
        stage{i}_downsample/norm | conv    -> stages.{i-1}.downsample.0 | .1
        stage{i}_block{j}/<sub>            -> stages.{i-1}.blocks.{j-1}.<sub> (mlp/fc1 ->
                                              mlp.fc1, dense; gamma)
        final_norm / head                  -> head.norm / head.fc (dense)

    Raises:
      ValueError: a variable the mapping does not know.
    """
    collection, top, *rest = key
    leaf = rest.pop()
    fixed = {"stem_conv": "stem.0", "stem_norm": "stem.1", "final_norm": "head.norm",
             "head": "head.fc"}
    if top in fixed and not rest:
        return layers.torch_leaf(collection, fixed[top], leaf, dense=top == "head")
    match = re.fullmatch(r"stage(\d+)_(downsample|block(\d+))", top)
    if not match:
        raise ValueError(f"no timm ConvNeXt name for {'/'.join(key)}")
    stage = int(match[1]) - 1
    if match[3] is None:
        if len(rest) != 1 or rest[0] not in ("norm", "conv"):
            raise ValueError(f"no timm ConvNeXt name for {'/'.join(key)}")
        index = 0 if rest[0] == "norm" else 1
        return layers.torch_leaf(collection, f"stages.{stage}.downsample.{index}", leaf)
    prefix = ".".join([f"stages.{stage}.blocks.{int(match[3]) - 1}", *rest])
    return layers.torch_leaf(collection, prefix, leaf, dense=bool(rest) and rest[0] == "mlp")


def recognise(tensors: Mapping[str, np.ndarray]) -> str | None:
    """What a timm ConvNeXt state dict is ("a convnext_tiny (depths 3-3-9-3, dims 96-...): set
    --config.model.name=convnext_tiny"), or None when it is no ConvNeXt."""
    if "stem.0.weight" not in tensors or "stages.0.blocks.0.conv_dw.weight" not in tensors:
        return None
    depths, dims = [], []
    while True:
        prefix = f"stages.{len(depths)}.blocks."
        blocks = {k[len(prefix):].split(".")[0] for k in tensors if k.startswith(prefix)}
        if not blocks:
            break
        dims.append(int(tensors[f"{prefix}0.conv_dw.weight"].shape[0]))
        depths.append(len(blocks))
    layout = f"depths {'-'.join(map(str, depths))}, dims {'-'.join(map(str, dims))}"
    fc1 = tensors.get("stages.0.blocks.0.mlp.fc1.weight")
    if fc1 is None or fc1.ndim != 2:
        return (f"a ConvNeXt with a convolutional MLP ({layout}; timm's convnext_atto ... nano), "
                f"which isic_jax does not build")
    name = next((n for n, arch in ARCHITECTURES.items()
                 if tuple(arch["depths"]) == tuple(depths) and tuple(arch["dims"]) == tuple(dims)),
                None)
    if name is None:
        return f"a ConvNeXt ({layout}) that matches no isic_jax architecture"
    return f"a {name} ({layout}): set --config.model.name={name}"


FAMILY = register(Family(
    name="convnext",
    module=ConvNeXt,
    architectures=ARCHITECTURES,
    options=lambda model_config: {"drop_path": float(getattr(model_config, "drop_path", 0.0))},
    weights=WeightLayout(torch_key=torch_key, recognise=recognise,
                         head=("head.fc.weight", "head.fc.bias")),
    batch_norm=False,
    config_keys=("drop_path",),
))
