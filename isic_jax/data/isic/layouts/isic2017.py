"""ISIC 2017 Part 3: melanoma and seborrheic keratosis flags; age and sex in a metadata CSV."""

from __future__ import annotations

from collections.abc import Iterator

from isic_jax.data.isic import labels as L
from isic_jax.data.isic.layouts import rows as R
from isic_jax.data.isic.layouts.spec import (
    Header,
    ImageSource,
    Inputs,
    MetadataRow,
    Release,
    Role,
    TypicalLabels,
    Variant,
)
from isic_jax.data.isic.layouts.synthspec import (
    BENIGN,
    MALIGNANT,
    SynthSpec,
    confirm_type,
    dx,
    label_is_name,
)

CLASSES = ("nevus", "melanoma", "seborrheic_keratosis")
_FLAGS = ("melanoma", "seborrheic_keratosis")
IMAGE_DIR = "ISIC-2017_Training_Data"


def _read(inputs: Inputs) -> Iterator[R.Row | R.Skip]:
    rel = inputs.files["ground_truth"]
    meta = R.metadata_by_id(inputs.path("metadata"), "image_id")
    for line, row in R.dict_rows(inputs.path("ground_truth")):
        image_id = row.get("image_id", "")
        flags = {}
        for col in _FLAGS:
            raw = row.get(col, "")
            flags[col] = L.parse_binary(raw)
            if flags[col] is None:
                yield R.Skip(image_id, f"unknown label value {col}={raw!r} ({rel} row {line})")
                break
        else:
            if flags["melanoma"] and flags["seborrheic_keratosis"]:
                yield R.Skip(
                    image_id,
                    f"unknown label: melanoma and seborrheic_keratosis both 1 ({rel} row {line})",
                )
                continue
            diagnosis = (
                "melanoma"
                if flags["melanoma"]
                else "seborrheic_keratosis"
                if flags["seborrheic_keratosis"]
                else "nevus"
            )
            m = meta.get(image_id, {})
            yield R.Row(
                image_id,
                f"{rel} row {line}",
                int(flags["melanoma"]),
                diagnosis,
                age=L.parse_age(m.get("age_approximate")),
                sex=L.parse_sex(m.get("sex")),
            )


def _truth_values(r: MetadataRow) -> dict[str, str]:
    if r.label not in CLASSES:  # an unknown label value, written as the melanoma flag
        return {"image_id": r.image_id, "melanoma": r.label, "seborrheic_keratosis": "0.0"}
    flags = {col: "1.0" if r.label == col else "0.0" for col in _FLAGS}
    return {"image_id": r.image_id, **flags}


def _metadata_values(r: MetadataRow) -> dict[str, str]:
    return {"image_id": r.image_id, "age_approximate": r.age or "unknown",
            "sex": r.sex or "unknown"}  # fmt: skip


RELEASE = Release(
    name="isic2017",
    classes=CLASSES,
    malignant=("melanoma",),
    common={"nevus": "NV", "melanoma": "MEL", "seborrheic_keratosis": "BKL"},
    expected=(
        "ISIC-2017_Training_Part3_GroundTruth.csv (image_id,melanoma,seborrheic_keratosis) + "
        "images (ISIC-2017_Training_Data/); optional ISIC-2017_Training_Data_metadata.csv "
        "(image_id,age_approximate,sex)"
    ),
    citation="Codella et al., Skin Lesion Analysis Toward Melanoma Detection: ISBI 2017, "
    "arXiv:1710.05006",
    variants=(
        Variant(
            name="isic2017",
            roles=(
                Role(
                    "ground_truth",
                    recognise=Header(("image_id", *_FLAGS)),
                    required=True,
                    official="ISIC-2017_Training_Part3_GroundTruth.csv",
                    columns=("image_id", *_FLAGS),
                    values=_truth_values,
                ),
                Role(
                    "metadata",
                    recognise=Header(("image_id", "age_approximate", "sex")),
                    official=f"{IMAGE_DIR}/ISIC-2017_Training_Data_metadata.csv",
                    columns=("image_id", "age_approximate", "sex"),
                    values=_metadata_values,
                ),
            ),
            read=_read,
            images=ImageSource(folder=IMAGE_DIR),
            typical=TypicalLabels("nevus", "melanoma"),
        ),
    ),
    synth=SynthSpec(
        diagnoses=(
            dx("nevus", BENIGN, 0.84, ("NV", 0.85), ("ATYP", 0.15)),
            dx("seborrheic_keratosis", BENIGN, 0.16, "BKL"),
            dx("melanoma", MALIGNANT, 1.0, "MEL"),
        ),
        label=label_is_name,
        every_class=True,
        per_image=confirm_type,
        blanks=(("age_approx", 0.05), ("sex", 0.05)),
        superpixels=True,
    ),
)
