"""Convolutions and max-pooling lowered for XLA:CPU, where XLA's own backward pass is slow.

XLA:CPU runs forward convolutions near its matmul rate; what autodiff makes of them for the
backward pass runs well below it (docs/architecture.md, "Design choices"). Here, on CPU only:

- every convolution gets its own backward pass (`jax.custom_vjp`) whose inputs sit behind an
  optimisation barrier: otherwise XLA fuses the BatchNorm and ReLU that produced them into the
  transposes of its gradient convolutions and recomputes them there, slowly;
- a 1x1 convolution is a (strided) slice and a dot; its weight gradient is a batch of 8 dots over
  row chunks of [B*H*W, C], summed (one dot over hundreds of thousands of rows runs at ~1/3 of
  the matmul rate, the batch near it);
- the input gradient of a strided kxk convolution, which XLA computes as a convolution over a
  zero-dilated gradient, is stride**2 stride-1 convolutions with sub-kernels ("phases"),
  interleaved (2-3x faster);
- the input gradient of a stride-1 convolution over a map smaller than its kernel (late stages)
  flips g and the result instead of the kernel: XLA's flip-and-swap of a 3x3x512x512 kernel is
  one slow fused transpose;
- a depthwise convolution (`feature_group_count` = channels, EfficientNet's and ConvNeXt's) is
  a sum of kh*kw shifted strided slices times per-channel weights, one elementwise fusion; its
  input gradient the same sum over the (flipped, or zero-interleaved for strides) gradient, its
  weight gradient kh*kw channel sums in one variadic reduction. XLA:CPU's own grouped convolution
  is 25-40x slower forward and 5-20x slower backward on these shapes (jax#23713;
  `scripts/bench_train.py --only f`);
- max-pooling is a maximum over strided slices, with a backward pass that sends each window's
  gradient to its first maximal element, as XLA's `select_and_scatter` does (plain
  `jnp.maximum` would split it between ties, frequent after a ReLU).

Both public functions take what `lax.conv_general_dilated` / `flax.linen.max_pool` take and pick
their lowering with `lax.platform_dependent`: on GPU and TPU (and in an export lowered for them)
the program holds XLA's native convolutions and pooling, untouched. Values and gradients equal
the native ones to float rounding (tests/test_cpu_lowering.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
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


def _materialised(x: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x, g in x's dtype) behind an optimisation barrier, for a backward pass.

    Without it XLA fuses the BatchNorm/ReLU that produced x (and g) into the transposes and
    slices of the gradient convolutions, recomputing them there at a fraction of the speed of a
    plain copy (ResNet-18: 136 -> 65 ms of transposes per step).
    """
    return lax.optimization_barrier((x, g.astype(x.dtype)))


# ----------------------------------------------------------------------------- 1x1 convolution

# Row chunks of the 1x1 weight gradient: one [N, C]^T [N, D] dot with N = B*H*W in the hundreds of
# thousands runs at ~1/3 of the matmul rate on XLA:CPU, a batch of 8 such dots over N/8 rows each
# (then summed) near it (`python scripts/bench_conv_grads.py`). Small maps (late stages, N in the
# hundreds) gain nothing from it: chunks keep at least _MIN_CHUNK_ROWS rows.
_WGRAD_CHUNKS = 8
_MIN_CHUNK_ROWS = 2048


