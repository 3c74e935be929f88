"""Safe decode, validation and resizing of one input image (PIL only; thread-safe).

Policy, applied to every release:
- The whole image is decoded (`img.load()`) before anything is stored: a truncated JPEG opens fine
  and only fails there. Any failure becomes a `BadImage` with a reason; nothing half-decoded is
  kept.
- Decompression bombs: an image with more than `max_pixels` pixels (width x height, read from the
  header before decoding) is refused, and PIL's own `DecompressionBombError`/`Warning` are caught.
- JPEGs are decoded at a reduced scale first (`Image.draft`, libjpeg DCT scaling 1/2, 1/4, 1/8),
  never below the target size, so a 3872x2592 original costs a fraction of a full decode.
- EXIF orientation is applied (`ImageOps.exif_transpose`), so the stored pixels are upright and the
  stored JPEG carries no EXIF. An unreadable EXIF block leaves the pixels as decoded.
- Colour: grayscale, palette, CMYK and YCbCr become RGB; alpha (RGBA, LA, palette transparency) is
  composited over black, the colour of the dermoscope's vignette; 16-bit grayscale (PNG "I;16") is
  scaled to 8 bits (value / 257), not clipped.
- Resize: the shorter side becomes exactly `size` px, the aspect ratio is kept (the longer side is
  rounded), Lanczos filter, both down and up. Stored as baseline JPEG, quality 95, 4:2:0 chroma.
- DICOM (`.dcm` paths, or bytes with the DICOM magic): `dicom.read_image` gives the JPEG it
  encapsulates (decoded here like any JPEG, so both give the same stored image) or, for other
  pixel encodings, an RGB image decoded by pydicom; its failures are `BadImage`s too.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import io
import itertools
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from isic_jax.data.isic import dicom

DEFAULT_MAX_PIXELS: int = 89_478_485  # PIL's own default limit (about 9459 x 9459)
DEFAULT_JPEG_QUALITY: int = 95
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Raster formats only: PIL would run Ghostscript for EPS, and nothing in ISIC needs more.
_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF")  # JPEG also opens MPO

T = TypeVar("T")
R = TypeVar("R")


class BadImage(Exception):
    """An input that cannot become a training image; `str(exc)` is the reason for the report."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (see the module docstring for the policy)."""
    if img.mode == "RGB":
        return img
    if img.mode in _HIGH_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else 1.0
        arr = np.clip(np.nan_to_num(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise BadImage(f"unsupported colour mode {img.mode}: {exc}") from exc


def resized_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side equal to `size` and the aspect ratio kept."""
    if width <= height:
        return size, max(size, round(height * size / width))
    return max(size, round(width * size / height)), size


def process_image(
    fp: str | os.PathLike | BinaryIO | bytes | Image.Image,
    size: int,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    quality: int = DEFAULT_JPEG_QUALITY,
) -> bytes:
    """Decodes, validates and resizes one image; returns JPEG bytes.

    Args:
      fp: a file path, an open binary file, the encoded bytes (JPEG, PNG, ..., or a DICOM file),
        or an already decoded PIL image.
      size: the shorter side of the result, px.
      max_pixels: images with more pixels (width * height) are refused.
      quality: JPEG quality of the result.

    Returns:
      JPEG bytes of an RGB image whose shorter side is `size` px.

    Raises:
      BadImage: with the reason, for anything that is not a decodable image within the limit.
    """
    if dicom.is_dicom(fp):
        try:
            fp = dicom.read_image(fp, max_pixels)  # JPEG bytes, or decoded RGB pixels
        except dicom.DicomError as exc:
            raise BadImage(str(exc)) from exc
        except OSError as exc:
            raise BadImage(f"cannot read the file ({exc})") from exc
    if isinstance(fp, bytes | bytearray | memoryview):
        fp = io.BytesIO(fp)
    try:
        opened = fp if isinstance(fp, Image.Image) else Image.open(fp, formats=_FORMATS)
        with opened as img:
            width, height = img.size
            if width < 1 or height < 1:
                raise BadImage(f"empty image ({width}x{height})")
            if width * height > max_pixels:
                raise BadImage(
                    f"decompression bomb: {width}x{height} = {width * height} px is over the "
                    f"limit of {max_pixels} px"
                )
            if getattr(img, "format", None) in ("JPEG", "MPO"):
                # Decode at the smallest DCT scale whose shorter side is still >= size.
                img.draft("RGB", (size, size))
            img.load()  # full decode: this is where truncated or corrupt data fails
            # A broken EXIF block is not a broken image: keep the pixels as decoded.
            with contextlib.suppress(Exception):
                ImageOps.exif_transpose(img, in_place=True)
            rgb = _to_rgb(img)
            target = resized_shape(rgb.width, rgb.height, size)
            if rgb.size != target:
                rgb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
            out = io.BytesIO()
            rgb.save(out, format="JPEG", quality=quality)
            return out.getvalue()
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise BadImage("not an image (PIL cannot identify the file)") from exc
    except MemoryError as exc:
        raise BadImage("image too large to decode in memory") from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on hostile files
        raise BadImage(f"corrupt or truncated image ({type(exc).__name__}: {exc})") from exc


@contextlib.contextmanager
def pil_limits(max_pixels: int) -> Iterator[None]:
    """Sets PIL's decompression-bomb limit to `max_pixels` and turns its warning into an error.

    Process-wide (PIL and `warnings` keep global state): enter it once around a whole build, in
    the main thread, not per image.
    """
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def default_num_workers() -> int:
    """All the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], num_workers: int, window: int | None = None
) -> Iterator[R]:
    """`map(fn, items)` on a thread pool, results in input order, at most `window` in flight.

    Threads suffice: PIL releases the GIL while it decodes, resizes and encodes. `items` is
    consumed in the calling thread only (so it may read from an h5py file). Closing the iterator
    early cancels what has not started.
    """
    if num_workers <= 1:
        yield from map(fn, items)
        return
    window = window or 4 * num_workers
    iterator = iter(items)
    executor = concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix="isic-img")
    try:
        pending = collections.deque(
            executor.submit(fn, x) for x in itertools.islice(iterator, window)
        )
        while pending:
            result = pending.popleft().result()
            for x in itertools.islice(iterator, 1):
                pending.append(executor.submit(fn, x))
            yield result
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
