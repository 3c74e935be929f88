"""Convolutions and max-pooling lowered for XLA:CPU, where XLA's own kernels are slow.

XLA:CPU runs a forward convolution near its matmul rate, but the convolutions autodiff makes for
the backward pass (the weight gradient, and the input gradient of a strided convolution) run far
below it (README, "Measured"). Here, on CPU only:

- a 1x1 convolution is a strided slice and a dot: both gradients are then dots as well;
- a kxk convolution keeps XLA's forward convolution and gets its own backward pass
  (`jax.custom_vjp`): the weight gradient as one dot of the kxk shifted windows of the input
  ("patches", built from strided slices) with the output gradient, and the input gradient of a
  strided convolution as k*k dots scattered back by interior padding;
- max-pooling is a maximum over strided slices, with a backward pass that sends each window's
  gradient to its first maximal element, as XLA's `select_and_scatter` does (plain `jnp.maximum`
  would split it between ties, frequent after a ReLU).

Every function takes and returns what `lax.conv_general_dilated` / `flax.linen.max_pool` do and
chooses its lowering with `lax.platform_dependent`: on GPU and TPU (and in an export lowered for
them) the program holds XLA's native convolution and pooling, untouched. The gradients equal the
plain path's to float rounding (tests/test_cpu_lowering.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def _is_nhwc(dimension_numbers: Any) -> bool:
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return tuple(dimension_numbers) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    return tuple(dimension_numbers) == _NHWC


def _window(x: jax.Array, i: int, j: int, stride: int, out_h: int, out_w: int) -> jax.Array:
    """x[:, i::stride, j::stride, :] cut to [B, out_h, out_w, C]."""
    b, _, _, c = x.shape
    end = (b, i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1, c)
    return lax.slice(x, (0, i, j, 0), end, (1, stride, stride, 1))


def _scatter_window(v: jax.Array, i: int, j: int, stride: int, height: int, width: int
                    ) -> jax.Array:
    """The transpose of `_window`: v [B, h, w, C] placed at x[:, i::stride, j::stride, :] of
    zeros [B, height, width, C]."""
    _, h, w, _ = v.shape
    zero = jnp.zeros((), v.dtype)
    return lax.pad(v, zero, ((0, 0, 0), (i, height - i - stride * (h - 1) - 1, stride - 1),
                             (j, width - j - stride * (w - 1) - 1, stride - 1), (0, 0, 0)))


def _pad_hw(x: jax.Array, pads: Sequence[tuple[int, int]], value: float = 0.0) -> jax.Array:
    (top, bottom), (left, right) = pads
    return lax.pad(x, jnp.asarray(value, x.dtype),
                   ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))


def _dot_channels(x: jax.Array, w: jax.Array, precision: Any,
                  preferred_element_type: Any) -> jax.Array:
    """[B, H, W, C] x [C, D] -> [B, H, W, D]."""
    return lax.dot_general(x, w, (((3,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=preferred_element_type)


# ----------------------------------------------------------------------------- kxk convolution


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_kxk(x: jax.Array, w: jax.Array, stride: int, pads: tuple, precision: Any,
              preferred_element_type: Any) -> jax.Array:
    return lax.conv_general_dilated(x, w, (stride, stride), pads, dimension_numbers=_NHWC,
                                    precision=precision,
                                    preferred_element_type=preferred_element_type)


def _conv_kxk_fwd(x, w, stride, pads, precision, preferred_element_type):
    return _conv_kxk(x, w, stride, pads, precision, preferred_element_type), (x, w)


def _conv_kxk_bwd(stride, pads, precision, preferred_element_type, residuals, g):
    x, w = residuals
    kh, kw, cin, cout = w.shape
    _, out_h, out_w, _ = g.shape
    xp = _pad_hw(x, pads)
    g_in = g.astype(x.dtype)
    # Weight gradient: [B*Ho*Wo, kh*kw*Cin]^T . [B*Ho*Wo, Cout], one dot near the matmul rate.
    patches = jnp.concatenate(
        [_window(xp, i, j, stride, out_h, out_w) for i in range(kh) for j in range(kw)], axis=-1)
    dw = lax.dot_general(patches, g_in, (((0, 1, 2), (0, 1, 2)), ((), ())),
                         precision=precision, preferred_element_type=jnp.float32)
    dw = dw.reshape(kh, kw, cin, cout).astype(w.dtype)
    if stride == 1:
        # Input gradient of a stride-1 convolution: a stride-1 convolution of g with the flipped
        # kernel, which XLA:CPU runs as fast as the forward one.
        (top, bottom), (left, right) = pads
        dx = lax.conv_general_dilated(
            g_in, jnp.flip(w, (0, 1)).swapaxes(2, 3), (1, 1),
            ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right)),
            dimension_numbers=_NHWC, precision=precision)
    else:
        height, width = xp.shape[1], xp.shape[2]
        dxp = None
        for i in range(kh):
            for j in range(kw):
                part = _scatter_window(_dot_channels(g_in, w[i, j].T, precision, None), i, j,
                                       stride, height, width)
                dxp = part if dxp is None else dxp + part
        (top, _), (left, _) = pads
        dxp = lax.slice(dxp, (0, top, left, 0),
                        (x.shape[0], top + x.shape[1], left + x.shape[2], cin))
        dx = dxp
    return dx.astype(x.dtype), dw


_conv_kxk.defvjp(_conv_kxk_fwd, _conv_kxk_bwd)


def _conv_cpu(x, w, stride, pads, precision, preferred_element_type):
    kh, kw = w.shape[:2]
    if (kh, kw) == (1, 1) and all(p == (0, 0) for p in pads):
        out_h = (x.shape[1] - 1) // stride + 1
        out_w = (x.shape[2] - 1) // stride + 1
        return _dot_channels(_window(x, 0, 0, stride, out_h, out_w), w[0, 0], precision,
                             preferred_element_type)
    return _conv_kxk(x, w, stride, pads, precision, preferred_element_type)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """`lax.conv_general_dilated` with the CPU lowering above (the `conv_general_dilated` of a
    `flax.linen.Conv`).

    Taken: NHWC/HWIO, equal strides, explicit padding, no dilation, no groups, which covers
    every convolution of the ResNets here; anything else is XLA's convolution everywhere.
    lhs: [B, H, W, Cin], rhs: [kh, kw, Cin, Cout] -> [B, Ho, Wo, Cout], dtype as lax's.
    """
    plain = functools.partial(
        lax.conv_general_dilated, window_strides=window_strides, padding=padding,
        lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
    strides = tuple(window_strides)
    taken = (
        _is_nhwc(dimension_numbers)
        and not isinstance(padding, str)
        and len(strides) == 2 and strides[0] == strides[1]
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and feature_group_count == 1 and batch_group_count == 1
        and lhs.ndim == 4 and rhs.shape[0] == rhs.shape[1]
    )
    if not taken:
        return plain(lhs, rhs)
    pads = tuple((int(a), int(b)) for a, b in padding)
    stride = int(strides[0])

    def cpu(x: jax.Array, w: jax.Array) -> jax.Array:
        return _conv_cpu(x, w, stride, pads, precision, preferred_element_type)

    return lax.platform_dependent(lhs, rhs, cpu=cpu, default=plain)


# ----------------------------------------------------------------------------- max-pooling


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_slices(x: jax.Array, window: int, stride: int, pads: tuple) -> jax.Array:
    out, _ = _max_pool_fwd(x, window, stride, pads)
    return out


def _pool_geometry(x, window, stride, pads):
    xp = _pad_hw(x, pads, -jnp.inf)
    out_h = (xp.shape[1] - window) // stride + 1
    out_w = (xp.shape[2] - window) // stride + 1
    return xp, out_h, out_w


def _max_pool_fwd(x, window, stride, pads):
    xp, out_h, out_w = _pool_geometry(x, window, stride, pads)
    out = None
    for i in range(window):
        for j in range(window):
            v = _window(xp, i, j, stride, out_h, out_w)
            out = v if out is None else jnp.maximum(out, v)
    return out, (x, out)


def _max_pool_bwd(window, stride, pads, residuals, g):
    x, out = residuals
    xp, out_h, out_w = _pool_geometry(x, window, stride, pads)
    taken = jnp.zeros(out.shape, bool)
    dxp = None
    # Window elements in row-major order; the first maximal one takes the gradient
    # (select_and_scatter with `ge`, the transpose of XLA's reduce_window max).
    for i in range(window):
        for j in range(window):
            hit = (_window(xp, i, j, stride, out_h, out_w) == out) & ~taken
            taken = taken | hit
            part = _scatter_window(jnp.where(hit, g, jnp.zeros((), g.dtype)), i, j, stride,
                                   xp.shape[1], xp.shape[2])
            dxp = part if dxp is None else dxp + part
    (top, _), (left, _) = pads
    dx = lax.slice(dxp, (0, top, left, 0),
                   (x.shape[0], top + x.shape[1], left + x.shape[2], x.shape[3]))
    return (dx,)


_max_pool_slices.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x: jax.Array, window: int, stride: int, pads: Sequence[tuple[int, int]]
             ) -> jax.Array:
    """`flax.linen.max_pool(x, (window, window), (stride, stride), pads)` for NHWC x
    [B, H, W, C], with the CPU lowering above."""
    pads = tuple((int(a), int(b)) for a, b in pads)
    return lax.platform_dependent(
        x, cpu=lambda v: _max_pool_slices(v, window, stride, pads),
        default=lambda v: _flax_max_pool(v, window, stride, pads))


def _flax_max_pool(x, window, stride, pads):
    import flax.linen as nn

    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)
