"""EfficientNet B0-B7 (Tan & Le 2019) in timm's layout: `efficientnet_b*` and the TF ports
`tf_efficientnet_b*`.

timm's `_gen_efficientnet`: a 3x3/2 stem (32 channels x width), seven stages of MBConv blocks
(the first a depthwise-separable block without expansion, the others inverted residuals with
expansion 6), squeeze-and-excitation (reduced channels 0.25 x the block's input channels), SiLU,
a 1x1 head convolution to 1280 x width channels, global average pooling. Widths are rounded to
multiples of 8 (`round_channels`), depths rounded up (`ceil(repeats x depth multiplier)`).

    variant              padding                               BatchNorm eps  momentum (Flax)
    efficientnet_b*      symmetric (k // 2)                    1e-5           0.9
    tf_efficientnet_b*   TF "SAME" (asymmetric at stride 2)    1e-3           0.9

(timm's tf ports set only eps; the momentum stays PyTorch's 0.1, Flax's 0.9.) Weights trained
in TensorFlow (timm's `tf_efficientnet_*` tags) need the tf_ variant: same tensors, other
numbers with the other padding.

Stochastic depth (`config.model.drop_path`): block i of n drops its residual branch with
probability rate * i / n, as timm's EfficientNet builder (blocks without a residual never drop).

Top-level modules (timm names):
    stem_conv, stem_bn          conv_stem, bn1
    stage{s}_block{b}           blocks.{s-1}.{b-1} (conv_dw, bn1, se.conv_reduce/conv_expand,
                                conv_pw, bn2[, conv_pwl, bn3])
    final_conv, final_bn        conv_head, bn2
    head                        classifier
Parts: stem, stage1 ... stage7, final. Grad-CAM reads `final_features` (after conv_head, bn2
and SiLU, the map that is pooled).

On CPU the depthwise convolutions are XLA's own (`cpu_lowering` takes no grouped convolutions);
the 1x1 and the stem convolutions go through `cpu_lowering` with lowering "auto".
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from isic_jax.models import layers
from isic_jax.models.classifier import Classifier
from isic_jax.models.registry import Family, FlatKey, WeightLayout, register

# torch's Conv2d default init is kaiming_uniform(a=sqrt(5)); timm's EfficientNet uses
# fan-out normal for convolutions (`_init_weight_goog`).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# The same for depthwise kernels [k, k, 1, C]: timm's fan-out is k*k*out/groups = k*k, which is
# Flax's fan-in of that shape.
_depthwise_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def padding(tf_same: bool, size: tuple[int, int], kernel: int, stride: int
            ) -> list[tuple[int, int]]:
    """TF "SAME" padding of an input of `size` (the tf_ ports) or timm's symmetric padding."""
    if tf_same:
        return layers.tf_same_padding(size, kernel, stride)
    return layers.symmetric_padding(kernel, stride)


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage of EfficientNet-B0 (timm's arch_def strings, e.g. "ir_r2_k3_s2_e6_c24_se0.25").

    kind: "ds" (depthwise separable, no expansion) or "ir" (inverted residual).
    """

    kind: str
    repeats: int
    kernel: int
    stride: int
    expand: int
    channels: int
    se_ratio: float = 0.25


B0_STAGES: tuple[StageSpec, ...] = (
    StageSpec("ds", 1, 3, 1, 1, 16),
    StageSpec("ir", 2, 3, 2, 6, 24),
    StageSpec("ir", 2, 5, 2, 6, 40),
    StageSpec("ir", 3, 3, 2, 6, 80),
    StageSpec("ir", 3, 5, 1, 6, 112),
    StageSpec("ir", 4, 5, 2, 6, 192),
    StageSpec("ir", 1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """timm's `make_divisible`: the nearest multiple of `divisor` (at least `divisor`), one
    step up when rounding down lost more than 10 %."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def round_channels(channels: int, multiplier: float) -> int:
    """timm's `round_channels` (width multiplier, divisor 8)."""
    return make_divisible(channels * multiplier) if multiplier else channels


def stage_depths(depth_mult: float) -> tuple[int, ...]:
    """Blocks per stage: ceil(repeats x depth multiplier) (timm's `_scale_stage_depth`)."""
    return tuple(int(math.ceil(s.repeats * depth_mult)) for s in B0_STAGES)


class MBConv(nn.Module):
    """timm's `DepthwiseSeparableConv` ("ds") or `InvertedResidual` ("ir") block.

    ds: conv_dw -> bn1 + SiLU -> se -> conv_pw -> bn2.
    ir: conv_pw (expand) -> bn1 + SiLU -> conv_dw -> bn2 + SiLU -> se -> conv_pwl -> bn3.
    A residual (with stochastic depth) when stride 1 and channels in == out.
    x: [B, H, W, C_in] -> [B, ceil(H / stride), ceil(W / stride), out].
    """

    kind: str
    out: int
    kernel: int
    stride: int
    expand: int
    se_ratio: float
    conv: Callable[..., nn.Conv]
    norm: Callable[..., nn.BatchNorm]
    tf_padding: bool = False
    drop_path: float = 0.0
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x
        cin = x.shape[-1]
        act = nn.silu
        if self.kind == "ir":
            mid = make_divisible(cin * self.expand)
            x = self.conv(mid, (1, 1), padding=0, name="conv_pw")(x)
            x = act(self.norm(name="bn1")(x))
            dw_norm, pw_name, pw_norm = "bn2", "conv_pwl", "bn3"
            # timm divides the SE ratio by the expansion: reduced = 0.25 x the block's input.
            se_ratio = self.se_ratio / self.expand
        else:
            mid = cin
            dw_norm, pw_name, pw_norm = "bn1", "conv_pw", "bn2"
            se_ratio = self.se_ratio
        pads = padding(self.tf_padding, x.shape[1:3], self.kernel, self.stride)
        x = self.conv(mid, (self.kernel, self.kernel), self.stride, padding=pads,
                      feature_group_count=mid, kernel_init=_depthwise_init, name="conv_dw")(x)
        x = act(self.norm(name=dw_norm)(x))
        if se_ratio:
            x = layers.SqueezeExcite(round(mid * se_ratio), self.conv, act, name="se")(x)
        x = self.conv(self.out, (1, 1), padding=0, name=pw_name)(x)
        x = self.norm(name=pw_norm)(x)
        if self.stride == 1 and cin == self.out:
            x = layers.drop_path(self, x, self.drop_path, self.train) + shortcut
        return x


class EfficientNet(Classifier, kw_only=True):
    """EfficientNet under the shared `Classifier` head (see the module docstring).

    Attributes (besides `Classifier`'s):
      width_mult, depth_mult: the compound scaling of B0 (B3: 1.2, 1.4).
      tf_padding: TensorFlow "SAME" padding (the tf_ ports) instead of symmetric.
      bn_epsilon: BatchNorm epsilon (1e-5 timm-native, 1e-3 TF ports).
      drop_path: stochastic depth rate of the last block (0: off).
    """

    width_mult: float = 1.0
    depth_mult: float = 1.0
    tf_padding: bool = False
    bn_epsilon: float = 1e-5
    drop_path: float = 0.0

    def parts(self) -> tuple[str, ...]:
        return ("stem", *(f"stage{i + 1}" for i in range(len(B0_STAGES))), "final")

    def cam_layer(self, params: Any) -> str:
        return "final_features"

    def features(self, x: jax.Array, train: bool) -> jax.Array:
        """x: float32 [B, H, W, 3] -> globally average-pooled float32 [B, round(1280 x width)]."""
        conv = layers.conv(self, use_bias=False, kernel_init=_conv_init)
        norm = lambda part: layers.batch_norm(self, part, train, self.bn_epsilon)
        stem = round_channels(STEM_CHANNELS, self.width_mult)
        pads = padding(self.tf_padding, x.shape[1:3], 3, 2)
        x = conv(stem, (3, 3), 2, padding=pads, name="stem_conv")(x)
        x = nn.silu(norm("stem")(name="stem_bn")(x))
        depths = stage_depths(self.depth_mult)
        rates = layers.drop_path_rates(self.drop_path, sum(depths), inclusive=False)
        index = 0
        for s, (spec, depth) in enumerate(zip(B0_STAGES, depths, strict=True)):
            part = f"stage{s + 1}"
            for b in range(depth):
                x = MBConv(
                    kind=spec.kind, out=round_channels(spec.channels, self.width_mult),
                    kernel=spec.kernel, stride=spec.stride if b == 0 else 1, expand=spec.expand,
                    se_ratio=spec.se_ratio, conv=conv, norm=norm(part), tf_padding=self.tf_padding,
                    drop_path=rates[index], train=train, name=f"{part}_block{b + 1}",
                )(x)
                index += 1
        x = conv(round_channels(HEAD_CHANNELS, self.width_mult), (1, 1), padding=0,
                 name="final_conv")(x)
        x = nn.silu(norm("final")(name="final_bn")(x))
        x = layers.Tap(name="final_features")(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


# (width, depth) multipliers of B0 ... B7 (timm's efficientnet_b* / tf_efficientnet_b*).
SCALING: dict[str, tuple[float, float]] = {
    "b0": (1.0, 1.0), "b1": (1.0, 1.1), "b2": (1.1, 1.2), "b3": (1.2, 1.4),
    "b4": (1.4, 1.8), "b5": (1.6, 2.2), "b6": (1.8, 2.6), "b7": (2.0, 3.1),
}
ARCHITECTURES: dict[str, dict[str, Any]] = {}
for _size, (_w, _d) in SCALING.items():
    ARCHITECTURES[f"efficientnet_{_size}"] = {
        "width_mult": _w, "depth_mult": _d, "tf_padding": False, "bn_epsilon": 1e-5}
for _size, (_w, _d) in SCALING.items():
    ARCHITECTURES[f"tf_efficientnet_{_size}"] = {
        "width_mult": _w, "depth_mult": _d, "tf_padding": True, "bn_epsilon": 1e-3}
# For tests and smoke runs (no timm counterpart): 10 blocks (residual ones in stages 4-6), a
# quarter of B0's width, TF padding (the asymmetric case).
ARCHITECTURES["efficientnet_test"] = {
    "width_mult": 0.25, "depth_mult": 0.5, "tf_padding": True, "bn_epsilon": 1e-3}


def torch_key(key: FlatKey) -> tuple[str, str]:
    """The timm tensor name of an EfficientNet variable, and its layout change:

        stem_conv / stem_bn               -> conv_stem / bn1
        stage{s}_block{b}/<sub>           -> blocks.{s-1}.{b-1}.<sub> (se/conv_reduce ->
                                             se.conv_reduce)
        final_conv / final_bn             -> conv_head / bn2
        head                              -> classifier (dense)

    Raises:
      ValueError: a variable the mapping does not know.
    """
    collection, top, *rest = key
    leaf = rest.pop()
    fixed = {"stem_conv": "conv_stem", "stem_bn": "bn1", "final_conv": "conv_head",
             "final_bn": "bn2", "head": "classifier"}
    if top in fixed and not rest:
        return layers.torch_leaf(collection, fixed[top], leaf, dense=top == "head")
    match = re.fullmatch(r"stage(\d+)_block(\d+)", top)
    if not match or not rest:
        raise ValueError(f"no timm EfficientNet name for {'/'.join(key)}")
    prefix = f"blocks.{int(match[1]) - 1}.{int(match[2]) - 1}." + ".".join(rest)
    return layers.torch_leaf(collection, prefix, leaf)


def recognise(tensors: Mapping[str, np.ndarray]) -> str | None:
    """What a timm EfficientNet state dict is ("an efficientnet_b3 (or tf_efficientnet_b3) ...:
    set --config.model.name=..."), or None when it is no EfficientNet."""
    stem = tensors.get("conv_stem.weight")
    if stem is None or "blocks.0.0.conv_dw.weight" not in tensors:
        return None
    depths = []
    while True:
        prefix = f"blocks.{len(depths)}."
        blocks = {k[len(prefix):].split(".")[0] for k in tensors if k.startswith(prefix)}
        if not blocks:
            break
        depths.append(len(blocks))
    head = tensors.get("conv_head.weight")
    channels = (int(stem.shape[0]), int(head.shape[0]) if head is not None else None)
    layout = f"stem {channels[0]}, head {channels[1]} channels, blocks {'-'.join(map(str, depths))}"
    for size, (w, d) in SCALING.items():
        if (tuple(depths) == stage_depths(d) and channels[0] == round_channels(STEM_CHANNELS, w)
                and channels[1] == round_channels(HEAD_CHANNELS, w)):
            return (f"an efficientnet_{size} or tf_efficientnet_{size} ({layout}; the tf_ port for "
                    f"weights trained in TensorFlow): set --config.model.name=efficientnet_{size} "
                    f"or tf_efficientnet_{size}")
    return f"an EfficientNet-like network ({layout}) that matches no isic_jax architecture"


FAMILY = register(Family(
    name="efficientnet",
    module=EfficientNet,
    architectures=ARCHITECTURES,
    options=lambda model_config: {"drop_path": float(getattr(model_config, "drop_path", 0.0))},
    weights=WeightLayout(torch_key=torch_key, recognise=recognise,
                         head=("classifier.weight", "classifier.bias")),
    config_keys=("drop_path",),
))
