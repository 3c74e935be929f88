"""Host half of the image pipeline: decode, random resized crop, resize; uint8 out (PIL + numpy).

The host does only what shrinks the data: JPEG decode (at a reduced DCT scale where possible) and
the random resized crop + resize to the output size in one PIL call per image, into one uint8
[B, S, S, 3] batch. The dihedral flips, rotation, colour jitter, colour constancy and float
normalisation run batched on the accelerator inside the step (`isic_jax.data.device_augment`), which
also makes host->device traffic 4x smaller than float32.

Randomness is a pure function of (seed, example position): `position_uniforms` hashes them
(splitmix64, vectorised over the batch), so a batch is reproducible, resumable and the same
whatever the process count, without a numpy Generator per image.

Cost model (CPU time per image on the 2-core dev machine, stored images 256 px, output 224 px;
scripts/bench_input.py). Per-image Python work between two JPEG decodes runs cache-cold (a new
Generator ~50 us, a Python crop sampler ~20 us, Grain's per-element random_map ~20-50 us), so the
batch functions here keep the per-image work to the PIL calls:
- JPEG decode ~0.45-0.6 ms: what a bare read+decode loop pays.
- Crop + resize, one `Image.resize(size, resample, box=crop)` call: NEAREST ~0.03 ms, BOX
  ~0.22-0.33 ms, BILINEAR ~0.3-0.45 ms (PIL resamples with scalar C; for upscaling BOX gives the
  same pixels as NEAREST). Only NEAREST keeps the host within 25 % of the bare decode, so it is
  the default (`AugmentConfig.interpolation`); it differs from antialiased bilinear by ~1 grey
  level (mean absolute) on the sample at scale factors 0.7-1.33.
- `tobytes` of the result ~0.05 ms (PIL keeps RGB as 4 bytes per pixel and packs it); the batch
  is one join of those bytes. A dihedral `Image.transpose` would cost another ~0.03 ms, so the
  flips run on the device instead, inside the rotation's bilinear gather, for free.
- Each decoded image is freed before the next is decoded: keeping a batch of them alive made
  every decode write to fresh, page-faulting memory (+~0.1 ms per image).
- JPEG decoding uses `Image.draft` (DCT scaling 1/2, 1/4, 1/8) when the crop needs at most half of
  the stored resolution; draft only reduces when both sides are >= 2x the requested size.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

# ImageNet statistics on the [0, 1] scale, RGB: the default input normalisation, and what
# torchvision's and timm's ResNet weights were trained with.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    # Bilinear through OpenCV's SIMD resize (the `fast-resize` extra), of the crop box rounded to
    # whole pixels. Not antialiased: random crops are resized by at most ~1.6x down here.
    "opencv_bilinear": Image.Resampling.BILINEAR,
}
DEFAULT_INTERPOLATION = "nearest"
CROP_TRIES = 10  # torchvision's RandomResizedCrop attempts before its fallback
CROP_DRAWS = 4 * CROP_TRIES  # uniforms per example: (area, log-ratio, x, y) per try
_MASK64 = (1 << 64) - 1


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Host augmentation parameters (the host half of `config.data.augment`).

    crop_scale: (min, max) fraction of the image area kept by the random resized crop.
    crop_ratio: (min, max) aspect ratio (width / height) of the crop.
    interpolation: "nearest" (default, fast), "box" or "bilinear" (PIL) for the crop resize, or
      "opencv_bilinear" (needs OpenCV: `pip install 'isic-jax[fast-resize]'`).
    The other keys of `config.data.augment` (dihedral, rotation, colour) are `device_augment`'s.
    """

    crop_scale: tuple[float, float] = (0.4, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = DEFAULT_INTERPOLATION

    def __post_init__(self) -> None:
        if self.interpolation not in RESAMPLE:
            raise ValueError(
                f"augment.interpolation must be one of {sorted(RESAMPLE)}, "
                f"got {self.interpolation!r}"
            )
        if self.interpolation == "opencv_bilinear":
            _opencv()

    @classmethod
    def from_config(cls, augment: Mapping[str, Any]) -> AugmentConfig:
        """From `config.data.augment` (a ConfigDict or dict); missing keys keep the defaults."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: augment[k] for k in fields if k in augment}
        for key in ("crop_scale", "crop_ratio"):
            if key in kwargs:
                kwargs[key] = tuple(float(v) for v in kwargs[key])
        return cls(**kwargs)


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


# --------------------------------------------------------------------------- randomness


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic): a strong bit mixer."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def position_uniforms(seed: int, positions: np.ndarray | Sequence[int], n: int) -> np.ndarray:
    """n uniforms in [0, 1) per position, float64 [B, n]: a pure function of (seed, position).

    Counter-based (splitmix64 of the seed, the position and the draw number), vectorised over the
    batch: no Generator per example, and the same numbers whatever batch or process an example
    lands in.
    """
    positions = np.asarray(positions, np.int64).reshape(-1).astype(np.uint64)
    key = _splitmix64(np.array([int(seed) & _MASK64], np.uint64))
    per_example = _splitmix64(_splitmix64(positions ^ key))
    draws = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)
    bits = _splitmix64(per_example[:, None] ^ draws[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# --------------------------------------------------------------------------- geometry


def dihedral(image: Any, k: int, axes: tuple[int, int] = (0, 1)) -> Any:
    """Element k (0..7) of the dihedral group of the square on the two `axes` of an array
    ([H, W, ...] by default; (1, 2) for a batch [B, H, W, C]); numpy and jax arrays alike.

    k % 4 = number of 90-degree counter-clockwise rotations (as np.rot90); k >= 4 transposes
    first. (`device_augment` applies the same elements on the device.)
    """
    a, b = axes
    if k >= 4:
        image = image.swapaxes(a, b)
    flip = tuple(slice(None, None, -1) if i == b else slice(None) for i in range(image.ndim))
    for _ in range(k % 4):
        image = image[flip].swapaxes(a, b)  # np.rot90(m, 1, axes) = flip(m, b) then swap
    return image


def sample_crops(
    uniforms: np.ndarray,
    widths: np.ndarray | Sequence[float],
    heights: np.ndarray | Sequence[float],
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torchvision's RandomResizedCrop boxes, vectorised: (centre x, centre y, width, height).

    uniforms: float [B, >= CROP_DRAWS] in [0, 1) (`position_uniforms`); widths, heights: [B]
    stored image sizes. Try t (of CROP_TRIES) draws an area fraction ~ U(scale) and a log-uniform
    aspect ratio ~ ratio; the first try that fits is used, placed uniformly; when none fits, the
    largest centred box whose aspect ratio lies in `ratio`. Boxes are continuous (sub-pixel),
    float64 [B] each, in stored pixels.
    """
    u = np.asarray(uniforms, np.float64)[:, :CROP_DRAWS].reshape(-1, CROP_TRIES, 4)
    width = np.asarray(widths, np.float64)
    height = np.asarray(heights, np.float64)
    area = (width * height)[:, None]
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = np.sqrt(target * aspect)
    h = np.sqrt(target / aspect)
    fits = (w <= width[:, None]) & (h <= height[:, None])
    rows = np.arange(len(width))
    first = np.argmax(fits, axis=1)  # the first try that fits (0 when none does: masked below)
    w, h = w[rows, first], h[rows, first]
    cx = w / 2 + u[rows, first, 2] * (width - w)
    cy = h / 2 + u[rows, first, 3] * (height - h)
    # Fallback: the whole image, trimmed to the nearest allowed aspect ratio, centred.
    in_ratio = width / height
    fallback_w = np.where(in_ratio > max(ratio), height * max(ratio), width)
    fallback_h = np.where(in_ratio < min(ratio), width / min(ratio), height)
    ok = fits.any(axis=1)
    return (
        np.where(ok, cx, width / 2),
        np.where(ok, cy, height / 2),
        np.where(ok, w, fallback_w),
        np.where(ok, h, fallback_h),
    )


def crop_box(
    image_size: tuple[int, int],
    stored_size: tuple[int, int],
    center: tuple[float, float],
    crop_size: tuple[float, float],
) -> tuple[float, float, float, float]:
    """PIL box (left, upper, right, lower) of a crop given in stored pixels, in `image_size`
    pixels (a draft-decoded image is smaller than the stored one), clipped to the image."""
    sx, sy = image_size[0] / stored_size[0], image_size[1] / stored_size[1]
    left = min(max(0.0, sx * (center[0] - crop_size[0] / 2)), image_size[0])
    upper = min(max(0.0, sy * (center[1] - crop_size[1] / 2)), image_size[1])
    right = min(max(left, sx * (center[0] + crop_size[0] / 2)), image_size[0])
    lower = min(max(upper, sy * (center[1] + crop_size[1] / 2)), image_size[1])
    return left, upper, right, lower


@functools.cache
def _opencv() -> Any:
    """The cv2 module, set up once (a ValueError naming the key and the extra without it)."""
    try:
        import cv2
    except ImportError as error:
        raise ValueError(
            "config.data.augment.interpolation='opencv_bilinear' needs OpenCV: "
            "pip install 'isic-jax[fast-resize]' (or opencv-python-headless)"
        ) from error
    cv2.setNumThreads(1)  # one image at a time per pipeline thread; no nested thread pool
    return cv2


def _crop_resize(
    image: Image.Image,
    box: tuple[float, float, float, float],
    size: int,
    resample: Image.Resampling,
    draft: bool,
    cv2: Any = None,
) -> Image.Image | bytes:
    """Decodes a lazily opened image at the DCT scale the crop allows, crops and resizes it.

    box: (centre x, centre y, width, height) in stored pixels. Returns an RGB image [size, size],
    or with `cv2` (the module) its packed RGB bytes (OpenCV's bilinear resize of the box rounded
    to whole pixels).
    """
    width, height = image.size
    cx, cy, cw, ch = box
    min_size = (width * size / cw, height * size / ch)
    image, _ = decode(image, min_size if draft else None)
    left, upper, right, lower = crop_box(image.size, (width, height), (cx, cy), (cw, ch))
    if cv2 is None:
        return image.resize((size, size), resample, box=(left, upper, right, lower))
    # The box rounded to whole pixels (<= 0.5 px off a random crop): cv2.resize of a plain crop
    # is 3x faster than a sub-pixel cv2.warpAffine (both pixel-centre aligned, as PIL).
    left, upper = int(round(left)), int(round(upper))
    right, lower = max(int(round(right)), left + 1), max(int(round(lower)), upper + 1)
    crop = np.asarray(image.crop((left, upper, right, lower)))
    out = cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)
    return out.tobytes()


