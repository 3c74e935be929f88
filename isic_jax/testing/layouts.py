"""Tiny hand-made ISIC release layouts for tests (a few small images + the official CSV/JSON/HDF5).

`write_layout(root, layout, examples)` writes `examples` where the official download has them, in
any layout of the release table (`isic_jax.data.isic.layouts`) that says what a typical image's
label is: "archive" (isic-cli's metadata.csv), "archive_json" (legacy `<id>.json` records),
"isic2016" ... "isic2024" (HDF5 images), "isic2020_dicom" (Kaggle's train.csv + DICOM). The
files, their names and columns, and the image folder are the entry's; the same writers write
`isic-jax synth` output.

`Example.dx` is the release's own label value: "benign"/"malignant" (2016, archive_json),
"nevus"/"melanoma"/"seborrheic_keratosis" (2017), a one-hot column name (2018/2019), "0"/"1"
(2020/2024 target), "Benign"/"Malignant"/"Indeterminate" (archive diagnosis_1). Any other value is
written as is (or as an all-zero one-hot row) to make an "unknown label" row. A typical benign or
malignant value comes with the entry's typical diagnosis (e.g. a nevus, an invasive melanoma).
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from isic_jax.data.isic.layouts import VARIANTS
from isic_jax.data.isic.layouts.spec import MetadataRow, Variant
from isic_jax.data.isic.layouts.write import write_images, write_metadata

# The layouts hand-made examples can be written in, by name, in the release table's order.
LAYOUTS: dict[str, Variant] = {name: v for name, v in VARIANTS.items() if v.typical is not None}
# Where each layout keeps its image files ("" : the top level, or no image files).
IMAGE_DIRS: dict[str, str] = {name: v.images.folder for name, v in LAYOUTS.items()}


@dataclasses.dataclass
class Example:
    """One metadata row; `image` None writes no image file (a row whose image is missing)."""

    image_id: str
    dx: str
    image: bytes | None = None
    patient_id: str = ""
    lesion_id: str = ""
    age: str = ""
    sex: str = ""
    site: str = ""


def jpeg(
    width: int = 40,
    height: int = 30,
    color: tuple[int, int, int] = (180, 120, 90),
    *,
    mode: str = "RGB",
    orientation: int | None = None,
    quality: int = 90,
) -> bytes:
    """A small JPEG: a coloured field with a dark square in the top-left corner.

    orientation: EXIF Orientation tag to store (6 = rotate 90 degrees clockwise to display).
    """
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:] = color
    arr[: max(1, height // 3), : max(1, width // 3)] = (20, 20, 20)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    out = io.BytesIO()
    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    img.save(out, "JPEG", quality=quality, **kwargs)
    return out.getvalue()


def png(width: int = 40, height: int = 30, mode: str = "RGBA") -> bytes:
    """A small PNG in `mode` ("RGBA", "LA", "L", "P", "I;16", ...), with a dark corner square."""
    if mode == "I;16":
        arr = np.full((height, width), 50000, np.uint16)
        arr[: height // 3, : width // 3] = 3000
        img = Image.fromarray(arr)  # 16-bit grayscale
    else:
        arr = np.zeros((height, width, 4), np.uint8)
        arr[:] = (200, 100, 50, 255)
        arr[: height // 3, : width // 3] = (20, 20, 20, 128)
        img = Image.fromarray(arr, "RGBA").convert(mode)
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def write_layout(
    root: str | os.PathLike,
    release: str,
    examples: Sequence[Example],
    *,
    duplicates: Sequence[tuple[str, str]] = (),
) -> str:
    """Writes `examples` in the official layout `release` (a name in LAYOUTS) under `root`;
    returns `root`.

    duplicates: (first, second) pairs of images that are the same picture, for layouts with a
    duplicates file (isic2020); `second` must be one of the examples.
    """
    variant = LAYOUTS.get(release)
    if variant is None:
        raise ValueError(f"unknown fixture release {release!r}")
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    copy_of = {second: first for first, second in duplicates}
    unknown = set(copy_of) - {e.image_id for e in examples}
    if unknown:
        raise ValueError(f"duplicates name images that are not examples: {sorted(unknown)}")
    rows = [
        MetadataRow(
            image_id=e.image_id,
            label=e.dx,
            diagnosis=variant.typical.diagnosis(e.dx),
            patient_id=e.patient_id,
            lesion_id=e.lesion_id,
            age=e.age,
            sex=e.sex,
            site=e.site,
            duplicate_of=copy_of.get(e.image_id, ""),
        )
        for e in examples
    ]
    write_metadata(variant, root, rows)
    images = {e.image_id: e.image for e in examples if e.image is not None}
    write_images(variant, root, images, hdf5_storage="opaque", rows={r.image_id: r for r in rows})
    return root


def balanced_examples(
    release: str, n: int = 10, *, size: tuple[int, int] = (40, 30), patients: bool = True
) -> list[Example]:
    """`n` valid examples of layout `release` (alternating benign/malignant, 2 per patient when
    `patients`)."""
    typical = LAYOUTS[release].typical
    values = (typical.benign, typical.malignant)
    out = []
    for i in range(n):
        out.append(
            Example(
                image_id=f"ISIC_{i:07d}",
                dx=values[i % 2],
                image=jpeg(*size, color=(100 + 10 * i % 150, 90, 80)),
                patient_id=f"IP_{i // 2:03d}" if patients else "",
                lesion_id=f"IL_{i:03d}",
                age=str(30 + i),
                sex=("female", "male")[i % 2],
                site="torso",
            )
        )
    return out