def _chunks(rows: int) -> int:
    return next(n for n in (_WGRAD_CHUNKS, 4, 2, 1)
                if n == 1 or (rows % n == 0 and rows // n >= _MIN_CHUNK_ROWS))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_1x1(x: jax.Array, w: jax.Array, stride: int, precision: Any) -> jax.Array:
    out_h, out_w = (x.shape[1] - 1) // stride + 1, (x.shape[2] - 1) // stride + 1
    return _dot_channels(_window(x, 0, 0, stride, out_h, out_w), w[0, 0], precision, None)


def _conv_1x1_fwd(x, w, stride, precision):
    return _conv_1x1(x, w, stride, precision), (x, w)


def _conv_1x1_bwd(stride, precision, residuals, g):
    x, w = residuals
    x, g = _materialised(x, g)
    _, out_h, out_w, cout = g.shape
    cin = x.shape[3]
    xs = _window(x, 0, 0, stride, out_h, out_w)
    rows = xs.shape[0] * out_h * out_w
    n = _chunks(rows)
    dw = lax.dot_general(xs.reshape(n, rows // n, cin), g.reshape(n, rows // n, cout),
                         (((1,), (1,)), ((0,), (0,))), precision=precision,
                         preferred_element_type=jnp.float32)
    # The chunks summed by adds (one elementwise fusion): a reduce over the leading axis of
    # [n, C, D] ran as a slow YNN reduction (50 ms for 8 x 1152 x 192 in EfficientNet-B0).
    dw = functools.reduce(lax.add, [dw[i] for i in range(n)]).astype(w.dtype)[None, None]
    dx = _dot_channels(g, w[0, 0].T, precision, None)
    if stride > 1:
        dx = _scatter_window(dx, 0, 0, stride, x.shape[1], x.shape[2])
    return dx.astype(x.dtype), dw


_conv_1x1.defvjp(_conv_1x1_fwd, _conv_1x1_bwd)


# ----------------------------------------------------------------------------- kxk convolution

# Below this many input channels the input gradient is left to XLA: the stem (3 channels) needs
# none in training, and there the phase convolutions would be slower.
_MIN_PHASE_CHANNELS = 16


def _conv_native(x, w, stride, pads, precision):
    return lax.conv_general_dilated(x, w, (stride, stride), pads, dimension_numbers=_NHWC,
                                    precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_kxk(x: jax.Array, w: jax.Array, stride: int, pads: tuple, precision: Any
              ) -> jax.Array:
    return _conv_native(x, w, stride, pads, precision)


def _conv_kxk_fwd(x, w, stride, pads, precision):
    return _conv_native(x, w, stride, pads, precision), (x, w)


def _conv_kxk_bwd(stride, pads, precision, residuals, g):
    x, w = residuals
    x, g = _materialised(x, g)
    kh, kw, cin, _ = w.shape
    batch, out_h, out_w, _ = g.shape
    if stride > 1 and cin >= _MIN_PHASE_CHANNELS:
        # XLA computes this input gradient as a convolution over a zero-dilated g.
        dx = _input_grad_by_phases(g, w, x.shape, stride, pads, precision)
    elif stride == 1 and batch * out_h * out_w < kh * kw * cin:
        # Late stages (small maps, big kernels): XLA's input gradient flips the kernel and swaps
        # its channel axes in one slow fused transpose (6 ms for 3x3x512x512); flipping the
        # smaller g and the result instead leaves only the plain swap (~1 ms).
        dx = _input_grad_flipping_g(g, w, pads, precision)
    else:
        # XLA's own gradient convolutions, only fed materialised operands.
        _, vjp = jax.vjp(lambda x_, w_: _conv_native(x_, w_, stride, pads, precision), x, w)
        return vjp(g)
    # The weight gradient stays XLA's (it runs near the matmul rate).
    _, w_vjp = jax.vjp(lambda w_: _conv_native(x, w_, stride, pads, precision), w)
    (dw,) = w_vjp(g)
    return dx, dw


_conv_kxk.defvjp(_conv_kxk_fwd, _conv_kxk_bwd)


def _input_grad_by_phases(g: jax.Array, w: jax.Array, x_shape: tuple, stride: int, pads: tuple,
                          precision: Any) -> jax.Array:
    """The input gradient of a strided convolution as stride**2 stride-1 convolutions.

    Padded input row u = stride*q + r only meets kernel rows r, r + stride, ...: per phase
    (r1, r2) the gradient is a stride-1 ("full") convolution of g with the sub-kernel
    w[r1::stride, r2::stride] flipped, and the phases interleave back into [B, H, W, Cin].
    """
    batch, height, width, cin = x_shape
    (top, bottom), (left, right) = pads
    _, out_h, out_w, _ = g.shape
    q1 = -(-(height + top + bottom) // stride)
    q2 = -(-(width + left + right) // stride)
    rows = []
    for r1 in range(stride):
        row = []
        for r2 in range(stride):
            sub = w[r1::stride, r2::stride]
            m1, m2 = sub.shape[:2]
            if m1 == 0 or m2 == 0:
                row.append(jnp.zeros((batch, q1, q2, cin), g.dtype))
            elif (m1, m2) == (1, 1):
                part = _dot_channels(g, sub[0, 0].T, precision, None)
                part = lax.pad(part, jnp.zeros((), g.dtype),
                               ((0, 0, 0), (0, q1 - out_h, 0), (0, q2 - out_w, 0), (0, 0, 0)))
                row.append(part)
            else:
                row.append(lax.conv_general_dilated(
                    g, jnp.flip(sub, (0, 1)).swapaxes(2, 3), (1, 1),
                    ((m1 - 1, q1 - out_h), (m2 - 1, q2 - out_w)), dimension_numbers=_NHWC,
                    precision=precision))
        rows.append(jnp.stack(row, axis=3))  # [B, q1, q2, stride, Cin]
    interleaved = jnp.stack(rows, axis=2).reshape(batch, q1 * stride, q2 * stride, cin)
    return lax.slice(interleaved, (0, top, left, 0), (batch, top + height, left + width, cin))


def _input_grad_flipping_g(g: jax.Array, w: jax.Array, pads: tuple, precision: Any
                           ) -> jax.Array:
    """The input gradient of a stride-1 convolution, flip(conv(flip(g), w with in/out swapped)).

    Padded input row u takes sum_t g[u - t] w[t] = sum_t flip(g)[Ho - 1 - u + t] w[t]: a
    correlation of flip(g) with w itself, read backwards. The padding below yields exactly the
    rows top .. top + H - 1 of the padded input.
    """
    kh, kw = w.shape[:2]
    (top, bottom), (left, right) = pads
    out = lax.conv_general_dilated(
        jnp.flip(g, (1, 2)), w.swapaxes(2, 3), (1, 1),
        ((kh - 1 - bottom, kh - 1 - top), (kw - 1 - right, kw - 1 - left)),
        dimension_numbers=_NHWC, precision=precision)
    return jnp.flip(out, (1, 2))


# ----------------------------------------------------------------------------- depthwise


def _depthwise_sum(xp: jax.Array, w: jax.Array, stride: int, out_h: int, out_w: int
                   ) -> jax.Array:
    """sum_{i,j} xp[:, i::stride, j::stride, :] * w[i, j, 0, :] over the kernel, cut to
    [B, out_h, out_w, C]; accumulated in float32 for narrower inputs."""
    acc = jnp.promote_types(xp.dtype, jnp.float32)
    out = None
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            term = (_window(xp, i, j, stride, out_h, out_w) * w[i, j, 0]).astype(acc)
            out = term if out is None else out + term
    return out.astype(xp.dtype)


def _depthwise_geometry(x: jax.Array, w: jax.Array, stride: int, pads: tuple
                        ) -> tuple[jax.Array, int, int]:
    xp = _pad_hw(x, pads)
    return xp, (xp.shape[1] - w.shape[0]) // stride + 1, (xp.shape[2] - w.shape[1]) // stride + 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x: jax.Array, w: jax.Array, stride: int, pads: tuple) -> jax.Array:
    xp, out_h, out_w = _depthwise_geometry(x, w, stride, pads)
    return _depthwise_sum(xp, w, stride, out_h, out_w)


def _depthwise_fwd(x, w, stride, pads):
    return _depthwise(x, w, stride, pads), (x, w)


def _depthwise_bwd(stride, pads, residuals, g):
    x, w = residuals
    x, g = _materialised(x, g)
    xp, out_h, out_w = _depthwise_geometry(x, w, stride, pads)
    kh, kw = w.shape[:2]
    (top, _), (left, _) = pads
    # Weight gradient: per kernel tap, the channel sums of (input window x g), in float32, as
    # one variadic reduction over each example's rows and columns (then over the batch): XLA
    # fuses the products into it and parallelises over [B, C]. kh*kw separate sums over
    # (B, H, W) each materialised their product and ran 3-14x slower
    # (scripts/bench_train.py --only f).
    products = tuple(_window(xp, i, j, stride, out_h, out_w).astype(jnp.float32)
                     * g.astype(jnp.float32) for i in range(kh) for j in range(kw))
    sums = lax.reduce(products, (jnp.float32(0),) * len(products),
                      lambda a, b: tuple(u + v for u, v in zip(a, b, strict=True)), (1, 2))
    dw = jnp.stack([v.sum(axis=0) for v in sums]).reshape(kh, kw, 1, -1).astype(w.dtype)
    # Input gradient: the stride-1 depthwise correlation of g (zero-interleaved for strides,
    # padded by kernel - 1 - pad) with the flipped kernel, over the padded input's rows, then
    # the padding cut off.
    gd = lax.pad(g, jnp.zeros((), g.dtype),
                 ((0, 0, 0), (kh - 1, xp.shape[1] - (stride * (out_h - 1) + 1), stride - 1),
                  (kw - 1, xp.shape[2] - (stride * (out_w - 1) + 1), stride - 1), (0, 0, 0)))
    dxp = _depthwise_sum(gd, jnp.flip(w, (0, 1)), 1, xp.shape[1], xp.shape[2])
    dx = lax.slice(dxp, (0, top, left, 0),
                   (x.shape[0], top + x.shape[1], left + x.shape[2], x.shape[3]))
    return dx, dw


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def _conv_cpu(x, w, stride, pads, precision, preferred_element_type):
    kh, kw = w.shape[:2]
    if preferred_element_type is not None or x.dtype != w.dtype:
        return lax.conv_general_dilated(x, w, (stride, stride), pads, dimension_numbers=_NHWC,
                                        precision=precision,
                                        preferred_element_type=preferred_element_type)
    if (kh, kw) == (1, 1) and all(p == (0, 0) for p in pads):
        return _conv_1x1(x, w, stride, precision)
    return _conv_kxk(x, w, stride, pads, precision)


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

    Taken: NHWC/HWIO, equal strides, explicit padding, no dilation, and either no groups (every
    convolution of the ResNets, the dense ones of the other families) or depthwise (groups =
    input channels = output channels, rhs [kh, kw, 1, C]); anything else is XLA's convolution
    everywhere. lhs: [B, H, W, Cin], rhs: [kh, kw, Cin / groups, Cout] -> [B, Ho, Wo, Cout],
    dtype as lax's.
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
        and batch_group_count == 1
        and lhs.ndim == 4 and rhs.shape[0] == rhs.shape[1]
    )
    depthwise = (feature_group_count > 1 and rhs.shape[2] == 1
                 and feature_group_count == lhs.shape[3] == rhs.shape[3]
                 and preferred_element_type is None and lhs.dtype == rhs.dtype)
    if not taken or (feature_group_count != 1 and not depthwise):
        return plain(lhs, rhs)
    pads = tuple((int(a), int(b)) for a, b in padding)
    stride = int(strides[0])

    def cpu(x: jax.Array, w: jax.Array) -> jax.Array:
        if depthwise:
            return _depthwise(x, w, stride, pads)
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
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)
