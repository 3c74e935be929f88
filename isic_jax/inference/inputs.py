"""The images to predict on: a folder or a CSV listing them, resolved without leaving it.

    items = list_inputs("new_images/")          # or "test.csv"
    image = load_image(item.path, stored_size=512, image_size=384, max_pixels=...)

- a folder: every image file (.jpg .jpeg .png .bmp .tif .tiff .webp, DICOM .dcm; any case) up
  to 3 folder levels down (`SourceTree`: hidden files skipped, folder links not followed, a link
  that resolves outside the folder is refused with an error row). Image id: the file stem (the
  relative path without extension when two files share a stem).
- a CSV: column `path`, or else `image` / `image_name` / `isic_id`, holding paths relative to the
  CSV's folder; an id without extension finds `<id>.<ext>` there. A path that resolves outside
  the CSV's folder (`../x.jpg`, an absolute path elsewhere, a link) gets an error row and is
  never opened.

Each image goes through what `isic-jax prepare` and evaluation do (`load_image`): safe decode
(EXIF transpose, RGB conversion, pixel limit) + shorter-side resize to `stored_size` + JPEG
re-encode, then `image_ops.eval_image` (centre crop, resize to `image_size`) -> uint8.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import pathlib

import numpy as np

from isic_jax.data import image_ops
from isic_jax.data.isic import images
from isic_jax.data.isic.releases import SourceTree

# .dcm: DICOM (e.g. Kaggle's ISIC 2020 test/*.dcm); `process_image` reads the JPEG it holds.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dcm",
)  # fmt: skip
ID_COLUMNS: tuple[str, ...] = ("image", "image_name", "isic_id")


class InputError(ValueError):
    """The --input is neither a folder nor a readable CSV with a path/id column."""


@dataclasses.dataclass
class Item:
    """One input image.

    image_id: the id written to the output. path: absolute path to read (None when refused).
    shown: the path as the user gave it (relative to the folder / CSV folder). error: why it
    was refused before decoding (None when it is to be read). row: the CSV row it comes from
    (its metadata columns, read by their ISIC names, for a model with a metadata branch).
    """

    image_id: str
    path: str | None
    shown: str
    error: str | None = None
    row: dict[str, str] | None = None


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root + os.sep)


def list_folder(folder: str | os.PathLike) -> list[Item]:
    """The image files of a folder tree (see the module docstring), sorted by relative path."""
    tree = SourceTree(folder)
    rels = [f for f in tree.files if f.lower().endswith(IMAGE_EXTENSIONS)]
    outside = [f for f in tree.outside if f.lower().endswith(IMAGE_EXTENSIONS)]
    stems: dict[str, int] = {}
    for rel in rels + outside:
        stem = os.path.splitext(rel.rsplit("/", 1)[-1])[0]
        stems[stem] = stems.get(stem, 0) + 1

    def image_id(rel: str) -> str:
        stem = os.path.splitext(rel.rsplit("/", 1)[-1])[0]
        return stem if stems[stem] == 1 else os.path.splitext(rel)[0]

    items = [Item(image_id(rel), tree.abspath(rel), rel) for rel in rels]
    items += [
        Item(image_id(rel), None, rel, "link that resolves outside the input folder: refused")
        for rel in outside
    ]
    return sorted(items, key=lambda item: item.shown)


def _resolve_csv_path(root: str, value: str) -> tuple[str | None, str | None]:
    """(absolute path, None) or (None, error) for one CSV cell, relative to `root` (real)."""
    candidates = [value]
    if not value.lower().endswith(IMAGE_EXTENSIONS):
        candidates += [value + ext for ext in IMAGE_EXTENSIONS]
        candidates += [value + ext.upper() for ext in IMAGE_EXTENSIONS]
    for candidate in candidates:
        real = os.path.realpath(os.path.join(root, candidate))
        if not _inside(real, root):
            return None, (
                f"path {value!r} resolves outside the CSV's folder ({root}): refused"
            )
        if os.path.isfile(real):
            return real, None
    return None, f"no such image file: {value!r} (looked in {root})"


def list_csv(csv_path: str | os.PathLike) -> list[Item]:
    """One item per data row of a CSV (see the module docstring), in file order.

    Raises:
      InputError: no `path` and no image-id column, or an unreadable file.
    """
    csv_path = pathlib.Path(csv_path)
    root = os.path.realpath(csv_path.parent)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
            header = [h.strip() for h in (rows[0].keys() if rows else [])]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"cannot read {csv_path}: {e}") from e
    if not rows:
        raise InputError(f"{csv_path} has no data rows")
    lower = {h.lower(): h for h in header if h}
    path_col = lower.get("path")
    id_col = next((lower[c] for c in ID_COLUMNS if c in lower), None)
    if path_col is None and id_col is None:
        raise InputError(
            f"{csv_path} needs a column `path` or one of {', '.join(ID_COLUMNS)}; "
            f"it has {', '.join(header)}"
        )
    items = []
    for row in rows:
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        value = row.get(path_col or id_col, "")
        image_id = row.get(id_col, "") if id_col else ""
        if not image_id:
            image_id = os.path.splitext(os.path.basename(value))[0]
        if not value:
            items.append(Item(image_id, None, value, "empty path", row))
            continue
        path, error = _resolve_csv_path(root, value)
        items.append(Item(image_id, path, value, error, row))
    return items


def list_inputs(source: str | os.PathLike) -> list[Item]:
    """A folder or a CSV -> items (see the module docstring)."""
    if os.path.isdir(source):
        return list_folder(source)
    if os.path.isfile(source):
        return list_csv(source)
    raise InputError(f"--input {os.fspath(source)!r} is neither a folder nor a CSV file")


def load_image(path: str, stored_size: int, image_size: int, max_pixels: int) -> np.ndarray:
    """What a prepared-then-evaluated image looks like; uint8 [image_size, image_size, 3].

    Raises:
      datasets.isic.images.BadImage: with the reason.
    """
    stored = images.process_image(path, stored_size, max_pixels=max_pixels)
    return image_ops.eval_image(stored, image_size)
