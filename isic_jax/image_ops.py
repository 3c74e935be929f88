"""Decode, augment and normalise single images on the host (PIL + numpy).

Every function is a pure function of its inputs (an image, a `np.random.Generator`, parameters):
the Grain transforms in `input_pipeline` call them with the per-element generator Grain derives
from the seed and the element index, so a pipeline is reproducible and resumable.

Cost model (why the code is shaped this way; CPU time per 224 px image on the 2-core dev machine,
stored images 256 px, see scripts/bench_input.py):
- JPEG decode ~0.6 ms; this is what a bare read+decode loop pays.
- All geometry (random resized crop, rotation, the 8 dihedral flips/transposes, the JPEG draft
  scale) is one affine map, so it is one `Image.transform(AFFINE)` call: PIL resamples each output
  pixel once. PIL's bilinear affine is a generic per-pixel loop, ~1 ms at 224 px (~20 ns/pixel,
  more than the decode); nearest is ~0.07 ms (`AugmentConfig.interpolation`). Separate resize +
  rotate calls would each cost about as much.
- All colour ops (Shades-of-Gray gains, brightness, contrast, saturation, hue) are affine maps of
  RGB, so they compose into one 3x4 matrix applied by a single `Image.convert("RGB", matrix)` call
  on uint8 (~0.15-0.2 ms, clamps to [0, 255] once), skipped when it is the identity.
- Image statistics (Shades-of-Gray illuminant, mean grey for contrast) come from a 64x64 nearest
  subsample of the decoded image (~10 us) instead of a full-image pass.
- Normalisation (uint8 -> float32, ImageNet mean/std) is a cast copy and two in-place passes with
  per-channel constants tiled along the row (`normalize_into`, ~0.1-0.2 ms), written straight
  into the batch array, so no float32 image is copied again.
- JPEG decoding uses `Image.draft` (DCT scaling 1/2, 1/4, 1/8) when the crop needs at most half of
  the stored resolution; draft only reduces when both sides are >= 2x the requested size.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

# ImageNet statistics on the [0, 1] scale, RGB.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# Luma weights (ITU-R 601, as torchvision's rgb_to_grayscale) and the RGB -> YIQ matrix used for
# hue rotation about the grey axis.
_LUMA = np.array([0.299, 0.587, 0.114])
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)

_STATS_SIZE = 64  # side of the nearest-neighbour subsample used for colour statistics
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation parameters (mirrors `config.data.augment`).

    crop_scale: (min, max) fraction of the image area kept by the random resized crop.
    crop_ratio: (min, max) aspect ratio (width / height) of the crop.
    dihedral: draw one of the 8 flips/transposes uniformly.
    rotation: max degrees, angle uniform in [-rotation, rotation]; 0 disables.
    brightness, contrast, saturation: factor uniform in [max(0, 1 - v), 1 + v]; 0 disables.
    hue: shift uniform in [-hue, hue] (fraction of a full turn); 0 disables.
    color_constancy: apply Shades of Gray (p = 6) before the jitter.
    interpolation: "bilinear" or "nearest" for the geometric resampling.
    """

    crop_scale: tuple[float, float] = (0.4, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    dihedral: bool = True
    rotation: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    color_constancy: bool = False
    interpolation: str = "bilinear"

    @classmethod
    def from_config(cls, augment: Mapping[str, Any]) -> AugmentConfig:
        """From `config.data.augment` (a ConfigDict or dict); missing keys keep the defaults."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: augment[k] for k in fields if k in augment}
        for key in ("crop_scale", "crop_ratio"):
            if key in kwargs:
                kwargs[key] = tuple(float(v) for v in kwargs[key])
        config = cls(**kwargs)
        if config.interpolation not in _RESAMPLE:
            raise ValueError(
                f"augment.interpolation must be one of {sorted(_RESAMPLE)}, "
                f"got {config.interpolation!r}"
            )
        return config


# --------------------------------------------------------------------------- decoding


def open_jpeg(data: bytes) -> Image.Image:
    """Opens encoded image bytes lazily (header only; pixels are decoded on `load`)."""
    return Image.open(io.BytesIO(data))


def decode(
    data: bytes | Image.Image, min_size: tuple[float, float] | None = None
) -> tuple[Image.Image, float]:
    """Decodes an encoded image to RGB, at reduced JPEG scale where `min_size` allows.

    Args:
      data: encoded image bytes (JPEG; other formats decode at full size), or the not yet loaded
        image from `open_jpeg` (saves parsing the header twice).
      min_size: (width, height) the decoded image must at least have; JPEG DCT scaling by 1/2,
        1/4 or 1/8 is used when both sides stay >= these. None: full size.

    Returns:
      (image, factor): an RGB PIL image and the linear scale factor decoded / stored size
      (1, 0.5, 0.25 or 0.125).
    """
    image = open_jpeg(data) if isinstance(data, bytes | bytearray | memoryview) else data
    width = image.size[0]
    if min_size is not None and image.format == "JPEG":
        image.draft("RGB", (max(1, math.ceil(min_size[0])), max(1, math.ceil(min_size[1]))))
    factor = 1.0 / max(1, round(width / image.size[0]))
    if image.mode != "RGB":
        image = image.convert("RGB")
    else:
        image.load()
    return image, factor


# --------------------------------------------------------------------------- geometry


def dihedral(image: np.ndarray, k: int) -> np.ndarray:
    """Element k (0..7) of the dihedral group of the square on an array [H, W, ...].

    k % 4 = number of 90-degree counter-clockwise rotations; k >= 4 transposes first.
    """
    if k >= 4:
        image = np.swapaxes(image, 0, 1)
    return np.rot90(image, k % 4)


def _dihedral_matrix(k: int) -> tuple[float, float, float, float]:
    """(m00, m01, m10, m11): centred output (x, y) -> centred input (x, y), equal to `dihedral`."""
    # np.rot90 by 90 degrees CCW in array terms: out[r, c] = in[c, W-1-r] -> in (x, y) = (-y, x).
    mat = np.linalg.matrix_power(np.array([[0.0, -1.0], [1.0, 0.0]]), k % 4)
    if k >= 4:
        mat = np.array([[0.0, 1.0], [1.0, 0.0]]) @ mat
    return tuple(float(v) for v in mat.ravel())


_DIHEDRAL = tuple(_dihedral_matrix(k) for k in range(8))


def sample_crop(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[float, float, float, float]:
    """torchvision's RandomResizedCrop box: (centre x, centre y, width, height), stored pixels.

    Up to 10 tries of area fraction ~ U(scale) and log-uniform aspect ratio ~ ratio; falls back to
    the largest centred box whose aspect ratio lies in `ratio`. Boxes are continuous (sub-pixel).
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = rng.random(4)
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = math.sqrt(target_area * aspect)
        h = math.sqrt(target_area / aspect)
        if 0 < w <= width and 0 < h <= height:
            return w / 2 + u[2] * (width - w), h / 2 + u[3] * (height - h), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = float(width), width / min(ratio)
    elif in_ratio > max(ratio):
        w, h = height * max(ratio), float(height)
    else:
        w, h = float(width), float(height)
    return width / 2, height / 2, w, h


def affine_coefficients(
    size: int,
    center: tuple[float, float],
    crop_size: tuple[float, float],
    angle_deg: float = 0.0,
    k: int = 0,
    factor: float = 1.0,
) -> tuple[float, ...]:
    """PIL AFFINE coefficients mapping an output square [0, size]^2 into the input image.

    Output point q -> input = factor * (center + R(angle) @ diag(crop_w, crop_h)/size @ D_k @
    (q - size/2)), in continuous pixel coordinates (PIL samples pixel centres at +0.5). `factor`
    is the decoded/stored scale of a draft-decoded JPEG; center and crop_size are in stored pixels.
    """
    # Plain floats: this runs per image and 2x2 numpy calls would cost more than the maths.
    theta = math.radians(angle_deg)
    cos, sin = math.cos(theta), math.sin(theta)
    sx, sy = factor * crop_size[0] / size, factor * crop_size[1] / size
    d00, d01, d10, d11 = _DIHEDRAL[k]
    # lin = factor * R @ diag(crop_w, crop_h) / size @ D
    a, b = cos * sx * d00 - sin * sy * d10, cos * sx * d01 - sin * sy * d11
    d, e = sin * sx * d00 + cos * sy * d10, sin * sx * d01 + cos * sy * d11
    half = size / 2
    c = factor * center[0] - (a + b) * half
    f = factor * center[1] - (d + e) * half
    return (a, b, c, d, e, f)


# --------------------------------------------------------------------------- colour


def color_stats(image: Image.Image) -> np.ndarray:
    """A 64x64 nearest-neighbour subsample of an RGB image, float64 [4096, 3] on [0, 255]."""
    small = image.resize((_STATS_SIZE, _STATS_SIZE), Image.Resampling.NEAREST)
    return np.asarray(small, dtype=np.float64).reshape(-1, 3)


def shades_of_gray_gains(pixels: np.ndarray, power: float = 6.0) -> np.ndarray:
    """Shades-of-Gray colour constancy (Finlayson & Trezzi 2004) per-channel gains, float64 [3].

    pixels: [N, 3] on [0, 255]. The illuminant estimate is the Minkowski p-norm of each channel;
    gains make it neutral (gain 1 for a grey image), as in the ISIC 2018/2019 winning entries.
    """
    if power == 6:  # x**6 by multiplication: np.power's generic pow is ~5x slower
        squared = pixels * pixels
        powered = squared * squared * squared
    else:
        powered = np.power(pixels, power)
    illuminant = np.power(np.mean(powered, axis=0), 1.0 / power)
    norm = np.sqrt(np.sum(illuminant**2))
    if norm <= 0:
        return np.ones(3)
    illuminant = np.maximum(illuminant / norm, 1e-6)
    return 1.0 / (illuminant * math.sqrt(3.0))


def color_matrix(
    gains: np.ndarray | None = None,
    brightness: float = 1.0,
    contrast: float = 1.0,
    saturation: float = 1.0,
    hue: float = 0.0,
    mean_gray: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Composes gains -> brightness -> contrast -> saturation -> hue into x -> A @ x + t (RGB).

    Factors follow torchvision's adjust_* semantics (1 = identity; hue in turns). `mean_gray` is
    the mean luma of the image after the gains, before brightness (contrast blends with it).
    Returns (A float64 [3, 3], t float64 [3]) on the [0, 255] scale.
    """
    a = np.diag(gains) if gains is not None else np.eye(3)
    a = brightness * a
    a = contrast * a
    t = np.full(3, (1.0 - contrast) * brightness * mean_gray)
    sat = saturation * np.eye(3) + (1.0 - saturation) * np.outer(np.ones(3), _LUMA)
    a, t = sat @ a, sat @ t
    if hue:
        c, s = math.cos(2 * math.pi * hue), math.sin(2 * math.pi * hue)
        rot = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
        hue_mat = _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ
        a, t = hue_mat @ a, hue_mat @ t
    return a, t


def apply_color(image: Image.Image, a: np.ndarray, t: np.ndarray) -> Image.Image:
    """Applies x -> clip(A @ x + t, 0, 255) to an RGB PIL image in one C pass (uint8)."""
    matrix = tuple(float(v) for v in np.concatenate([a, t[:, None]], axis=1).ravel())
    return image.convert("RGB", matrix)


# --------------------------------------------------------------------------- normalisation


def normalize_into(out: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Writes (image / 255 - IMAGENET_MEAN) / IMAGENET_STD into `out`.

    image: uint8 [H, W, 3]; out: float32 [H, W, 3] (e.g. a slice of the batch array). The
    per-channel constants are tiled along the row so numpy runs long inner loops (a trailing axis
    of 3 is ~5x slower).
    """
    height, width, _ = image.shape
    scale = np.tile((1.0 / (255.0 * IMAGENET_STD)).astype(np.float32), width)
    shift = np.tile((IMAGENET_MEAN / IMAGENET_STD).astype(np.float32), width)
    rows = out.reshape(height, width * 3)
    rows[...] = image.reshape(height, width * 3)  # cast copy, then two in-place passes (fastest)
    rows *= scale
    rows -= shift
    return out


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [H, W, 3], ImageNet mean/std normalised."""
    return normalize_into(np.empty(image.shape, np.float32), np.ascontiguousarray(image))


# --------------------------------------------------------------------------- full transforms


def train_image(
    data: bytes,
    rng: np.random.Generator,
    size: int,
    config: AugmentConfig,
    draft: bool = True,
) -> np.ndarray:
    """Decode + random augmentation of one encoded image; uint8 [size, size, 3].

    Draws, in this order: crop box, dihedral element, angle, brightness, contrast, saturation,
    hue. The geometry is one PIL affine resample of the (draft-)decoded JPEG; the colour ops one
    3x4 matrix. Normalise with `normalize`/`normalize_into` afterwards. draft=False always
    decodes at full size (for comparisons).

    Differences from torchvision's RandomResizedCrop + ColorJitter, on purpose: crop boxes are
    sub-pixel; the jitter order is fixed (brightness, contrast, saturation, hue) and clamps once
    at the end; contrast blends with the mean grey of the whole image, not of the crop; hue is a
    rotation about the grey axis in YIQ (a linear map) instead of an HSV shift. Rotated corners
    are filled black, the colour of the dermoscope's vignette.
    """
    image = open_jpeg(data)
    width, height = image.size
    cx, cy, cw, ch = sample_crop(rng, width, height, config.crop_scale, config.crop_ratio)
    k = int(rng.integers(8)) if config.dihedral else 0
    angle = float(rng.uniform(-config.rotation, config.rotation)) if config.rotation else 0.0
    jitter = rng.random(4)

    # Smallest decode size that keeps the crop at >= `size` pixels per side (the shorter crop
    # side for both axes: rotation and transposes mix them).
    short = min(cw, ch)
    min_size = (width * size / short, height * size / short)
    image, factor = decode(image, min_size if draft else None)
    coeffs = affine_coefficients(size, (cx, cy), (cw, ch), angle, k, factor)
    resample = _RESAMPLE[config.interpolation]
    out = image.transform((size, size), Image.Transform.AFFINE, coeffs, resample=resample)

    def factor_in(v: float, u: float) -> float:
        return max(0.0, 1.0 - v) + (1.0 + v - max(0.0, 1.0 - v)) * u

    brightness = factor_in(config.brightness, jitter[0]) if config.brightness else 1.0
    contrast = factor_in(config.contrast, jitter[1]) if config.contrast else 1.0
    saturation = factor_in(config.saturation, jitter[2]) if config.saturation else 1.0
    hue = config.hue * (2.0 * jitter[3] - 1.0) if config.hue else 0.0
    gains, mean_gray = None, 0.0
    if config.color_constancy or contrast != 1.0:
        pixels = color_stats(image)
        if config.color_constancy:
            gains = shades_of_gray_gains(pixels)
            pixels = pixels * gains
        mean_gray = float(np.mean(np.minimum(pixels, 255.0) @ _LUMA))
    if gains is not None or (brightness, contrast, saturation, hue) != (1.0, 1.0, 1.0, 0.0):
        out = apply_color(
            out, *color_matrix(gains, brightness, contrast, saturation, hue, mean_gray)
        )
    return np.asarray(out)


def eval_image(
    data: bytes, size: int, color_constancy: bool = False, draft: bool = True
) -> np.ndarray:
    """Deterministic: shorter side to `size`, centre crop, optional Shades of Gray; uint8 [S, S, 3].

    Uses JPEG draft decoding when the stored image is >= 2x `size`, and PIL's antialiased
    bilinear resize of the centred square.
    """
    image = open_jpeg(data)
    width, height = image.size
    short = min(width, height)
    min_size = (width * size / short, height * size / short)
    image, factor = decode(image, min_size if draft else None)
    side = short * factor
    cx, cy = width * factor / 2, height * factor / 2
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    out = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if color_constancy:
        a, t = color_matrix(shades_of_gray_gains(color_stats(image)))
        out = apply_color(out, a, t)
    return np.asarray(out)


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Resizes so that the shorter side is `size` (antialiased bilinear); keeps aspect ratio."""
    width, height = image.size
    scale = size / min(width, height)
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(new, Image.Resampling.BILINEAR, reducing_gap=3.0)


def dihedral_variants(image: np.ndarray) -> Sequence[np.ndarray]:
    """All 8 dihedral transforms of an array [H, W, C] (for tests and test-time augmentation)."""
    return [dihedral(image, k) for k in range(8)]
