"""Tiny hand-made ISIC release layouts for tests (a few small images + the official CSV/JSON/HDF5).

`write_layout(root, release, examples)` writes `examples` where the official download has them:

| release | ground truth / metadata | images |
| --- | --- | --- |
| archive | metadata.csv (isic_id, attribution, ..., diagnosis_1..3, patient_id, lesion_id) | ./ |
| archive_json | <id>.json legacy records (meta.clinical.benign_malignant, diagnosis) | ./ |
| isic2016 | ISBI2016_ISIC_Part3_Training_GroundTruth.csv (no header) | ISBI2016_..._Data/ |
| isic2017 | ISIC-2017_Training_Part3_GroundTruth.csv + ..._Data_metadata.csv | ..._Data/ |
| isic2018 | ISIC2018_Task3_Training_GroundTruth/...csv + ..._LesionGroupings.csv | ..._Input/ |
| isic2019 | ISIC_2019_Training_GroundTruth.csv + ISIC_2019_Training_Metadata.csv | ..._Input/ |
| isic2020 | ISIC_2020_Training_GroundTruth_v2.csv + ISIC_2020_Training_Duplicates.csv | train/ |
| isic2024 | train-metadata.csv | train-image.hdf5 |

`Example.dx` is the release's own label value: "benign"/"malignant" (2016, archive_json),
"nevus"/"melanoma"/"seborrheic_keratosis" (2017), a one-hot column name (2018/2019), "0"/"1"
(2020/2024 target), "Benign"/"Malignant"/"Indeterminate" (archive diagnosis_1). Any other value is
written as is (or as an all-zero one-hot row) to make an "unknown label" row.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

IMAGE_DIRS: dict[str, str] = {
    "archive": "",
    "archive_json": "",
    "isic2016": "ISBI2016_ISIC_Part3_Training_Data",
    "isic2017": "ISIC-2017_Training_Data",
    "isic2018": "ISIC2018_Task3_Training_Input",
    "isic2019": "ISIC_2019_Training_Input",
    "isic2020": "train",
    "isic2024": "",
}
_ONE_HOT = {
    "isic2018": ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"],
    "isic2019": ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"],
}


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


def _write_csv(path: str, header: Sequence[str] | None, rows: Sequence[Sequence[object]]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        if header is not None:
            writer.writerow(header)
        writer.writerows(rows)


def _write_images(root: str, release: str, examples: Sequence[Example], ext: str = ".jpg") -> None:
    folder = os.path.join(root, IMAGE_DIRS[release])
    os.makedirs(folder, exist_ok=True)
    for ex in examples:
        if ex.image is not None and "/" not in ex.image_id and ".." not in ex.image_id:
            with open(os.path.join(folder, ex.image_id + ext), "wb") as f:
                f.write(ex.image)


def _one_hot_row(release: str, ex: Example) -> list[str]:
    return [ex.image_id] + ["1.0" if c == ex.dx else "0.0" for c in _ONE_HOT[release]]


def write_layout(
    root: str | os.PathLike,
    release: str,
    examples: Sequence[Example],
    *,
    duplicates: Sequence[tuple[str, str]] = (),
) -> str:
    """Writes `examples` in the official layout of `release` under `root`; returns `root`.

    duplicates: isic2020 only, the (image_name_1, image_name_2) pairs of the duplicates CSV.
    """
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    if release == "archive":
        header = ["isic_id", "attribution", "copyright_license", "age_approx",
                  "anatom_site_general", "diagnosis_1", "diagnosis_2", "diagnosis_3",
                  "lesion_id", "patient_id", "sex"]  # fmt: skip
        third = {"Malignant": "Melanoma Invasive", "Benign": "Nevus"}
        rows = [[e.image_id, "Anonymous", "CC-0", e.age, e.site, e.dx, "", third.get(e.dx, ""),
                 e.lesion_id, e.patient_id, e.sex] for e in examples]  # fmt: skip
        _write_csv(os.path.join(root, "metadata.csv"), header, rows)
    elif release == "archive_json":
        for e in examples:
            if "/" in e.image_id:
                continue
            clinical = {
                "benign_malignant": e.dx,
                "age_approx": int(e.age) if e.age else None,
                "sex": e.sex or None,
                "diagnosis": {"malignant": "melanoma", "benign": "nevus"}.get(e.dx),
            }
            record = {
                "_id": "0" * 24,
                "name": e.image_id,
                "meta": {"clinical": clinical, "acquisition": {"image_type": "dermoscopic"}},
            }
            with open(os.path.join(root, e.image_id + ".json"), "w") as f:
                json.dump(record, f)
    elif release == "isic2016":
        path = os.path.join(root, "ISBI2016_ISIC_Part3_Training_GroundTruth.csv")
        _write_csv(path, None, [[e.image_id, e.dx] for e in examples])
    elif release == "isic2017":
        rows = [
            [
                e.image_id,
                "1.0" if e.dx == "melanoma" else "0.0",
                "1.0" if e.dx == "seborrheic_keratosis" else "0.0",
            ]
            if e.dx in ("nevus", "melanoma", "seborrheic_keratosis")
            else [e.image_id, e.dx, "0.0"]  # an unknown label value
            for e in examples
        ]
        _write_csv(
            os.path.join(root, "ISIC-2017_Training_Part3_GroundTruth.csv"),
            ["image_id", "melanoma", "seborrheic_keratosis"],
            rows,
        )
        _write_csv(
            os.path.join(root, IMAGE_DIRS[release], "ISIC-2017_Training_Data_metadata.csv"),
            ["image_id", "age_approximate", "sex"],
            [[e.image_id, e.age or "unknown", e.sex or "unknown"] for e in examples],
        )
    elif release == "isic2018":
        _write_csv(
            os.path.join(
                root,
                "ISIC2018_Task3_Training_GroundTruth",
                "ISIC2018_Task3_Training_GroundTruth.csv",
            ),
            ["image", *_ONE_HOT[release]],
            [_one_hot_row(release, e) for e in examples],
        )
        _write_csv(
            os.path.join(root, "ISIC2018_Task3_Training_LesionGroupings.csv"),
            ["image", "lesion_id", "diagnosis_confirm_type"],
            [[e.image_id, e.lesion_id, "histopathology"] for e in examples],
        )
    elif release == "isic2019":
        _write_csv(
            os.path.join(root, "ISIC_2019_Training_GroundTruth.csv"),
            ["image", *_ONE_HOT[release]],
            [_one_hot_row(release, e) for e in examples],
        )
        _write_csv(
            os.path.join(root, "ISIC_2019_Training_Metadata.csv"),
            ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"],
            [[e.image_id, e.age, e.site, e.lesion_id, e.sex] for e in examples],
        )
    elif release == "isic2020":
        header = [
            "image_name",
            "patient_id",
            "lesion_id",
            "sex",
            "age_approx",
            "anatom_site_general_challenge",
            "diagnosis",
            "benign_malignant",
            "target",
        ]
        rows = [
            [
                e.image_id,
                e.patient_id,
                e.lesion_id,
                e.sex,
                e.age,
                e.site,
                "melanoma" if e.dx == "1" else "unknown",
                {"1": "malignant", "0": "benign"}.get(e.dx, ""),
                e.dx,
            ]
            for e in examples
        ]
        _write_csv(os.path.join(root, "ISIC_2020_Training_GroundTruth_v2.csv"), header, rows)
        _write_csv(
            os.path.join(root, "ISIC_2020_Training_Duplicates.csv"),
            ["image_name_1", "image_name_2"],
            [list(p) for p in duplicates],
        )
    elif release == "isic2024":
        import h5py

        header = [
            "isic_id",
            "target",
            "patient_id",
            "age_approx",
            "sex",
            "anatom_site_general",
            "lesion_id",
            "iddx_full",
            "iddx_1",
            "iddx_2",
            "iddx_3",
            "iddx_4",
            "iddx_5",
        ]
        rows = [
            [
                e.image_id,
                e.dx,
                e.patient_id,
                e.age,
                e.sex,
                e.site,
                e.lesion_id,
                "Malignant" if e.dx == "1" else "Benign",
                "Malignant" if e.dx == "1" else "Benign",
                "",
                "Melanoma Invasive" if e.dx == "1" else "",
                "",
                "",
            ]
            for e in examples
        ]
        _write_csv(os.path.join(root, "train-metadata.csv"), header, rows)
        with h5py.File(os.path.join(root, "train-image.hdf5"), "w") as f:
            for e in examples:
                if e.image is not None:
                    f.create_dataset(e.image_id, data=np.void(e.image))
        return root
    else:
        raise ValueError(f"unknown fixture release {release!r}")
    _write_images(root, release, examples)
    return root


def balanced_examples(
    release: str, n: int = 10, *, size: tuple[int, int] = (40, 30), patients: bool = True
) -> list[Example]:
    """`n` valid examples (alternating benign/malignant, 2 per patient when `patients`)."""
    values = {
        "archive": ("Benign", "Malignant"),
        "archive_json": ("benign", "malignant"),
        "isic2016": ("benign", "malignant"),
        "isic2017": ("nevus", "melanoma"),
        "isic2018": ("NV", "MEL"),
        "isic2019": ("NV", "MEL"),
        "isic2020": ("0", "1"),
        "isic2024": ("0", "1"),
    }[release]
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
