"""Host half of the image pipeline: decode, random resized crop, dihedral flip; uint8 out (PIL).

The host does only what shrinks the data (or is free): JPEG decode at a reduced DCT scale where
possible, the random resized crop and resize to the output size in one PIL call, and one of the 8
flips/transposes. Rotation, colour jitter, colour constancy and float normalisation run batched on
the accelerator inside the step (`isic_jax.device_augment`), on the uint8 [S, S, 3] images made
here (4x less host->device traffic than float32).

Every function is a pure function of its inputs (an image, a `np.random.Generator`, parameters):
the Grain transforms in `input_pipeline` call them with the per-element generator Grain derives
from the seed and the element position, so a pipeline is reproducible and resumable.

Cost model (CPU time per image on the 2-core dev machine, stored images 256 px, output 224 px;
scripts/bench_input.py):
- JPEG decode ~0.55-0.65 ms: what a bare read+decode loop pays.
- Crop + resize, one `Image.resize(size, resample, box=crop)` call: NEAREST ~0.02 ms, BOX
  ~0.22-0.33 ms, BILINEAR ~0.29-0.45 ms (PIL's resampling is scalar C; for upscaling BOX gives
  the same pixels as NEAREST). Only NEAREST keeps the whole host side within 25 % of the bare
  decode, so it is the default (`AugmentConfig.interpolation`); it differs from antialiased
  bilinear by ~1 grey level (mean absolute) on the sample at scale factors 0.7-1.33.
- Dihedral element: `Image.transpose` ~0.03 ms (a numpy rot90 copy is ~8x slower).
- `np.asarray` of the result ~0.03 ms; the batch is a plain uint8 stack.
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

# ImageNet statistics on the [0, 1] scale, RGB (device_augment normalises with these).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
}
DEFAULT_INTERPOLATION = "nearest"

# PIL transposes equal to `dihedral(array, k)` for k = 1..7 (checked in the tests).
_TRANSPOSE = (
    None,
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_180,
    Image.Transpose.ROTATE_270,
    Image.Transpose.TRANSPOSE,
    Image.Transpose.FLIP_TOP_BOTTOM,
    Image.Transpose.TRANSVERSE,
    Image.Transpose.FLIP_LEFT_RIGHT,
)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Host augmentation parameters (the host half of `config.data.augment`).

    crop_scale: (min, max) fraction of the image area kept by the random resized crop.
    crop_ratio: (min, max) aspect ratio (width / height) of the crop.
    dihedral: draw one of the 8 flips/transposes uniformly.
    interpolation: "nearest" (default, fast), "box" or "bilinear" for the crop resize.
    Rotation and colour keys of `config.data.augment` belong to `device_augment`.
    """

    crop_scale: tuple[float, float] = (0.4, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    dihedral: bool = True
    interpolation: str = DEFAULT_INTERPOLATION

    def __post_init__(self) -> None:
        if self.interpolation not in RESAMPLE:
            raise ValueError(
                f"augment.interpolation must be one of {sorted(RESAMPLE)}, "
                f"got {self.interpolation!r}"
            )

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


# --------------------------------------------------------------------------- geometry


def dihedral(image: np.ndarray, k: int) -> np.ndarray:
    """Element k (0..7) of the dihedral group of the square on an array [H, W, ...].

    k % 4 = number of 90-degree counter-clockwise rotations; k >= 4 transposes first.
    """
    if k >= 4:
        image = np.swapaxes(image, 0, 1)
    return np.rot90(image, k % 4)


def dihedral_pil(image: Image.Image, k: int) -> Image.Image:
    """`dihedral` on a PIL image (one `Image.transpose`, ~8x cheaper than a numpy copy)."""
    return image if k == 0 else image.transpose(_TRANSPOSE[k])


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


# --------------------------------------------------------------------------- normalisation


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32, (image / 255 - IMAGENET_MEAN) / IMAGENET_STD (numpy).

    The host reference of `device_augment.normalize` (training and evaluation normalise on the
    device); for tools that feed a model without the device preprocessing.
    """
    scale = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)
    shift = (IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)
    return np.asarray(image, np.float32) * scale - shift


# --------------------------------------------------------------------------- full transforms


def train_image(
    data: bytes,
    rng: np.random.Generator,
    size: int,
    config: AugmentConfig,
    draft: bool = True,
) -> np.ndarray:
    """Decode + random resized crop + dihedral element of one encoded image; uint8 [S, S, 3].

    Draws, in this order: crop box (`sample_crop`), dihedral element k (if enabled). The JPEG is
    decoded at the smallest DCT scale that keeps the crop >= `size` pixels per side (draft=False:
    always full size, for comparisons); the crop is resized by one `Image.resize(box=...)` with
    `config.interpolation`; then `Image.transpose` applies element k (= `dihedral(array, k)`).
    Rotation, colour and normalisation happen later on the device (`device_augment`).
    """
    image = open_jpeg(data)
    width, height = image.size
    cx, cy, cw, ch = sample_crop(rng, width, height, config.crop_scale, config.crop_ratio)
    k = int(rng.integers(8)) if config.dihedral else 0
    min_size = (width * size / cw, height * size / ch)
    image, _ = decode(image, min_size if draft else None)
    box = crop_box(image.size, (width, height), (cx, cy), (cw, ch))
    out = image.resize((size, size), RESAMPLE[config.interpolation], box=box)
    return np.asarray(dihedral_pil(out, k))


def eval_image(data: bytes, size: int, draft: bool = True) -> np.ndarray:
    """Deterministic: shorter side to `size`, centre crop; uint8 [size, size, 3].

    Uses JPEG draft decoding when the stored image is >= 2x `size`, and PIL's antialiased
    bilinear resize of the centred square (evaluation is not on the hot path). Colour constancy
    and normalisation follow on the device (`device_augment.preprocess_eval`).
    """
    image = open_jpeg(data)
    width, height = image.size
    short = min(width, height)
    min_size = (width * size / short, height * size / short)
    image, _ = decode(image, min_size if draft else None)
    box = crop_box(image.size, (width, height), (width / 2, height / 2), (short, short))
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=box))


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Resizes so that the shorter side is `size` (antialiased bilinear); keeps aspect ratio."""
    width, height = image.size
    scale = size / min(width, height)
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(new, Image.Resampling.BILINEAR, reducing_gap=3.0)


def dihedral_variants(image: np.ndarray) -> Sequence[np.ndarray]:
    """All 8 dihedral transforms of an array [H, W, C] (for tests and test-time augmentation)."""
    return [dihedral(image, k) for k in range(8)]
