"""Building blocks the model families share (timm's layout and numerics).

- `conv` / `batch_norm` / `layer_norm` / `dense`: Flax layers in the model's compute dtype with
  float32 parameters; convolutions go through `cpu_lowering` with lowering "auto" (which takes
  the dense ones; grouped/depthwise ones stay XLA's), BatchNorm averages over the pmap axis and
  keeps its running statistics in frozen parts.
- `symmetric_padding` (PyTorch's `padding=k // 2`, timm's default) and `tf_same_padding`
  (TensorFlow's "SAME": the extra row/column at the bottom/right for stride 2 on even sizes, as
  timm's `Conv2dSame` for the `tf_*` ports).
- `drop_path`: stochastic depth (per example, scaled by 1 / keep; training only).
- `SqueezeExcite`, `Mlp`: timm's `SqueezeExcite` (EfficientNet) and `Mlp` (ConvNeXt, ViT), with
  their submodule names, so that state-dict keys map one to one.
- `Tap`: a parameterless identity module: a named point whose output Grad-CAM can read.
- `torch_leaf`: the timm/torchvision name of a Flax variable leaf (kernel -> weight, BatchNorm
  mean -> running_mean, ...).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from isic_jax.models import cpu_lowering

Padding = list[tuple[int, int]]

# timm's trunc_normal_(std=.02) for transformer-style layers (ConvNeXt, ViT).
trunc_normal = nn.initializers.truncated_normal(0.02)


def gelu(x: jax.Array) -> jax.Array:
    """GELU with the exact erf, as PyTorch's nn.GELU() (timm's "gelu")."""
    return nn.gelu(x, approximate=False)


def symmetric_padding(kernel: int, stride: int = 1) -> Padding:
    """timm's default padding `((stride - 1) + (kernel - 1)) // 2` on each side (k // 2 for odd
    kernels): [(p, p), (p, p)]."""
    p = ((stride - 1) + (kernel - 1)) // 2
    return [(p, p), (p, p)]


def tf_same_padding(size: Sequence[int], kernel: int, stride: int) -> Padding:
    """TensorFlow's "SAME" padding of an input of `size` (H, W): total max((ceil(n / s) - 1) * s
    + k - n, 0) per axis, the odd pixel at the end (timm's `pad_same` / `Conv2dSame`)."""
    pads = []
    for n in size:
        total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def drop_path(module: nn.Module, x: jax.Array, rate: float, train: bool) -> jax.Array:
    """Stochastic depth (Huang et al. 2016; timm's `DropPath`): in training, each example's
    residual branch x [B, ...] is zeroed with probability `rate` and the others scaled by
    1 / (1 - rate); identity in evaluation or with rate 0. Draws from `module`'s "dropout" RNG
    stream."""
    if not train or rate <= 0.0:
        return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


def drop_path_rates(rate: float, depth: int, *, inclusive: bool = True) -> tuple[float, ...]:
    """Per-block stochastic depth rates growing linearly over `depth` blocks: timm's
    `linspace(0, rate, depth)` (ConvNeXt, ViT; inclusive) or `rate * i / depth` (EfficientNet's
    builder; not inclusive, the last block gets rate * (depth - 1) / depth)."""
    if depth <= 1 or rate <= 0.0:
        return (0.0,) * depth
    denominator = depth - 1 if inclusive else depth
    return tuple(rate * i / denominator for i in range(depth))


def conv(model: Any, **kwargs: Any) -> Callable[..., nn.Conv]:
    """`nn.Conv` in `model.dtype` with float32 parameters, through `cpu_lowering` when
    `model.lowering` is "auto" (dense convolutions only; grouped ones fall through to XLA's).
    kwargs: further `nn.Conv` arguments (use_bias, kernel_init, ...)."""
    return functools.partial(
        nn.Conv,
        dtype=model.dtype,
        param_dtype=jnp.float32,
        conv_general_dilated=cpu_lowering.conv_general_dilated
        if model.lowering == "auto" else None,
        **kwargs,
    )


def dense(model: Any, **kwargs: Any) -> Callable[..., nn.Dense]:
    """`nn.Dense` in `model.dtype` with float32 parameters."""
    return functools.partial(nn.Dense, dtype=model.dtype, param_dtype=jnp.float32, **kwargs)


def layer_norm(dtype: Any, epsilon: float = 1e-6) -> Callable[..., nn.LayerNorm]:
    """LayerNorm over the last (channel) axis, timm's default epsilon 1e-6, statistics in
    float32 by the two-pass variance (as PyTorch computes it)."""
    return functools.partial(nn.LayerNorm, epsilon=epsilon, dtype=dtype,
                             param_dtype=jnp.float32, use_fast_variance=False)


def batch_norm(model: Any, part: str, train: bool, epsilon: float,
               momentum: float = 0.9) -> Callable[..., nn.BatchNorm]:
    """BatchNorm of a module in `part`: batch statistics averaged over `model.axis_name` in
    training, running statistics in evaluation and in the parts of `model.frozen_bn`. momentum
    in Flax's convention (0.9 = PyTorch's 0.1)."""
    return functools.partial(
        nn.BatchNorm,
        use_running_average=not train or part in model.frozen_bn,
        momentum=momentum,
        epsilon=epsilon,
        dtype=model.dtype,
        param_dtype=jnp.float32,
        axis_name=model.axis_name,
    )


class Tap(nn.Module):
    """Returns its input unchanged: a named point of the network (no parameters) whose output
    Grad-CAM reads (`Classifier.cam_layer`)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class SqueezeExcite(nn.Module):
    """timm's EfficientNet `SqueezeExcite`: x * sigmoid(conv_expand(act(conv_reduce(mean(x))))).

    x: [B, H, W, C] -> [B, H, W, C]. conv_reduce/conv_expand are 1x1 convolutions with bias
    (C -> reduced -> C), as in the state dicts.
    """

    reduced: int
    conv: Callable[..., nn.Conv]
    act: Callable[[jax.Array], jax.Array] = nn.silu

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        s = self.conv(self.reduced, (1, 1), padding=0, use_bias=True, name="conv_reduce")(s)
        s = self.conv(x.shape[-1], (1, 1), padding=0, use_bias=True, name="conv_expand")(
            self.act(s))
        return x * nn.sigmoid(s)


class Mlp(nn.Module):
    """timm's `Mlp`: fc2(gelu(fc1(x))) over the last axis. x: [..., D] -> [..., D]."""

    hidden: int
    dense: Callable[..., nn.Dense]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = gelu(self.dense(self.hidden, name="fc1")(x))
        return self.dense(x.shape[-1], name="fc2")(y)


def torch_leaf(collection: str, prefix: str, leaf: str, dense: bool = False) -> tuple[str, str]:
    """The timm/torchvision tensor of a Flax variable leaf under the torch module `prefix`, and
    its layout change (`WeightLayout.torch_key`):

        batch_stats mean / var -> prefix.running_mean / running_var    "same"
        kernel                 -> prefix.weight      "dense" ([out, in]) or "conv" (OIHW)
        scale                  -> prefix.weight      "same" (BatchNorm / LayerNorm)
        anything else          -> prefix.<leaf>      "same" (bias, gamma, cls_token, ...)
    """
    if collection == "batch_stats":
        return f"{prefix}.running_{leaf}", "same"
    if leaf == "kernel":
        return f"{prefix}.weight", "dense" if dense else "conv"
    if leaf == "scale":
        return f"{prefix}.weight", "same"
    return f"{prefix}.{leaf}" if prefix else leaf, "same"
