"""ISIC 2020 (SIIM-ISIC): a binary `target` per image with patient ids, and the list of duplicate
images (the second of each pair is dropped).

Two layouts: the challenge's (`ISIC_2020_Training_GroundTruth(_v2).csv` + JPEGs) and the Kaggle
copy's DICOM files (`train.csv` + `train/*.dcm`, JPEG-baseline encapsulated, YBR_FULL_422), read
when the download holds no JPEG (the Kaggle copy also has `jpeg/train/*.jpg`, read first).
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator, Sequence

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
from isic_jax.data.isic.layouts.synthspec import BENIGN, MALIGNANT, SynthSpec, dx, label_is_target
from isic_jax.utils import write_csv

GROUND_TRUTH_COLUMNS = (
    "image_name", "patient_id", "lesion_id", "sex", "age_approx", "anatom_site_general_challenge",
    "diagnosis", "benign_malignant", "target",
)  # fmt: skip
# Kaggle's train.csv: the v1 ground truth's columns (no lesion_id).
KAGGLE_COLUMNS = tuple(c for c in GROUND_TRUTH_COLUMNS if c != "lesion_id")
SUBMISSION = ("image_name", "target")
# Kaggle's sample_submission.csv (image_name,target) also has the two columns the ground truth is
# known by: a ground truth has at least one more of its own.
_GROUND_TRUTH = Header(("image_name", "target"), any_of=("patient_id", "benign_malignant"))


def _read(inputs: Inputs) -> Iterator[R.Row | R.Skip]:
    rel = inputs.files["ground_truth"]
    for line, row in R.dict_rows(inputs.path("ground_truth")):
        image_id = row.get("image_name", "")
        where = f"{rel} row {line}"
        raw = row.get("target", "")
        label = L.parse_binary(raw) if raw != "" else L.parse_binary(row.get("benign_malignant"))
        if label is None:
            yield R.Skip(image_id, f"unknown label value target={raw!r} ({where})")
            continue
        yield R.Row(
            image_id,
            where,
            label,
            L.archive_class(row.get("diagnosis")),
            patient_id=L.parse_text(row.get("patient_id")),
            lesion_id=L.parse_text(row.get("lesion_id")),
            age=L.parse_age(row.get("age_approx")),
            sex=L.parse_sex(row.get("sex")),
            anatom_site=L.parse_site(
                row.get("anatom_site_general_challenge", row.get("anatom_site_general"))
            ),
        )


def _drop_duplicates(inputs: Inputs, kept: list[R.Row], skips: list[R.Skip]) -> list[R.Row]:
    """Drops the second image of each listed pair (when both are there)."""
    if "duplicates" not in inputs.files:
        return kept
    rel = inputs.files["duplicates"]
    dropped: set[str] = set()
    present = {r.image_id for r in kept}
    for line, row in R.dict_rows(inputs.path("duplicates")):
        first, second = row.get("image_name_1", ""), row.get("image_name_2", "")
        if first in dropped or second in dropped or first == second or second not in present:
            continue
        dropped.add(second)
        skips.append(
            R.Skip(
                second,
                f"duplicate image of {first} ({rel} row "
                f"{line}: the second of each pair is dropped)",
            )
        )
    return [r for r in kept if r.image_id not in dropped]


def _values(r: MetadataRow) -> dict[str, str]:
    return {
        "image_name": r.image_id,
        "patient_id": r.patient_id,
        "lesion_id": r.lesion_id,
        "sex": r.sex,
        "age_approx": r.age,
        "anatom_site_general_challenge": r.site,
        "diagnosis": r.diagnosis,
        "benign_malignant": {"1": "malignant", "0": "benign"}.get(r.label, ""),
        "target": r.label,
    }


def _pairs(rows: Sequence[MetadataRow]) -> list[list[str]]:
    return sorted([r.duplicate_of, r.image_id] for r in rows if r.duplicate_of)


def _sample_submission(root: pathlib.Path, rows: Sequence[MetadataRow]) -> list[str]:
    """Kaggle's sample_submission.csv: the test images (ids not among the training ones), 0."""
    n = min(10, len(rows))
    write_csv(root / "sample_submission.csv", list(SUBMISSION),
              [[f"ISIC_{9_990_000 + i:07d}", "0"] for i in range(n)])  # fmt: skip
    return ["sample_submission.csv"]


