"""Release names, class lists and the parsing of metadata values (no TFDS, no images).

Every release gets a binary label (0 benign, 1 malignant) and a `diagnosis` index into
`DIAGNOSIS_CLASSES[release]`. Malignancy policy for the multi-class releases: melanoma, basal cell
carcinoma, squamous cell carcinoma and actinic keratosis (AK, and AKIEC in 2018, which also holds
intraepithelial carcinoma / Bowen's disease) count as malignant (`MALIGNANT_DIAGNOSES`).

Releases drawn from the ISIC Archive's free-text diagnoses (`archive`, `isic2020`, `isic2024`) share
one coarse taxonomy (`ARCHIVE_CLASSES`, the ISIC 2019 classes plus `unknown` and `other`); their
binary label comes from the release's own benign/malignant field, not from the diagnosis text.
"""

from __future__ import annotations

import math
import re

RELEASES: tuple[str, ...] = (
    "archive",
    "isic2016",
    "isic2017",
    "isic2018",
    "isic2019",
    "isic2020",
    "isic2024",
)

LABEL_NAMES: list[str] = ["benign", "malignant"]
SEX_NAMES: list[str] = ["unknown", "female", "male"]
UNKNOWN_SITE = "unknown"

# Coarse classes for the releases that carry ISIC Archive free-text diagnoses.
ARCHIVE_CLASSES: list[str] = [
    "unknown",
    "MEL",
    "NV",
    "BCC",
    "SCC",
    "AK",
    "BKL",
    "DF",
    "VASC",
    "other",
]

DIAGNOSIS_CLASSES: dict[str, list[str]] = {
    "archive": ARCHIVE_CLASSES,
    "isic2016": ["benign", "malignant"],
    "isic2017": ["nevus", "melanoma", "seborrheic_keratosis"],
    "isic2018": ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"],
    # The ground truth also has UNK, which only the test set uses: a training row labelled UNK has
    # no benign/malignant label and is skipped.
    "isic2019": ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"],
    "isic2020": ARCHIVE_CLASSES,
    "isic2024": ARCHIVE_CLASSES,
}

MALIGNANT_DIAGNOSES: dict[str, list[str]] = {
    "archive": ["MEL", "BCC", "SCC", "AK"],
    "isic2016": ["malignant"],
    "isic2017": ["melanoma"],
    "isic2018": ["MEL", "BCC", "AKIEC"],
    "isic2019": ["MEL", "BCC", "AK", "SCC"],
    "isic2020": ["MEL", "BCC", "SCC", "AK"],
    "isic2024": ["MEL", "BCC", "SCC", "AK"],
}

# Keyword rules for ARCHIVE_CLASSES, tried in order on the lower-cased text (first match wins).
# Covers the legacy `diagnosis` values ("nevus", "lentigo NOS", "angioma", ...) and the current
# hierarchical taxonomy ("Melanoma Invasive", "Solar or actinic keratosis", "Hemangioma", ...).
_ARCHIVE_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("MEL", ("melanoma", "lentigo maligna")),
    ("BCC", ("basal cell carcinoma", "basal cell")),
    ("SCC", ("squamous cell carcinoma", "bowen", "keratoacanthoma")),
    ("AK", ("actinic keratosis", "solar keratosis", "akiec")),
    (
        "BKL",
        (
            "seborrheic keratosis",
            "seborrhoeic keratosis",
            "lentigo",
            "lichenoid keratosis",
            "lichen planus like keratosis",
            "pigmented benign keratosis",
            "benign keratosis",
        ),
    ),
    ("NV", ("nevus", "naevus", "nevi")),
    ("DF", ("dermatofibroma",)),
    (
        "VASC",
        ("vascular", "angioma", "angiokeratoma", "pyogenic granuloma", "hemorrhage"),
    ),
)

_MISSING = {"", "nan", "none", "null", "unknown", "na", "n/a", "not given", "?"}


def is_missing(value: object) -> bool:
    """True for None, NaN and the spellings of "no value" seen in ISIC metadata."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return str(value).strip().lower() in _MISSING


def archive_class(*texts: object) -> str:
    """Maps free-text diagnoses (most specific first) to a name in `ARCHIVE_CLASSES`.

    Each text is tried in turn; the first one that matches a keyword rule wins. Texts that are all
    missing give "unknown"; present but unmatched texts give "other".
    """
    present = [str(t).strip().lower() for t in texts if not is_missing(t)]
    for text in present:
        for name, keywords in _ARCHIVE_RULES:
            if any(k in text for k in keywords):
                return name
    return "other" if present else "unknown"


def parse_age(value: object) -> int:
    """Approximate age in years, or -1 when missing or implausible (outside 0..120)."""
    if is_missing(value):
        return -1
    try:
        age = float(str(value).strip())
    except ValueError:
        return -1
    if math.isnan(age) or not 0 <= age <= 120:
        return -1
    return int(round(age))


def parse_sex(value: object) -> str:
    """One of SEX_NAMES ("unknown" when missing or unrecognised)."""
    text = "" if is_missing(value) else str(value).strip().lower()
    if text in ("female", "f", "woman"):
        return "female"
    if text in ("male", "m", "man"):
        return "male"
    return "unknown"


def parse_site(value: object) -> str:
    """Anatomical site, lower-cased with single spaces; "unknown" when missing."""
    if is_missing(value):
        return UNKNOWN_SITE
    return re.sub(r"\s+", " ", str(value).strip().lower().replace("_", " "))


def parse_text(value: object) -> str:
    """A free identifier (patient or lesion id); "" when missing."""
    return "" if is_missing(value) else str(value).strip()


def parse_binary(value: object) -> int | None:
    """0/1 from "0", "1", "0.0", "1.0", "benign", "malignant"; None for anything else."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("benign", "0", "0.0", "false"):
        return 0
    if text in ("malignant", "1", "1.0", "true"):
        return 1
    return None
