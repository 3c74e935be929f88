"""Release names, class lists and the parsing of metadata values (no TFDS, no images).

Every release gets a binary label (0 benign, 1 malignant) and a `diagnosis` index into
`DIAGNOSIS_CLASSES[release]`. The releases, their classes and which of them are malignant are
the entries of the release table (`isic_jax.data.isic.layouts`); `RELEASES`, `DIAGNOSIS_CLASSES`
and `MALIGNANT_DIAGNOSES` here are views of it, built on first use so that importing this module
stays light. Malignancy policy for the multi-class releases: melanoma, basal cell carcinoma,
squamous cell carcinoma and actinic keratosis (AK, and AKIEC in 2018, which also holds
intraepithelial carcinoma / Bowen's disease) count as malignant.

Releases drawn from the ISIC Archive's free-text diagnoses (`archive`, `isic2020`, `isic2024`) share
one coarse taxonomy (`ARCHIVE_CLASSES`, the ISIC 2019 classes plus `unknown` and `other`); their
binary label comes from the release's own benign/malignant field, not from the diagnosis text.
"""

from __future__ import annotations

import math
import re
from typing import Any

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

# The common taxonomy of several releases trained together (`config.data.release =
# "isic2019+isic2020"`): the ISIC 2019 training classes plus "unknown" (no or an unmatched
# diagnosis), as the SIIM-ISIC 2020 winners mapped 2018-2020 onto one target. Each release entry
# maps its own classes onto these (`Release.common`).
COMMON_CLASSES: list[str] = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "unknown"]
COMMON_MALIGNANT: list[str] = ["MEL", "BCC", "AK", "SCC"]

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


def parse_float(value: object) -> float:
    """A measurement (e.g. `tbp_lv_areaMM2`); NaN when missing, not a number or not finite."""
    if is_missing(value):
        return math.nan
    try:
        number = float(str(value).strip())
    except ValueError:
        return math.nan
    return number if math.isfinite(number) else math.nan


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


def release_parts(release: str) -> list[str]:
    """The releases of `config.data.release`: "isic2019+isic2020" -> ["isic2019", "isic2020"]."""
    return [part.strip() for part in str(release).split("+")]


def diagnosis_classes(release: str) -> list[str]:
    """The `diagnosis` classes of a release, or of several trained together ("a+b": the common
    taxonomy, COMMON_CLASSES)."""
    parts = release_parts(release)
    return list(COMMON_CLASSES) if len(parts) > 1 else list(_table("DIAGNOSIS_CLASSES")[parts[0]])


def malignant_diagnoses(release: str) -> list[str]:
    """The malignant `diagnosis` classes of a release, or of several trained together."""
    parts = release_parts(release)
    if len(parts) > 1:
        return list(COMMON_MALIGNANT)
    return list(_table("MALIGNANT_DIAGNOSES")[parts[0]])


def _table(name: str) -> Any:
    """A table read from the release entries (module `__getattr__` is not used for globals)."""
    return globals()[name] if name in globals() else __getattr__(name)


_FROM_ENTRIES = ("RELEASES", "DIAGNOSIS_CLASSES", "MALIGNANT_DIAGNOSES")


def __getattr__(name: str) -> Any:
    """RELEASES (tuple of names), DIAGNOSIS_CLASSES and MALIGNANT_DIAGNOSES (name -> list of
    class names), read from the release table on first use."""
    if name not in _FROM_ENTRIES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # The entries import this module (for the parsers above), so they are read late; once read,
    # the tables are plain module attributes.
    from isic_jax.data.isic.layouts import RELEASES as entries

    globals().update(
        RELEASES=tuple(entries),
        DIAGNOSIS_CLASSES={n: list(r.classes) for n, r in entries.items()},
        MALIGNANT_DIAGNOSES={n: list(r.malignant) for n, r in entries.items()},
    )
    return globals()[name]
