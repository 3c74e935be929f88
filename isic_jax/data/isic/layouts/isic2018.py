"""ISIC 2018 Task 3 (HAM10000): a one-hot ground truth of 7 classes and lesion groupings; or the
HAM10000 metadata as the ground truth (Kaggle's copy, images in two folders)."""

from __future__ import annotations

from collections.abc import Iterator

from isic_jax.data.isic import labels as L
from isic_jax.data.isic.layouts import isic2019
from isic_jax.data.isic.layouts import rows as R
from isic_jax.data.isic.layouts.spec import (
    Header,
    ImageSource,
    Inputs,
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

CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
MALIGNANT_CLASSES = ("MEL", "BCC", "AKIEC")
IMAGE_DIR = "ISIC2018_Task3_Training_Input"
GROUND_TRUTH_DIR = "ISIC2018_Task3_Training_GroundTruth"
_HAM_DX = {"akiec": "AKIEC", "bcc": "BCC", "bkl": "BKL", "df": "DF", "mel": "MEL", "nv": "NV",
           "vasc": "VASC"}  # fmt: skip


def _ham10000(required: bool) -> Role:
    return Role(
        "ham10000",
        recognise=Header(("image_id", "lesion_id", "dx")),
        required=required,
        official="HAM10000_metadata.csv",
    )


def _read_task3(inputs: Inputs) -> Iterator[R.Row | R.Skip]:
    meta = R.metadata_by_id(inputs.path("ham10000"), "image_id")
    groupings = R.metadata_by_id(inputs.path("lesion_groupings"), "image")
    for image_id, row in groupings.items():
        meta.setdefault(image_id, {})["lesion_id"] = row.get("lesion_id", "")
    rel = inputs.files["ground_truth"]
    yield from R.one_hot_rows(inputs.path("ground_truth"), rel, CLASSES, MALIGNANT_CLASSES, meta)


def _read_ham10000(inputs: Inputs) -> Iterator[R.Row | R.Skip]:
    rel = inputs.files["ham10000"]
    for line, row in R.dict_rows(inputs.path("ham10000")):
        image_id = row.get("image_id", "")
        name = _HAM_DX.get(row.get("dx", "").lower())
        if name is None:
            yield R.Skip(image_id, f"unknown label value dx={row.get('dx')!r} ({rel} row {line})")
            continue
        yield R.Row(
            image_id,
            f"{rel} row {line}",
            int(name in MALIGNANT_CLASSES),
            name,
            lesion_id=L.parse_text(row.get("lesion_id")),
            age=L.parse_age(row.get("age")),
            sex=L.parse_sex(row.get("sex")),
            anatom_site=L.parse_site(row.get("localization")),
        )


RELEASE = Release(
    name="isic2018",
    classes=CLASSES,
    malignant=MALIGNANT_CLASSES,
    # AKIEC: actinic keratosis + intraepithelial carcinoma, 2019's AK.
    common={"AKIEC": "AK"},
    expected=(
        "ISIC2018_Task3_Training_GroundTruth.csv (image,MEL,NV,BCC,AKIEC,BKL,DF,VASC one-hot) or "
        "HAM10000_metadata.csv (lesion_id,image_id,dx,...) + images "
        "(ISIC2018_Task3_Training_Input/); optional ISIC2018_Task3_Training_LesionGroupings.csv "
        "(image,lesion_id,...)"
    ),
    citation="Codella et al., arXiv:1902.03368; Tschandl et al., The HAM10000 dataset, "
    "Sci. Data 5, 180161 (2018)",
    variants=(
        Variant(
            name="isic2018",
            roles=(
                Role(
                    "ground_truth",
                    # A 2019 ground truth has these columns and more.
                    recognise=Header(("image", *CLASSES), unless=(isic2019.CLASSES,)),
                    required=True,
                    official=f"{GROUND_TRUTH_DIR}/ISIC2018_Task3_Training_GroundTruth.csv",
                    columns=("image", *CLASSES),
                    values=lambda r: {"image": r.image_id, **R.one_hot_values(CLASSES, r.label)},
                ),
                Role(
                    "lesion_groupings",
                    # ISIC 2019's metadata also has image and lesion_id.
                    recognise=Header(("image", "lesion_id"), unless=(("age_approx",),)),
                    official="ISIC2018_Task3_Training_LesionGroupings.csv",
                    columns=("image", "lesion_id", "diagnosis_confirm_type"),
                    values=lambda r: {"image": r.image_id, "lesion_id": r.lesion_id},
                ),
                _ham10000(required=False),
            ),
            read=_read_task3,
            images=ImageSource(folder=IMAGE_DIR),
            typical=TypicalLabels("NV", "MEL"),
        ),
        Variant(
            name="isic2018_ham10000",
            roles=(_ham10000(required=True),),
            read=_read_ham10000,
            images=ImageSource(folder="HAM10000_images_part_1"),
        ),
    ),
    ids=("lesion",),
    synth=SynthSpec(
        # HAM10000 shares (Tschandl et al. 2018).
        diagnoses=(
            dx("MEL", MALIGNANT, 0.57, "MEL"),
            dx("NV", BENIGN, 0.83, "NV"),
            dx("BCC", MALIGNANT, 0.26, "BCC"),
            dx("AKIEC", MALIGNANT, 0.17, "AK"),
            dx("BKL", BENIGN, 0.136, "BKL"),
            dx("DF", BENIGN, 0.016, "DF"),
            dx("VASC", BENIGN, 0.018, "VASC"),
        ),
        label=label_is_name,
        every_class=True,
        ids="consecutive",  # HAM10000 ids run from ISIC_0024306
        first_id=24306,
        lesion_prefix="HAM",
        per_image=confirm_type,
        licence_folders=(IMAGE_DIR, GROUND_TRUTH_DIR),
    ),
)