# --------------------------------------------------------------------------- normalisation


def normalization(data_config: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std), float32 [3] each on the [0, 1] scale, from `config.data.mean/std`.

    Empty or absent (configs from before these keys, or not yet resolved from a pretrained
    source) means ImageNet's.
    """
    mean = data_config.get("mean", ()) if data_config is not None else ()
    std = data_config.get("std", ()) if data_config is not None else ()
    if not len(mean) or not len(std):
        return IMAGENET_MEAN, IMAGENET_STD
    return np.asarray(mean, np.float32).reshape(3), np.asarray(std, np.float32).reshape(3)


def normalize(
    image: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> np.ndarray:
    """uint8 [..., 3] -> float32, (image / 255 - mean) / std (numpy; ImageNet's by default).

    The host reference of `device_augment.normalize` (training and evaluation normalise on the
    device); for tools that feed a model without the device preprocessing.
    """
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    scale = (1.0 / (255.0 * std)).astype(np.float32)
    shift = (mean / std).astype(np.float32)
    return np.asarray(image, np.float32) * scale - shift


# --------------------------------------------------------------------------- full transforms


def _stack(chunks: Sequence[bytes], size: int) -> np.ndarray:
    """Packed RGB images (`Image.tobytes`) -> one writable uint8 [B, size, size, 3] array.

    One copy: bytearray.join, which numpy wraps without copying (bytes would be read-only).
    """
    return np.frombuffer(bytearray().join(chunks), np.uint8).reshape(len(chunks), size, size, 3)


def train_batch(
    datas: Sequence[bytes],
    positions: np.ndarray | Sequence[int],
    seed: int,
    size: int,
    config: AugmentConfig,
    draft: bool = True,
) -> np.ndarray:
    """Decode + random resized crop of each encoded image; uint8 [B, size, size, 3].

    Example i's crop comes from `position_uniforms(seed, positions)[i]` via `sample_crops`, so it
    depends only on (seed, position). Headers are read first (sizes for the vectorised crop
    sampling); then each image is decoded at the smallest DCT scale that keeps its crop >= `size`
    pixels per side (draft=False: full size), cropped and resized by one PIL call with
    `config.interpolation`, packed and freed before the next decode. No flips or rotation: the
    device does those (`device_augment`).
    """
    images: list[Image.Image | None] = [open_jpeg(data) for data in datas]
    widths = [im.size[0] for im in images]
    heights = [im.size[1] for im in images]
    uniforms = position_uniforms(seed, positions, CROP_DRAWS)
    boxes = np.stack(
        sample_crops(uniforms, widths, heights, config.crop_scale, config.crop_ratio), axis=1
    )
    resample = RESAMPLE[config.interpolation]
    cv2 = _opencv() if config.interpolation == "opencv_bilinear" else None
    chunks = []
    for i, box in enumerate(boxes.tolist()):
        image, images[i] = images[i], None
        out = _crop_resize(image, tuple(box), size, resample, draft, cv2)
        chunks.append(out if cv2 is not None else out.tobytes())
        image.close()
    return _stack(chunks, size)


def _eval_resize(data: bytes, size: int, draft: bool) -> Image.Image:
    """The centred square of the shorter side, resized to [size, size] (antialiased bilinear)."""
    image = open_jpeg(data)
    width, height = image.size
    short = min(width, height)
    box = (width / 2, height / 2, short, short)
    return _crop_resize(image, box, size, Image.Resampling.BILINEAR, draft)


def eval_batch(datas: Sequence[bytes | None], size: int, draft: bool = True) -> np.ndarray:
    """`eval_image` of each encoded image (None: a black padding image); uint8 [B, S, S, 3]."""
    blank = bytes(size * size * 3)
    chunks = [blank if d is None else _eval_resize(d, size, draft).tobytes() for d in datas]
    return _stack(chunks, size)


def eval_image(data: bytes, size: int, draft: bool = True) -> np.ndarray:
    """Deterministic: shorter side to `size`, centre crop; uint8 [size, size, 3].

    Uses JPEG draft decoding when the stored image is >= 2x `size`, and PIL's antialiased
    bilinear resize of the centred square (evaluation is not on the hot path). Colour constancy
    and normalisation follow on the device (`device_augment.preprocess_eval`).
    """
    return np.asarray(_eval_resize(data, size, draft))