def _duplicates_role() -> Role:
    return Role(
        "duplicates",
        recognise=Header(("image_name_1", "image_name_2")),
        official="ISIC_2020_Training_Duplicates.csv",
        columns=("image_name_1", "image_name_2"),
        table=_pairs,
    )


RELEASE = Release(
    name="isic2020",
    classes=tuple(L.ARCHIVE_CLASSES),
    malignant=("MEL", "BCC", "SCC", "AK"),
    common={"other": "unknown"},
    expected=(
        "ISIC_2020_Training_GroundTruth.csv or _v2.csv, or Kaggle's train.csv (image_name,"
        "patient_id,sex,age_approx,anatom_site_general_challenge,diagnosis,benign_malignant,"
        "target[,lesion_id]) + images (train/*.jpg, or the Kaggle copy's train/*.dcm when there "
        "is no JPEG); optional ISIC_2020_Training_Duplicates.csv (image_name_1,image_name_2)"
    ),
    citation="Rotemberg et al., A patient-centric dataset of images and metadata for "
    "identifying melanomas using clinical context, Sci. Data 8, 34 (2021)",
    variants=(
        Variant(
            name="isic2020",
            roles=(
                Role(
                    "ground_truth",
                    recognise=_GROUND_TRUTH,
                    required=True,
                    official="ISIC_2020_Training_GroundTruth_v2.csv",
                    columns=GROUND_TRUTH_COLUMNS,
                    values=_values,
                ),
                _duplicates_role(),
            ),
            read=_read,
            refine=_drop_duplicates,
            images=ImageSource(folder="train"),
            typical=TypicalLabels("0", "1", "unknown", "melanoma"),
        ),
        Variant(
            name="isic2020_dicom",  # the Kaggle copy: train.csv + train/*.dcm
            roles=(
                Role(
                    "ground_truth",
                    recognise=_GROUND_TRUTH,
                    required=True,
                    official="train.csv",
                    columns=KAGGLE_COLUMNS,
                    values=_values,
                ),
                # Not in the Kaggle copy; read when the user adds the challenge's list.
                _duplicates_role(),
            ),
            read=_read,
            refine=_drop_duplicates,
            images=ImageSource(kind="dicom", folder="train"),
            typical=TypicalLabels("0", "1", "unknown", "melanoma"),
            synth=True,
            extras=_sample_submission,
        ),
    ),
    submission=SUBMISSION,
    ids=("patient", "lesion"),
    synth=SynthSpec(
        diagnoses=(
            dx("unknown", BENIGN, 0.80, ("NV", 0.85), ("LENTIGO", 0.1), ("BKL", 0.05)),
            dx("nevus", BENIGN, 0.15, "NV"),
            dx("seborrheic keratosis", BENIGN, 0.025, "BKL"),
            dx("lentigo NOS", BENIGN, 0.01, "LENTIGO"),
            dx("lichenoid keratosis", BENIGN, 0.01, "BKL"),
            dx("solar lentigo", BENIGN, 0.003, "LENTIGO"),
            dx("cafe-au-lait macule", BENIGN, 0.001, "LENTIGO"),
            dx("atypical melanocytic proliferation", BENIGN, 0.001, "ATYP"),
            dx("melanoma", MALIGNANT, 1.0, "MEL"),
        ),
        label=label_is_target,
        ids="sparse",
        duplicate_share=0.015,  # the real 425 pairs are 1.3 % of 33126 images
        sites=(
            "torso",
            "lower extremity",
            "upper extremity",
            "head/neck",
            "palms/soles",
            "oral/genital",
        ),
        site_p=(0.5, 0.25, 0.15, 0.06, 0.03, 0.01),
        blanks=(("age_approx", 0.01), ("sex", 0.01), ("site", 0.02)),
        decimal_ages=True,
    ),
)
