"""Per-example image ops beyond flips/rotation/colour, batched for the jitted train step.

`device_augment.augment_batch` calls these with one PRNG key per example (its `example_keys`):
every draw of example i comes from `draws(keys, OP, n)[i]`, i.e. from fold_in(key_i, OP), so the
ops stay independent of each other and of the device/process split (see device_augment's
docstring), and adding an op never changes the draws of the others. Each op is built only when its
probability is > 0 (static config), and an example whose coin says "no" gets the op's identity
(zero shift, sigma 0, gamma 1, no hole), so the batch stays one array program.

Images are float32 [B, H, W, 3] on [0, 255] unless said otherwise. Sources and key names: see
`augment_table.AUGMENTATIONS` and docs/augmentation.md.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# fold_in constants of each op's stream (off the example key; any distinct uint32 values).
AFFINE, ELASTIC, GAMMA, BLUR, NOISE, CUTOUT = 101, 102, 103, 104, 105, 106


def draws(keys: jax.Array, op: int, n: int) -> jax.Array:
    """float32 [B, n] uniforms on [0, 1) from fold_in(key_i, op) of each example key."""
    return jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, op), (n,)))(keys)


def _coin(u: jax.Array, p: float) -> jax.Array:
    """float32 [B]: 1 where the op applies (u < p), else 0."""
    return (u < p).astype(jnp.float32)


# --------------------------------------------------------------------------- geometry


def affine(
    keys: jax.Array, p: float, scale: float, shear_deg: float, translate: float, size: tuple
) -> tuple[jax.Array, jax.Array]:
    """Random zoom / shear / shift as a source map: (matrices float32 [B, 2, 2], offsets
    float32 [B, 2] in pixels (dy, dx)).

    Per example: zoom z uniform in [1 - scale, 1 + scale] (z > 1 enlarges the content), x-shear
    angle uniform in [-shear, shear] degrees, shift uniform in [-translate, translate] x the side
    per axis. The source offset of output offset o is M o + t with M = (Shear Zoom)^-1; examples
    whose coin fails get M = I, t = 0. Compose with `device_augment.geometry_matrices` as
    `flips_rot @ M` (the affine acts after the flips and the rotation).
    """
    u = draws(keys, AFFINE, 5)
    on = _coin(u[:, 0], p)
    zoom = 1.0 + on * scale * (2.0 * u[:, 1] - 1.0)
    tan = on * jnp.tan(jnp.deg2rad(shear_deg * (2.0 * u[:, 2] - 1.0)))
    # Zoom^-1 = I / z; Shear = [[1, 0], [tan, 1]] on (dy, dx) (dx += tan * dy), inverse -tan.
    one, zero = jnp.ones_like(tan), jnp.zeros_like(tan)
    inv = jnp.stack([jnp.stack([one, zero], -1), jnp.stack([-tan, one], -1)], -2)
    mats = inv / zoom[:, None, None]
    height, width = size
    shift = translate * (2.0 * u[:, 3:5] - 1.0) * jnp.asarray([height, width], jnp.float32)
    return mats, on[:, None] * shift


def elastic(
    keys: jax.Array, p: float, magnitude: float, grid: int, size: tuple
) -> jax.Array:
    """Smooth random displacement fields, float32 [B, H, W, 2] in pixels (dy, dx).

    A grid x grid lattice of shifts uniform in [-magnitude, magnitude] x the side (per axis),
    upsampled bicubically to H x W: a grid/elastic distortion at the cost of one small resize
    (the per-pixel noise + Gaussian smoothing of Simard et al. 2003 would cost a large blur).
    Zero for examples whose coin fails.
    """
    height, width = size
    scale = jnp.asarray([height, width], jnp.float32) * magnitude

    def one(key: jax.Array) -> jax.Array:
        key = jax.random.fold_in(key, ELASTIC)
        u = jax.random.uniform(key, (1 + grid * grid * 2,))
        lattice = (2.0 * u[1:].reshape(grid, grid, 2) - 1.0) * scale
        field = jax.image.resize(lattice, (height, width, 2), "cubic")
        return field * _coin(u[0], p)

    return jax.vmap(one)(keys)


# --------------------------------------------------------------------------- photometric


def gamma(x: jax.Array, keys: jax.Array, p: float, strength: float) -> jax.Array:
    """255 (x / 255)^g per image, g uniform in [1 - strength, 1 + strength] (1 when the coin
    fails). x: float32 [B, H, W, 3] on [0, 255]; returns the same, on [0, 255]."""
    u = draws(keys, GAMMA, 2)
    g = 1.0 + _coin(u[:, 0], p) * strength * (2.0 * u[:, 1] - 1.0)
    unit = x * (1.0 / 255.0)
    safe = jnp.maximum(unit, 1e-12)
    y = jnp.exp(g[:, None, None, None] * jnp.log(safe))
    return jnp.where(unit > 0, 255.0 * y, 0.0)


def blur_radius(max_sigma: float) -> int:
    """Static kernel radius for sigmas up to `max_sigma`: ceil(3 sigma), at least 1."""
    return max(1, int(math.ceil(3.0 * max_sigma)))


def gaussian_blur(x: jax.Array, keys: jax.Array, p: float, max_sigma: float) -> jax.Array:
    """Separable Gaussian blur, sigma uniform in [0, max_sigma] px per image (0 when the coin
    fails: the identity). Borders by reflection. x: float32 [B, H, W, C]."""
    u = draws(keys, BLUR, 2)
    sigma = _coin(u[:, 0], p) * max_sigma * u[:, 1]  # [B]
    radius = blur_radius(max_sigma)
    taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)  # [K]
    safe = jnp.maximum(sigma, 1e-3)[:, None]
    weights = jnp.exp(-0.5 * (taps[None, :] / safe) ** 2)
    weights = jnp.where(sigma[:, None] > 1e-3, weights, (taps == 0).astype(jnp.float32)[None])
    weights = weights / jnp.sum(weights, axis=1, keepdims=True)  # [B, K]

    def along(y: jax.Array, axis: int) -> jax.Array:
        n = y.shape[axis]
        pad = [(0, 0)] * y.ndim
        pad[axis] = (radius, radius)
        padded = jnp.pad(y, pad, mode="reflect" if n > radius else "edge")
        out = jnp.zeros_like(y)
        # One multiply-add per tap (static loop): XLA fuses it into one elementwise pass.
        for i in range(2 * radius + 1):
            part = jax.lax.slice_in_dim(padded, i, i + n, axis=axis)
            out = out + weights[:, i, None, None, None] * part
        return out

    # Each pass materialised: fused into its consumers, XLA recomputed the taps (and whatever
    # produced x) per read; measured 20x slower next to the noise op on CPU.
    horizontal = jax.lax.optimization_barrier(along(x, 2))
    return jax.lax.optimization_barrier(along(horizontal, 1))


def standard_normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """float32 N(0, 1) samples by Box-Muller on the two 16-bit halves of one random word per
    pair: half the random bits of `jax.random.normal` (2.5x faster on CPU, where generating the
    bits dominates); |z| <= 4.85 (the 16-bit uniforms stop there), enough for image noise."""
    n = math.prod(shape)
    bits = jax.random.bits(key, ((n + 1) // 2,), jnp.uint32)
    u1 = ((bits >> 16).astype(jnp.float32) + 0.5) * (1.0 / 65536.0)
    u2 = ((bits & 0xFFFF).astype(jnp.float32) + 0.5) * (1.0 / 65536.0)
    radius = jnp.sqrt(-2.0 * jnp.log(u1))
    angle = (2.0 * math.pi) * u2
    z = jnp.concatenate([radius * jnp.cos(angle), radius * jnp.sin(angle)])
    return z[:n].reshape(shape)


def gaussian_noise(x: jax.Array, keys: jax.Array, p: float, max_std: float) -> jax.Array:
    """x + N(0, s^2) per pixel and channel, s uniform in [0, max_std] x 255 per image (0 when
    the coin fails), clipped to [0, 255]. x: float32 [B, H, W, C] on [0, 255]."""
    u = draws(keys, NOISE, 2)
    std = _coin(u[:, 0], p) * max_std * 255.0 * u[:, 1]
    shape = x.shape[1:]
    noise = jax.vmap(
        lambda k: standard_normal(jax.random.fold_in(jax.random.fold_in(k, NOISE), 1), shape)
    )(keys)
    noise, x = jax.lax.optimization_barrier((noise, x))  # see gaussian_blur
    return jnp.clip(x + std[:, None, None, None] * noise, 0.0, 255.0)


def cutout_mask(keys: jax.Array, p: float, size: float, holes: int, shape: tuple) -> jax.Array:
    """bool [B, H, W]: True inside the holes (DeVries & Taylor 2017).

    Each of `holes` squares of side size x the image side (per axis) has its centre uniform over
    the image and is clipped at the border; all False where the coin fails.
    """
    height, width = shape
    u = draws(keys, CUTOUT, 1 + 2 * holes)
    on = u[:, 0] < p
    rows = jnp.arange(height, dtype=jnp.float32) + 0.5
    cols = jnp.arange(width, dtype=jnp.float32) + 0.5
    half_h, half_w = 0.5 * size * height, 0.5 * size * width
    mask = jnp.zeros((keys.shape[0], height, width), bool)
    for h in range(holes):
        cy = u[:, 1 + 2 * h] * height
        cx = u[:, 2 + 2 * h] * width
        in_rows = jnp.abs(rows[None, :] - cy[:, None]) < half_h  # [B, H]
        in_cols = jnp.abs(cols[None, :] - cx[:, None]) < half_w  # [B, W]
        mask = mask | (in_rows[:, :, None] & in_cols[:, None, :])
    return mask & on[:, None, None]
