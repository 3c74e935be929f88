"""The ISIC Archive: an `isic image download` export (isic-cli's metadata.csv), or the older
per-image JSON records."""

from __future__ import annotations

import json
import pathlib
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

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
    CONFIRM_TYPES,
    INDETERMINATE,
    MALIGNANT,
    Drawn,
    SynthSpec,
    dx,
    label_is_status,
)

if TYPE_CHECKING:
    import numpy as np

INDETERMINATE_POLICIES = ("skip", "benign", "malignant")

# isic-cli writes isic_id, attribution, copyright_license, then the union of the records'
# acquisition and clinical fields, sorted (isic-cli's `_extract_metadata`).
METADATA_FIELDS: list[str] = sorted(
    [
        "age_approx", "anatom_site_general", "clin_size_long_diam_mm", "concomitant_biopsy",
        "dermoscopic_type", "diagnosis_1", "diagnosis_2", "diagnosis_3", "diagnosis_4",
        "diagnosis_5", "diagnosis_confirm_type", "image_type", "lesion_id", "melanocytic",
        "patient_id", "pixels_x", "pixels_y", "sex",
    ]
)  # fmt: skip
COLUMNS: list[str] = ["isic_id", "attribution", "copyright_license", *METADATA_FIELDS]


def _label(value: object, indeterminate: str) -> tuple[int | None, str]:
    """Binary label from diagnosis_1 / benign_malignant, applying the Indeterminate policy."""
    if L.is_missing(value):
        return None, "no benign/malignant label (diagnosis_1 / benign_malignant empty)"
    text = str(value).strip().lower()
    if text in ("benign", "malignant"):
        return L.LABEL_NAMES.index(text), ""
    if text.startswith("indeterminate"):
        if indeterminate == "skip":
            return None, (
                f"indeterminate diagnosis {str(value)!r} (policy: skip; "
                "--indeterminate=benign|malignant keeps it)"
            )
        return L.LABEL_NAMES.index(indeterminate), ""
    return None, f"unknown label value {str(value)!r}"


def _read_csv(inputs: Inputs) -> Iterator[R.Row | R.Skip]:
    rel = inputs.files["metadata"]
    for line, row in R.dict_rows(inputs.path("metadata")):
        image_id = row.get("isic_id", "")
        where = f"{rel} row {line}"
        raw = row.get("diagnosis_1") or row.get("benign_malignant")
        label, why = _label(raw, inputs.indeterminate)
        if label is None:
            yield R.Skip(image_id, f"{why} ({where})")
            continue
        diagnosis = L.taxonomy_class(
            [row.get(f"diagnosis_{i}") for i in range(1, 6)], row.get("diagnosis")
        )
        yield R.Row(
            image_id, where, label, diagnosis, **R.archive_fields(row),
            **R.extra_fields(row),
        )  # fmt: skip


def _read_json(inputs: Inputs) -> Iterator[R.Row | R.Skip]:
    tree, wanted = inputs.tree, set(inputs.record_dirs)
    for rel in tree.with_suffix(".json"):
        if R.folder(rel) not in wanted:
            continue
        try:
            with open(tree.abspath(rel), encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError) as exc:
            yield R.Skip(rel, f"invalid metadata record ({type(exc).__name__}: {exc})")
            continue
        if not isinstance(record, dict) or not isinstance(record.get("meta"), dict):
            yield R.Skip(rel, "not an ISIC metadata record (no 'meta' object)")
            continue
        image_id = str(record.get("name") or record.get("isic_id") or R.stem(rel))
        meta = record["meta"]
        clinical = meta.get("clinical") if isinstance(meta.get("clinical"), dict) else {}
        label, why = _label(clinical.get("benign_malignant"), inputs.indeterminate)
        if label is None:
            yield R.Skip(image_id, f"{why} ({rel})")
            continue
        yield R.Row(
            image_id,
            rel,
            label,
            L.archive_class(clinical.get("diagnosis")),
            patient_id=L.parse_text(clinical.get("patient_id", meta.get("patient_id"))),
            lesion_id=L.parse_text(clinical.get("lesion_id", meta.get("lesion_id"))),
            age=L.parse_age(clinical.get("age_approx")),
            sex=L.parse_sex(clinical.get("sex")),
            anatom_site=L.parse_site(clinical.get("anatom_site_general")),
            **R.extra_fields({**clinical, **record}),
        )


