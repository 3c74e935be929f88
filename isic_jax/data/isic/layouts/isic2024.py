"""ISIC 2024 (SLICE-3D, Kaggle): tiles of total-body photographs in one HDF5 file (or as image
files), and a 55-column metadata CSV with a binary `target`."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

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
    INDETERMINATE,
    MALIGNANT,
    Drawn,
    SynthSpec,
    dx,
    label_is_target,
)

# The 55 columns of the ISIC 2024 Kaggle train-metadata.csv, in file order.
METADATA_COLUMNS: list[str] = [
    "isic_id", "target", "patient_id", "age_approx", "sex", "anatom_site_general",
    "clin_size_long_diam_mm", "image_type", "tbp_tile_type", "tbp_lv_A", "tbp_lv_Aext",
    "tbp_lv_B", "tbp_lv_Bext", "tbp_lv_C", "tbp_lv_Cext", "tbp_lv_H", "tbp_lv_Hext", "tbp_lv_L",
    "tbp_lv_Lext", "tbp_lv_areaMM2", "tbp_lv_area_perim_ratio", "tbp_lv_color_std_mean",
    "tbp_lv_deltaA", "tbp_lv_deltaB", "tbp_lv_deltaL", "tbp_lv_deltaLB", "tbp_lv_deltaLBnorm",
    "tbp_lv_eccentricity", "tbp_lv_location", "tbp_lv_location_simple", "tbp_lv_minorAxisMM",
    "tbp_lv_nevi_confidence", "tbp_lv_norm_border", "tbp_lv_norm_color", "tbp_lv_perimeterMM",
    "tbp_lv_radial_color_std_max", "tbp_lv_stdL", "tbp_lv_stdLExt", "tbp_lv_symm_2axis",
    "tbp_lv_symm_2axis_angle", "tbp_lv_x", "tbp_lv_y", "tbp_lv_z", "attribution",
    "copyright_license", "lesion_id", "iddx_full", "iddx_1", "iddx_2", "iddx_3", "iddx_4",
    "iddx_5", "mel_mitotic_index", "mel_thick_mm", "tbp_lv_dnn_lesion_confidence",
]  # fmt: skip


# Stored per image (the `tabular` / `tabular_text` features): the lesion measurements of the
# TBP lesion visualizer and the clinical size. Not stored: the diagnoses (iddx_*) and what only a
# histopathology report gives (mel_mitotic_index, mel_thick_mm): they are the label.
TABULAR_TEXT: tuple[str, ...] = ("tbp_tile_type", "tbp_lv_location", "tbp_lv_location_simple")
TABULAR: tuple[str, ...] = ("clin_size_long_diam_mm", *(
    c for c in METADATA_COLUMNS if c.startswith("tbp_lv_") and c not in TABULAR_TEXT
))  # fmt: skip


def _read(inputs: Inputs) -> Iterator[R.Row | R.Skip]:
    rel = inputs.files["metadata"]
    for line, row in R.dict_rows(inputs.path("metadata")):
        image_id = row.get("isic_id", "")
        raw = row.get("target", "")
        label = L.parse_binary(raw)
        if label is None:
            yield R.Skip(image_id, f"unknown label value target={raw!r} ({rel} row {line})")
            continue
        # iddx_1..5: the Archive's hierarchical taxonomy; iddx_full repeats them joined by "::".
        levels = [row.get(f"iddx_{i}") for i in range(1, 6)]
        if L.is_missing(levels[0]):
            levels = (row.get("iddx_full") or "").split("::")
        diagnosis = L.taxonomy_class(levels)
        yield R.Row(
            image_id, f"{rel} row {line}", label, diagnosis, **R.archive_fields(row),
            **R.extra_fields(row, TABULAR, TABULAR_TEXT),
        )  # fmt: skip


def _values(r: MetadataRow) -> dict[str, str]:
    parts = r.diagnosis.split("::") + [""] * 5
    return {
        "isic_id": r.image_id,
        "target": r.label,
        "patient_id": r.patient_id,
        "age_approx": r.age,
        "sex": r.sex,
        "anatom_site_general": r.site,
        "lesion_id": r.lesion_id,
        "iddx_full": r.diagnosis,
        **{f"iddx_{i}": parts[i - 1] for i in range(1, 6)},
    }


def _metadata(required: bool) -> Role:
    return Role(
        "metadata",
        recognise=Header(("isic_id", "target")),
        required=required,
        official="train-metadata.csv",
        columns=tuple(METADATA_COLUMNS),
        values=_values,
    )


# ----------------------------------------------------------------------------- synth

# tbp_lv_location -> (tbp_lv_location_simple, anatom_site_general)
_LOCATIONS: list[tuple[str, str, str]] = [
    ("Torso Back Top Third", "Torso Back", "posterior torso"),
    ("Torso Back Middle Third", "Torso Back", "posterior torso"),
    ("Torso Front Top Half", "Torso Front", "anterior torso"),
    ("Torso Front Bottom Half", "Torso Front", "anterior torso"),
    ("Left Leg - Lower", "Left Leg", "lower extremity"),
    ("Right Leg - Upper", "Right Leg", "lower extremity"),
    ("Left Arm - Upper", "Left Arm", "upper extremity"),
    ("Right Arm - Lower", "Right Arm", "upper extremity"),
    ("Head & Neck", "Head & Neck", "head/neck"),
]
_ATTRIBUTIONS = [
    ("Memorial Sloan Kettering Cancer Center", "CC-BY"),
    ("ACEMID MIA", "CC-0"),
    ("Frazer Institute, The University of Queensland, Dermatology Research Centre", "CC-BY"),
    ("FNQH Cairns", "CC-BY"),
    ("Department of Dermatology, Hospital Clínic de Barcelona", "CC-BY-NC"),
    ("University Hospital of Basel", "CC-BY-NC"),
    ("ViDIR Group, Department of Dermatology, Medical University of Vienna", "CC-BY-NC"),
]


def _per_patient(rng: np.random.Generator) -> dict[str, float]:
    """How one patient's lesions typically look in the TBP measurements (its skin, the usual
    size, colour and shape of its nevi): what the images of its lesions are drawn around."""
    u = rng.uniform
    return {
        "L": u(30, 55), "A": u(14, 30), "B": u(20, 36),  # lesion colour (CIELAB)
        "Lext": u(50, 75), "Aext": u(10, 24), "Bext": u(16, 30),  # the skin around it
        "diameter": u(2.0, 5.5), "eccentricity": u(0.45, 0.75), "color_std": u(0.4, 1.6),
        "norm_color": u(1.0, 4.5), "norm_border": u(2.0, 5.0), "deltaLBnorm": u(5.0, 9.0),
        "nevi_confidence": u(55, 95), "symm": u(0.2, 0.45),
    }  # fmt: skip


def _per_image(image: Drawn, rng: np.random.Generator) -> dict[str, str]:
    """The TBP lesion-visualizer columns of one tile, drawn around its patient's traits.

    The signal (images carry none of it, they are drawn apart): a malignant lesion is larger,
    more varied in colour, with a less regular border and lower nevus confidence than its
    patient's usual lesion (each shift smaller than the spread between patients), and its colour
    (L, A, B) departs from the patient's usual colour in a random direction, so that only a
    comparison with the same patient's other lesions shows it (the "ugly duckling"). Only biopsied
    (strongly labelled) lesions keep their lesion_id.
    """
    u, n = rng.uniform, rng.normal
    t = image.traits or _per_patient(rng)
    mal = image.dx.status == MALIGNANT
    loc, loc_simple, site = _LOCATIONS[int(rng.integers(0, len(_LOCATIONS)))]
    attribution, license_ = _ATTRIBUTIONS[int(rng.integers(0, len(_ATTRIBUTIONS)))]
    # The ugly duckling: a colour away from the patient's usual one (|offset| ~ 7.5), else close.
    direction = n(size=3)
    offset = direction / np.linalg.norm(direction) * u(6, 9) if mal else n(0, 2.0, 3)
    L, A, Bc = t["L"] + offset[0], t["A"] + offset[1], t["B"] + offset[2]
    Lext, Aext, Bext = t["Lext"] + n(0, 1.5), t["Aext"] + n(0, 1.0), t["Bext"] + n(0, 1.0)
    diameter = max(0.8, t["diameter"] * u(0.8, 1.2) + (u(0.5, 2.0) if mal else 0.0))
    ecc = float(np.clip(t["eccentricity"] + n(0, 0.08) + (0.04 if mal else 0.0), 0.05, 0.99))
    minor = diameter * math.sqrt(1 - ecc**2)
    area = math.pi / 4 * diameter * minor * u(0.9, 1.1)
    border = t["norm_border"] + n(0, 0.8) + (u(0.3, 1.5) if mal else 0.0)
    perim = math.sqrt(4 * math.pi * area) * (1 + 0.06 * border)
    colour_std = t["color_std"] + abs(n(0, 0.3)) + (u(0.2, 0.8) if mal else 0.0)
    norm_color = t["norm_color"] + n(0, 0.8) + (u(0.3, 1.5) if mal else 0.0)
    nevi = float(np.clip(t["nevi_confidence"] + n(0, 8) - (u(5, 20) if mal else 0), 0, 100))
    invasive = image.dx.name.endswith("Melanoma Invasive")
    values = {
        "clin_size_long_diam_mm": f"{diameter:.2f}",
        "image_type": "TBP tile: close-up",
        "tbp_tile_type": "3D: XP" if rng.random() < 0.6 else "3D: white",
        "tbp_lv_A": f"{A:.6g}", "tbp_lv_Aext": f"{Aext:.6g}",
        "tbp_lv_B": f"{Bc:.6g}", "tbp_lv_Bext": f"{Bext:.6g}",
        "tbp_lv_C": f"{math.hypot(A, Bc):.6g}", "tbp_lv_Cext": f"{math.hypot(Aext, Bext):.6g}",
        "tbp_lv_H": f"{math.degrees(math.atan2(Bc, A)):.6g}",
        "tbp_lv_Hext": f"{math.degrees(math.atan2(Bext, Aext)):.6g}",
        "tbp_lv_L": f"{L:.6g}", "tbp_lv_Lext": f"{Lext:.6g}",
        "tbp_lv_areaMM2": f"{area:.6g}", "tbp_lv_area_perim_ratio": f"{perim**2 / area:.6g}",
        "tbp_lv_color_std_mean": f"{colour_std:.6g}",
        "tbp_lv_deltaA": f"{A - Aext:.6g}", "tbp_lv_deltaB": f"{Bc - Bext:.6g}",
        "tbp_lv_deltaL": f"{L - Lext:.6g}",
        "tbp_lv_deltaLB": f"{math.hypot(L - Lext, Bc - Bext):.6g}",
        "tbp_lv_deltaLBnorm": f"{t['deltaLBnorm'] + n(0, 1.0) + (u(0.3, 1.5) if mal else 0):.6g}",
        "tbp_lv_eccentricity": f"{ecc:.6g}",
        "tbp_lv_location": loc, "tbp_lv_location_simple": loc_simple,
        "tbp_lv_minorAxisMM": f"{minor:.6g}",
        "tbp_lv_nevi_confidence": f"{nevi:.6g}",
        "tbp_lv_norm_border": f"{max(0.0, border):.6g}",
        "tbp_lv_norm_color": f"{max(0.0, norm_color):.6g}",
        "tbp_lv_perimeterMM": f"{perim:.6g}",
        "tbp_lv_radial_color_std_max": f"{colour_std * u(0.6, 1.0):.6g}",
        "tbp_lv_stdL": f"{u(0.5, 3) + (0.4 if mal else 0.0):.6g}",
        "tbp_lv_stdLExt": f"{u(0.5, 4):.6g}",
        "tbp_lv_symm_2axis": f"{t['symm'] + n(0, 0.06) + (0.05 if mal else 0.0):.6g}",
        "tbp_lv_symm_2axis_angle": str(int(rng.integers(0, 36)) * 5),
        "tbp_lv_x": f"{u(-200, 200):.6g}", "tbp_lv_y": f"{u(0, 1600):.6g}",
        "tbp_lv_z": f"{u(-150, 150):.6g}",
        "attribution": attribution, "copyright_license": license_,
        "mel_mitotic_index": str(rng.choice(["<1/mm^2", "1/mm^2", "2/mm^2"])) if invasive else "",
        "mel_thick_mm": f"{u(0.2, 1.5):.2f}" if invasive else "",
        "tbp_lv_dnn_lesion_confidence": f"{u(50, 100):.6g}",
        "site": site,
    }  # fmt: skip
    if image.dx.status == BENIGN and image.dx.name == "Benign" and rng.random() < 0.7:
        values["lesion_id"] = ""
    return values


RELEASE = Release(
    name="isic2024",
    classes=tuple(L.ARCHIVE_CLASSES),
    malignant=("MEL", "BCC", "SCC", "AK"),
    common={"other": "unknown"},
    expected=(
        "train-metadata.csv (isic_id,target,patient_id,...) + train-image.hdf5 (one dataset per "
        "isic_id holding JPEG bytes) or image files (train-image/image/)"
    ),
    citation="Kurtansky et al., The SLICE-3D dataset: 400,000 skin lesion image crops "
    "extracted from 3D TBP for skin cancer detection, Sci. Data 11, 884 (2024)",
    variants=(
        Variant(
            name="isic2024",
            roles=(
                _metadata(required=True),
                Role(
                    "hdf5",
                    kind="hdf5",
                    required=True,
                    official="train-image.hdf5",
                    near="metadata",
                    prefer="train-image",
                ),
            ),
            read=_read,
            images=ImageSource(kind="hdf5", role="hdf5"),
            typical=TypicalLabels(
                "0",
                "1",
                "Benign",
                "Malignant::Malignant melanocytic proliferations (Melanoma)::Melanoma Invasive",
            ),
        ),
        Variant(
            name="isic2024_files",  # Kaggle's train-image/image/ folder
            roles=(_metadata(required=True),),
            read=_read,
            images=ImageSource(folder="train-image/image"),
        ),
    ),
    ids=("patient", "lesion"),
    submission=("isic_id", "target"),
    tabular=TABULAR,
    tabular_text=TABULAR_TEXT,
    synth=SynthSpec(
        diagnoses=(
            dx("Benign", BENIGN, 0.90, ("NV", 0.8), ("LENTIGO", 0.1), ("BKL", 0.1)),
            dx("Benign::Benign melanocytic proliferations::Nevus", BENIGN, 0.05, "NV"),
            dx(
                "Benign::Benign epidermal proliferations::Seborrheic keratosis", BENIGN, 0.03, "BKL"
            ),
            dx("Benign::Benign epidermal proliferations::Solar lentigo", BENIGN, 0.02, "LENTIGO"),
            dx(
                "Malignant::Malignant adnexal epithelial proliferations - Follicular::"
                "Basal cell carcinoma",
                MALIGNANT,
                0.45,
                "BCC",
            ),
            dx(
                "Malignant::Malignant melanocytic proliferations (Melanoma)::Melanoma Invasive",
                MALIGNANT,
                0.20,
                "MEL",
            ),
            dx(
                "Malignant::Malignant melanocytic proliferations (Melanoma)::Melanoma in situ",
                MALIGNANT,
                0.15,
                "MEL",
            ),
            dx(
                "Malignant::Malignant epidermal proliferations::Squamous cell carcinoma in situ",
                MALIGNANT,
                0.20,
                "SCC",
            ),
            dx(
                "Indeterminate::Indeterminate epidermal proliferations::Solar or actinic keratosis",
                INDETERMINATE,
                0.5,
                "AK",
            ),
            dx(
                "Indeterminate::Indeterminate melanocytic proliferations::"
                "Atypical melanocytic neoplasm",
                INDETERMINATE,
                0.5,
                "ATYP",
            ),
        ),
        label=label_is_target,
        ids="sparse",
        tiles=True,
        jpeg_quality=85,
        # A placeholder site list: the TBP location sets each tile's site.
        sites=("x",),
        site_p=(1.0,),
        per_image=_per_image,
        per_patient=_per_patient,
        blanks=(("age_approx", 0.01), ("sex", 0.03), ("site", 0.02)),
        decimal_ages=True,
    ),
)
