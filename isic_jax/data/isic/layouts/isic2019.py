"""ISIC 2019: a one-hot ground truth of 8 classes (+ UNK, test set only) and a metadata CSV."""

from __future__ import annotations

from collections.abc import Iterator

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

# The ground truth also has UNK, which only the test set uses: a training row labelled UNK has
# no benign/malignant label and is skipped; a ground truth without the column is read as well.
CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
MALIGNANT_CLASSES = ("MEL", "BCC", "AK", "SCC")
_ONE_HOT = (*CLASSES, "UNK")
IMAGE_DIR = "ISIC_2019_Training_Input"


def _read(inputs: Inputs) -> Iterator[R.Row | R.Skip]:
    meta = R.metadata_by_id(inputs.path("metadata"), "image")
    rel = inputs.files["ground_truth"]
    yield from R.one_hot_rows(
        inputs.path("ground_truth"), rel, CLASSES, MALIGNANT_CLASSES, meta, unknown_column="unk"
    )


RELEASE = Release(
    name="isic2019",
    classes=CLASSES,
    malignant=MALIGNANT_CLASSES,
    expected=(
        "ISIC_2019_Training_GroundTruth.csv (image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK one-hot) + "
        "images (ISIC_2019_Training_Input/); optional ISIC_2019_Training_Metadata.csv "
        "(image,age_approx,anatom_site_general,lesion_id,sex)"
    ),
    citation="Tschandl et al. (2018) arXiv:1803.10417; Codella et al. (2017) arXiv:1710.05006; "
    "Combalia et al. (2019) arXiv:1908.02288",
    variants=(
        Variant(
            name="isic2019",
            roles=(
                Role(
                    "ground_truth",
                    recognise=Header(("image", *CLASSES)),
                    required=True,
                    official="ISIC_2019_Training_GroundTruth.csv",
                    columns=("image", *_ONE_HOT),
                    values=lambda r: {"image": r.image_id, **R.one_hot_values(_ONE_HOT, r.label)},
                ),
                Role(
                    "metadata",
                    recognise=Header(("image", "age_approx", "sex")),
                    official="ISIC_2019_Training_Metadata.csv",
                    columns=("image", "age_approx", "anatom_site_general", "lesion_id", "sex"),
                    values=lambda r: {
                        "image": r.image_id,
                        "age_approx": r.age,
                        "anatom_site_general": r.site,
                        "lesion_id": r.lesion_id,
                        "sex": r.sex,
                    },
                ),
            ),
            read=_read,
            images=ImageSource(folder=IMAGE_DIR),
            typical=TypicalLabels("NV", "MEL"),
        ),
    ),
    ids=("lesion",),
    submission=("image", *_ONE_HOT),
    synth=SynthSpec(
        # ISIC 2019 training shares; AK counted malignant like 2018's AKIEC. UNK: test set only.
        diagnoses=(
            dx("MEL", MALIGNANT, 0.48, "MEL"),
            dx("NV", BENIGN, 0.80, "NV"),
            dx("BCC", MALIGNANT, 0.36, "BCC"),
            dx("AK", MALIGNANT, 0.09, "AK"),
            dx("BKL", BENIGN, 0.165, "BKL"),
            dx("DF", BENIGN, 0.016, "DF"),
            dx("VASC", BENIGN, 0.019, "VASC"),
            dx("SCC", MALIGNANT, 0.07, "SCC"),
        ),
        label=label_is_name,
        every_class=True,
        id_suffix="_downsampled",  # a few real 2019 names carry it
        lesion_prefix="BCN",
        per_image=confirm_type,
        blanks=(("age_approx", 0.02), ("sex", 0.02), ("site", 0.08), ("lesion_id", 0.1)),
        decimal_ages=True,
        licence_folders=(IMAGE_DIR,),
    ),
)