def _csv_values(r: MetadataRow) -> dict[str, str]:
    return {
        "isic_id": r.image_id,
        "age_approx": r.age,
        "anatom_site_general": r.site,
        "diagnosis_1": r.label,
        "diagnosis_3": r.diagnosis,
        "lesion_id": r.lesion_id,
        "patient_id": r.patient_id,
        "sex": r.sex,
    }


def _json_record(r: MetadataRow) -> dict:
    clinical = {
        "benign_malignant": r.label,
        "age_approx": int(r.age) if r.age else None,
        "sex": r.sex or None,
        "diagnosis": r.diagnosis or None,
    }
    return {
        "_id": "0" * 24,
        "name": r.image_id,
        "meta": {"clinical": clinical, "acquisition": {"image_type": "dermoscopic"}},
    }


# ----------------------------------------------------------------------------- synth

# diagnosis_3 value -> diagnosis_2 of the ISIC hierarchical taxonomy (diagnosis_1 is the status).
_TAXONOMY: dict[str, str] = {
    "Nevus": "Benign melanocytic proliferations",
    "Seborrheic keratosis": "Benign epidermal proliferations",
    "Solar lentigo": "Benign epidermal proliferations",
    "Dermatofibroma": "Benign soft tissue proliferations - Fibro-histiocytic",
    "Hemangioma": "Benign soft tissue proliferations - Vascular",
    "Melanoma Invasive": "Malignant melanocytic proliferations (Melanoma)",
    "Melanoma in situ": "Malignant melanocytic proliferations (Melanoma)",
    "Basal cell carcinoma": "Malignant adnexal epithelial proliferations - Follicular",
    "Squamous cell carcinoma, Invasive": "Malignant epidermal proliferations",
    "Atypical melanocytic neoplasm": "Indeterminate melanocytic proliferations",
    "Solar or actinic keratosis": "Indeterminate epidermal proliferations",
}
_ATTRIBUTIONS = [
    ("Memorial Sloan Kettering Cancer Center", "CC-BY"),
    ("Department of Dermatology, Hospital Clínic de Barcelona", "CC-BY-NC"),
    ("ViDIR Group, Department of Dermatology, Medical University of Vienna", "CC-BY-NC"),
    ("Anonymous", "CC-0"),
]
_MELANOCYTIC_STYLES = {"NV", "MEL", "ATYP"}


def _per_image(image: Drawn, rng: np.random.Generator) -> dict[str, str]:
    attribution, license_ = _ATTRIBUTIONS[int(rng.integers(0, len(_ATTRIBUTIONS)))]
    values = {
        "attribution": attribution,
        "copyright_license": license_,
        "clin_size_long_diam_mm": f"{rng.uniform(2, 15):.1f}" if rng.random() < 0.4 else "",
        "dermoscopic_type": str(rng.choice(["contact polarized", "contact non-polarized", ""])),
        "diagnosis_confirm_type": (
            "histopathology" if image.dx.status != BENIGN else str(rng.choice(CONFIRM_TYPES))
        ),
        "melanocytic": "True" if image.style in _MELANOCYTIC_STYLES else "False",
        "concomitant_biopsy": "True" if image.dx.status == MALIGNANT else "False",
        "diagnosis_2": _TAXONOMY[image.dx.name],
        "image_type": "dermoscopic",
        "pixels_x": str(image.w),
        "pixels_y": str(image.h),
    }
    if image.dx.name == "Nevus" and rng.random() < 0.1:  # some records carry only diagnosis_1
        values.update(diagnosis_2="", diagnosis_3="")
    return values


