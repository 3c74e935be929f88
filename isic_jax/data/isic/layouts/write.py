"""Writers of a variant's official files: `isic_jax.data.synth` and the hand-made test layouts
(`isic_jax.testing.layouts`) both write through them, each feeding its own rows."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence

from isic_jax.data.isic.layouts.spec import ImageSource, MetadataRow, Role, Variant
from isic_jax.utils import write_csv


def csv_row(role: Role, row: MetadataRow) -> list[str]:
    """The cells of one image's row in the CSV of `role` (columns missing from both the derived
    values and `row.columns` are empty)."""
    assert role.values is not None
    values = {**role.values(row), **row.columns}
    return [values.get(c, "") for c in role.columns]


def write_metadata(
    variant: Variant, root: str | os.PathLike, rows: Sequence[MetadataRow]
) -> list[str]:
    """Writes the official metadata files of `variant` under `root`, one row per element of `rows`
    (in that order); returns their official paths, in the order of the variant's roles."""
    written = []
    for role in variant.roles:
        if role.kind == "csv" and (role.values is not None or role.table is not None):
            data = role.table(rows) if role.table else [csv_row(role, r) for r in rows]
            header = list(role.columns) if role.header else None
            write_csv(os.path.join(root, role.official), header, data, lineterminator=role.line_end)
            written.append(role.official)
        elif role.kind == "json" and role.values is not None:
            folder = os.path.join(root, variant.images.folder)
            os.makedirs(folder, exist_ok=True)
            for r in rows:
                if "/" in r.image_id:
                    continue  # an id that is not a file name has no record file
                with open(os.path.join(folder, r.image_id + ".json"), "w", encoding="utf-8") as f:
                    json.dump(role.values(r), f)
    return written


def _dicom_tags(row: MetadataRow | None) -> dict[str, str]:
    """The patient data elements the Kaggle ISIC 2020 DICOM files carry, from a metadata row."""
    if row is None:
        return {}
    age = ""
    if row.age:
        age = f"{int(float(row.age)):03d}Y"
    return {
        "PatientID": row.patient_id,
        "PatientSex": {"female": "F", "male": "M"}.get(row.sex, ""),
        "PatientAge": age,
        "BodyPartExamined": row.site.upper().replace("/", " ")[:16],
    }


def write_images(
    variant: Variant,
    root: str | os.PathLike,
    images: Mapping[str, bytes],
    *,
    hdf5_storage: str = "string",
    ext: str = ".jpg",
    rows: Mapping[str, MetadataRow] | None = None,
) -> str | None:
    """Writes encoded images (by image id) where `variant` keeps them; returns the official path
    of the image container ("hdf5"), or None for image files.

    files: `<folder>/<image_id><ext>` (the folder is created even with no image; ids that are not
    file names are not written). dicom: `<folder>/<image_id>.dcm`, the JPEG encapsulated as it is
    (JPEG baseline, YBR_FULL_422), with the patient data elements of `rows[image_id]` when given.
    hdf5: one scalar dataset per id, sorted; `hdf5_storage` "string" (fixed-length bytes, |S<n>,
    read back as numpy.bytes_) or "opaque" (np.void, |V<n>).
    """
    source: ImageSource = variant.images
    if source.kind in ("files", "dicom"):
        folder = pathlib.Path(root, source.folder)
        folder.mkdir(parents=True, exist_ok=True)
        for image_id, data in images.items():
            if "/" in image_id or ".." in image_id:
                continue
            if source.kind == "files":
                (folder / f"{image_id}{ext}").write_bytes(data)
            else:
                from isic_jax.data.isic import dicom

                tags = _dicom_tags((rows or {}).get(image_id))
                dicom.write_dicom(folder / f"{image_id}.dcm", jpeg=data, image_id=image_id,
                                  tags=tags)  # fmt: skip
        return None
    if source.kind == "hdf5":
        import h5py  # only the HDF5 layouts need it
        import numpy as np

        name = variant.role(source.role).official
        path = pathlib.Path(root, name)
        if path.exists():
            path.unlink()
        # "string" is the layout the Kaggle file appears to use. Both read with bytes(ds[()]).
        # libver="earliest" and track_times=False keep the file byte-identical across runs.
        with h5py.File(path, "w", libver="earliest") as f:
            for image_id in sorted(images):
                data = images[image_id]
                value = np.asarray(data) if hdf5_storage == "string" else np.void(data)
                f.create_dataset(image_id, data=value, track_times=False)
        return name
    raise ValueError(f"no writer for image source {source.kind!r}")
