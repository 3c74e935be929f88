"""BYOL's two random views of each image, made on the device inside the jitted step (pure jax).

    v1, v2 = two_views(batch["image"], rng, ViewConfig.from_config(config.pretrain.views, mean,
                       std), example_ids=batch["position"])     # float32 [B, S, S, 3] each

The host pipeline ships one uint8 image per example (config.data.augment's random resized crop;
the pretraining presets keep the whole image, crop_scale (1, 1)). Each view is then, per example
and in BYOL's order (Grill et al. 2020, appendix B; deepmind-research/byol augmentations.py):

1. random resized crop (area fraction ~ U(crop_scale), log-uniform aspect ratio in crop_ratio,
   placed uniformly) and a flip, in one bilinear gather back to S x S;
2. colour jitter with probability `jitter_prob`: brightness, contrast, saturation factors
   uniform in [1 - v, 1 + v], hue shift uniform in [-hue, hue] turns; then greyscale with
   probability `grayscale_prob`; all one affine colour map (`device_augment.color_matrices`);
3. Gaussian blur with probability `blur_prob[view]`, sigma ~ U(blur_sigma) px at a 224 px view
   (scaled by S / 224), kernel side S / 10 (BYOL's `blur_divider`);
4. solarisation with probability `solarize_prob[view]`: values >= 128 (of 255) become 255 - x;
5. normalisation with the run's mean/std.

Differences from the paper's TF code, on purpose: the colour operations run in a fixed order
(BYOL shuffles them; greyscale is exact either way: saturation and hue keep the luma), the
brightness factor multiplies (torchvision's) instead of adding, and `flips="dihedral"` draws one
of the 8 flips/rotations of the square (a dermoscopy image has no up; BYOL flips left-right).

Randomness: example i's view v uses fold_in(fold_in(rng, v), example_ids[i]) (the example's
position in the global stream), so views do not depend on the device or process count, and a
resumed run makes the same views. Pure and static-configured: jit / pmap / vmap friendly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import ndimage

from isic_jax.data import device_augment
from isic_jax.data.image_ops import IMAGENET_MEAN, IMAGENET_STD

FLIPS = ("dihedral", "horizontal", "none")
BLUR_REFERENCE_SIZE = 224  # px: the view size BYOL's blur sigmas are given for
BLUR_DIVIDER = 10.0  # kernel side = view side / this (BYOL's blur_divider)
VIEW_STREAM = 0x00766965  # fold_in constant of the views' key stream ("vie")
_NUM_DRAWS = 14


@dataclasses.dataclass(frozen=True)
class ViewConfig:
    """`config.pretrain.views` with the run's normalisation (frozen, hashable: static).

    Probabilities given as pairs are per view (view 1, view 2): BYOL's asymmetric blur (1.0 /
    0.1) and solarisation (0.0 / 0.2). See the module docstring for each operation.
    """

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flips: str = "dihedral"
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: tuple[float, float] = (1.0, 0.1)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: tuple[float, float] = (0.0, 0.2)
    mean: tuple[float, float, float] = tuple(float(v) for v in IMAGENET_MEAN)
    std: tuple[float, float, float] = tuple(float(v) for v in IMAGENET_STD)

    def __post_init__(self) -> None:
        if self.flips not in FLIPS:
            raise ValueError(f"flips must be one of {', '.join(FLIPS)}, got {self.flips!r}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")

    @classmethod
    def from_config(cls, views: Mapping[str, Any], mean: Any = IMAGENET_MEAN,
                    std: Any = IMAGENET_STD) -> ViewConfig:
        """From `config.pretrain.views` (ConfigDict or dict; missing keys keep the defaults)
        and the run's resolved normalisation (`image_ops.normalization(config.data)`)."""
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name in ("mean", "std") or field.name not in views:
                continue
            value = views[field.name]
            if isinstance(value, (tuple, list)):
                value = tuple(float(v) for v in value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                value = float(value)
            kwargs[field.name] = value
        return cls(**kwargs, mean=tuple(float(v) for v in np.asarray(mean).reshape(3)),
                   std=tuple(float(v) for v in np.asarray(std).reshape(3)))


# --------------------------------------------------------------------------- geometry


def _flip_matrices(u: jax.Array, flips: str) -> jax.Array:
    """float32 [B, 2, 2] maps of output offsets (dy, dx) to source offsets: one of the 8 flips /
    quarter turns of the square (dihedral), a left-right flip with probability 1/2
    (horizontal), or the identity; u float32 [B] uniforms."""
    batch = u.shape[0]
    if flips == "none":
        return jnp.broadcast_to(jnp.eye(2, dtype=jnp.float32), (batch, 2, 2))
    if flips == "horizontal":
        sign = jnp.where(u < 0.5, 1.0, -1.0).astype(jnp.float32)
        zero, one = jnp.zeros_like(sign), jnp.ones_like(sign)
        return jnp.stack([jnp.stack([one, zero], -1), jnp.stack([zero, sign], -1)], -2)
    turn = np.array([[0.0, 1.0], [-1.0, 0.0]])
    transpose = np.array([[0.0, 1.0], [1.0, 0.0]])
    table = np.stack([(transpose if k >= 4 else np.eye(2)) @ np.linalg.matrix_power(turn, k % 4)
                      for k in range(8)]).astype(np.float32)
    k = jnp.minimum(jnp.floor(u * 8.0), 7.0).astype(jnp.int32)
    return jnp.asarray(table)[k]


def crop_boxes(u: jax.Array, size: int, scale: tuple[float, float],
               ratio: tuple[float, float]) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Random resized crop boxes in a square image of side `size`: (centre y, centre x, height,
    width), float32 [B] each, in pixels (edge coordinates: the image spans [0, size]).

    u: float32 [B, 4] uniforms (area, log-ratio, x, y). The area fraction is uniform in `scale`
    and the aspect ratio (width / height) log-uniform in `ratio`; a side longer than the image
    is cut to it (torchvision retries instead; this keeps one draw per example)."""
    area = (scale[0] + (scale[1] - scale[0]) * u[:, 0]) * float(size * size)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = jnp.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    width = jnp.minimum(jnp.sqrt(area * aspect), float(size))
    height = jnp.minimum(jnp.sqrt(area / aspect), float(size))
    cx = width / 2 + u[:, 2] * (size - width)
    cy = height / 2 + u[:, 3] * (size - height)
    return cy, cx, height, width


def resized_crops(images: jax.Array, boxes: tuple[jax.Array, ...], flips: jax.Array,
                  out_size: int) -> jax.Array:
    """Each image's box, flipped, resampled bilinearly to out_size x out_size; float32
    [B, out_size, out_size, 3].

    images: [B, S, S, 3] (uint8 or float); boxes from `crop_boxes`; flips float32 [B, 2, 2]
    from `_flip_matrices` (applied to the output offsets, so the crop box keeps its shape)."""
    cy, cx, height, width = boxes
    grid = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) / out_size - 0.5  # [-0.5, 0.5)
    dy, dx = grid[:, None], grid[None, :]

    def one(image: jax.Array, cy: jax.Array, cx: jax.Array, h: jax.Array, w: jax.Array,
            mat: jax.Array) -> jax.Array:
        sy = mat[0, 0] * dy + mat[0, 1] * dx  # flipped offsets, still in [-0.5, 0.5]
        sx = mat[1, 0] * dy + mat[1, 1] * dx
        rows = cy + h * sy - 0.5  # pixel-centre coordinates of the source
        cols = cx + w * sx - 0.5
        image = image.astype(jnp.float32)
        return jax.vmap(
            lambda plane: ndimage.map_coordinates(plane, [rows, cols], order=1, mode="nearest"),
            in_axes=-1, out_axes=-1)(image)

    return jax.vmap(one)(images, cy, cx, height, width, flips)


# --------------------------------------------------------------------------- blur, solarise


def gaussian_blur(images: jax.Array, sigma: jax.Array, apply: jax.Array, radius: int
                  ) -> jax.Array:
    """Separable Gaussian blur of each image with its own sigma where `apply`; float32.

    images: float32 [B, H, W, C]; sigma: float32 [B] px; apply: bool [B]; radius: the kernel's
    half side (static). Borders repeat the edge pixel. Not applied = a unit impulse kernel (the
    same values back)."""
    if radius < 1:
        return images
    taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    sigma = jnp.maximum(sigma, 1e-3)[:, None]
    weights = jnp.exp(-0.5 * (taps[None, :] / sigma) ** 2)
    weights = weights / jnp.sum(weights, axis=1, keepdims=True)
    impulse = (taps == 0).astype(jnp.float32)[None, :]
    weights = jnp.where(apply[:, None], weights, impulse)  # [B, K]
    height, width = images.shape[1], images.shape[2]
    x = jnp.pad(images, ((0, 0), (radius, radius), (0, 0), (0, 0)), mode="edge")
    x = sum(weights[:, t, None, None, None] * x[:, t:t + height] for t in range(2 * radius + 1))
    x = jnp.pad(x, ((0, 0), (0, 0), (radius, radius), (0, 0)), mode="edge")
    return sum(weights[:, t, None, None, None] * x[:, :, t:t + width]
               for t in range(2 * radius + 1))


def solarize(images: jax.Array, apply: jax.Array, threshold: float = 128.0) -> jax.Array:
    """255 - x for the values >= threshold of the images where `apply` (bool [B]); [0, 255]."""
    flip = apply[:, None, None, None] & (images >= threshold)
    return jnp.where(flip, 255.0 - images, images)


# --------------------------------------------------------------------------- the views


def view(images: jax.Array, keys: jax.Array, config: ViewConfig, index: int) -> jax.Array:
    """One view (index 0 or 1: which of the per-view probabilities) of a batch.

    Args:
      images: uint8 [B, S, S, 3] (square, as the host pipeline ships them).
      keys: one PRNG key per example [B] (`device_augment.example_keys`).
      config: a `ViewConfig`.
      index: 0 for view 1, 1 for view 2.

    Returns:
      float32 [B, S, S, 3], normalised with config.mean/std.
    """
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be square [B, S, S, 3], got {images.shape}")
    size = images.shape[1]
    u = jax.vmap(lambda k: jax.random.uniform(k, (_NUM_DRAWS,), jnp.float32))(keys)
    boxes = crop_boxes(u[:, 0:4], size, config.crop_scale, config.crop_ratio)
    x = resized_crops(images, boxes, _flip_matrices(u[:, 4], config.flips), size)

    jitter = u[:, 5] < config.jitter_prob
    gray = u[:, 10] < config.grayscale_prob

    def factor(draw: jax.Array, strength: float) -> jax.Array:
        lo = max(0.0, 1.0 - strength)
        return jnp.where(jitter, lo + (1.0 + strength - lo) * draw, 1.0)

    saturation = factor(u[:, 8], config.saturation) if config.saturation else jnp.ones_like(u[:, 8])
    affine = device_augment.color_matrices(
        jnp.mean(x, axis=(1, 2)),
        brightness=factor(u[:, 6], config.brightness) if config.brightness else None,
        contrast=factor(u[:, 7], config.contrast) if config.contrast else None,
        # Greyscale = saturation 0 (hue turns about the grey axis: grey stays grey).
        saturation=jnp.where(gray, 0.0, saturation),
        hue=jnp.where(jitter, config.hue * (2.0 * u[:, 9] - 1.0), 0.0) if config.hue else None,
    )
    x = device_augment.apply_color(x, affine)

    blur_prob = config.blur_prob[index]
    if blur_prob > 0:
        lo, hi = config.blur_sigma
        sigma = (lo + (hi - lo) * u[:, 12]) * (size / BLUR_REFERENCE_SIZE)
        radius = int(size / BLUR_DIVIDER / 2)
        x = gaussian_blur(x, sigma, u[:, 11] < blur_prob, radius)
    if config.solarize_prob[index] > 0:
        x = solarize(x, u[:, 13] < config.solarize_prob[index])
    x = jnp.clip(x, 0.0, 255.0)
    mean = np.asarray(config.mean, np.float32)
    std = np.asarray(config.std, np.float32)
    return x * jnp.asarray(1.0 / (255.0 * std)) - jnp.asarray(mean / std)


def two_views(images: jax.Array, rng: jax.Array, config: ViewConfig, *,
              example_ids: jax.Array | None = None, axis_name: str | None = None
              ) -> tuple[jax.Array, jax.Array]:
    """BYOL's two views of a batch: (view 1, view 2), float32 [B, S, S, 3] each.

    Args:
      images: uint8 [B, S, S, 3] from the host pipeline.
      rng: the run's key (the same on every device); the views use fold_in(rng, VIEW_STREAM).
      config: a `ViewConfig`.
      example_ids: int [B], the examples' positions in the global stream (`batch["position"]`):
        the views do not depend on the sharding. None: keys split over this (local) batch,
        folded with the device index under pmap (`axis_name`).
    """
    base = jax.random.fold_in(rng, VIEW_STREAM)
    if example_ids is None and axis_name is not None:
        base = jax.random.fold_in(base, jax.lax.axis_index(axis_name))
    batch = images.shape[0]
    out = []
    for index in (0, 1):
        keys = device_augment.example_keys(jax.random.fold_in(base, index), batch, example_ids)
        out.append(view(images, keys, config, index))
    return out[0], out[1]