def _attribution_files(out: pathlib.Path, rows: Sequence[MetadataRow]) -> list[str]:
    """isic-cli's attribution.txt (most frequent first, Anonymous last) and licenses/."""
    counts = Counter(r.columns["attribution"] for r in rows)
    attributions = sorted(counts.items(), key=lambda kv: (kv[0] == "Anonymous", -kv[1], kv[0]))
    (out / "attribution.txt").write_text("\n\n".join(a for a, _ in attributions), encoding="utf8")
    for license_ in sorted({r.columns["copyright_license"] for r in rows}):
        path = out / "licenses" / f"{license_}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{license_} (synthetic placeholder licence text)\n", encoding="utf8")
    return ["attribution.txt", "licenses/"]


_SYNTH = SynthSpec(
    diagnoses=(
        dx("Nevus", BENIGN, 0.70, "NV"),
        dx("Seborrheic keratosis", BENIGN, 0.14, "BKL"),
        dx("Solar lentigo", BENIGN, 0.08, "LENTIGO"),
        dx("Dermatofibroma", BENIGN, 0.04, "DF"),
        dx("Hemangioma", BENIGN, 0.04, "VASC"),
        dx("Melanoma Invasive", MALIGNANT, 0.35, "MEL"),
        dx("Melanoma in situ", MALIGNANT, 0.20, "MEL"),
        dx("Basal cell carcinoma", MALIGNANT, 0.30, "BCC"),
        dx("Squamous cell carcinoma, Invasive", MALIGNANT, 0.15, "SCC"),
        dx("Atypical melanocytic neoplasm", INDETERMINATE, 0.6, "ATYP"),
        dx("Solar or actinic keratosis", INDETERMINATE, 0.4, "AK"),
    ),
    label=label_is_status,
    every_class=True,
    per_image=_per_image,
    blanks=(
        ("age_approx", 0.05),
        ("sex", 0.05),
        ("site", 0.08),
        ("patient_id", 0.08),
        ("lesion_id", 0.05),
    ),
    extra_files=_attribution_files,
)

RELEASE = Release(
    name="archive",
    classes=tuple(L.ARCHIVE_CLASSES),
    malignant=("MEL", "BCC", "SCC", "AK"),
    common={"other": "unknown"},
    expected=(
        "`isic image download` export: metadata.csv with columns isic_id + diagnosis_1 (or "
        "benign_malignant), images <isic_id>.jpg|.png; or legacy per-image JSON records "
        "<isic_id>.json (meta.clinical.benign_malignant, diagnosis) next to <isic_id>.jpg"
    ),
    citation="ISIC Archive, https://www.isic-archive.com (attribution per image in the metadata)",
    variants=(
        Variant(
            name="archive",
            roles=(
                Role(
                    "metadata",
                    recognise=Header(
                        ("isic_id",),
                        any_of=("diagnosis_1", "benign_malignant"),
                        unless=(("target",),),  # ISIC 2024's train-metadata.csv
                    ),
                    required=True,
                    official="metadata.csv",
                    columns=tuple(COLUMNS),
                    line_end="\r\n",  # csv.DictWriter's default, as in the isic-cli file
                    values=_csv_values,
                ),
            ),
            read=_read_csv,
            typical=TypicalLabels("Benign", "Malignant", "Nevus", "Melanoma Invasive"),
        ),
        Variant(
            name="archive_json",
            roles=(Role("records", kind="json", required=True, values=_json_record),),
            read=_read_json,
            images=ImageSource(beside_records=True),
            # A legacy-JSON archive folder may sit next to a challenge release: that one wins.
            weak=True,
            typical=TypicalLabels("benign", "malignant", "nevus", "melanoma"),
        ),
    ),
    ids=("patient", "lesion"),
    synth=_SYNTH,
)
