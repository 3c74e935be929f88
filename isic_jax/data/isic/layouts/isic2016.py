"""ISIC 2016 (ISBI 2016 Part 3): a headerless 2-column ground truth, benign|malignant."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from isic_jax.data.isic import labels as L
from isic_jax.data.isic.layouts import rows as R
from isic_jax.data.isic.layouts.spec import (
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


def _is_row(row: Sequence[str]) -> bool:
    return (
        len(row) == 2 and row[0].strip().startswith("ISIC_") and L.parse_binary(row[1]) is not None
    )


def _recognise(head: Sequence[Sequence[str]]) -> bool:
    """`ISIC_xxxxxxx,benign|malignant|0|1` rows, maybe under a 2-column header."""
    if not head:
        return False
    return _is_row(head[0]) or (len(head) > 1 and len(head[0]) == 2 and _is_row(head[1]))


def _read(inputs: Inputs) -> Iterator[R.Row | R.Skip]:
    rel = inputs.files["ground_truth"]
    for line, (_, row) in enumerate(R.csv_rows(inputs.path("ground_truth")), start=1):
        if len(row) < 2:
            yield R.Skip(f"{rel} row {line}", "malformed row (expected image,label)")
            continue
        image_id, raw = row[0].strip(), row[1].strip()
        if line == 1 and not image_id.startswith("ISIC_") and L.parse_binary(raw) is None:
            continue  # a header
        label = L.parse_binary(raw)
        if label is None:
            yield R.Skip(image_id, f"unknown label value {raw!r} ({rel} row {line})")
            continue
        yield R.Row(image_id, f"{rel} row {line}", label, L.LABEL_NAMES[label])


def _values(r: MetadataRow) -> dict[str, str]:
    return {"image": r.image_id, "label": r.label}


RELEASE = Release(
    name="isic2016",
    classes=("benign", "malignant"),
    malignant=("malignant",),
    # ISBI 2016 Part 3 is melanoma vs the rest: its benign images have no diagnosis.
    common={"benign": "unknown", "malignant": "MEL"},
    expected=(
        "ISBI2016_ISIC_Part3_Training_GroundTruth.csv (2 columns, no header: "
        "ISIC_xxxxxxx,benign|malignant|0|1) + images (ISBI2016_ISIC_Part3_Training_Data/)"
    ),
    citation="Gutman et al., Skin Lesion Analysis toward Melanoma Detection: ISBI 2016, "
    "arXiv:1605.01397",
    variants=(
        Variant(
            name="isic2016",
            roles=(
                Role(
                    "ground_truth",
                    recognise=_recognise,
                    required=True,
                    official="ISBI2016_ISIC_Part3_Training_GroundTruth.csv",
                    columns=("image", "label"),
                    header=False,
                    values=_values,
                ),
            ),
            read=_read,
            images=ImageSource(folder="ISBI2016_ISIC_Part3_Training_Data"),
            typical=TypicalLabels("benign", "malignant"),
        ),
    ),
    synth=SynthSpec(
        diagnoses=(
            dx("benign", BENIGN, 1.0, ("NV", 0.8), ("BKL", 0.1), ("LENTIGO", 0.1)),
            dx("malignant", MALIGNANT, 1.0, "MEL"),
        ),
        label=label_is_name,
        per_image=confirm_type,
    ),
)
