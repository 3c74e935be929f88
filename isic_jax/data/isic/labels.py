"""Release names, class lists and the parsing of metadata values (no TFDS, no images).

Every release gets a binary label (0 benign, 1 malignant) and a `diagnosis` index into
`DIAGNOSIS_CLASSES[release]`. The releases, their classes and which of them are malignant are
the entries of the release table (`isic_jax.data.isic.layouts`); `RELEASES`, `DIAGNOSIS_CLASSES`
and `MALIGNANT_DIAGNOSES` here are views of it, built on first use so that importing this module
stays light. Malignancy policy for the multi-class releases: melanoma, basal cell carcinoma,
squamous cell carcinoma and actinic keratosis (AK, and AKIEC in 2018, which also holds
intraepithelial carcinoma / Bowen's disease) count as malignant.

Releases drawn from the ISIC Archive's diagnoses (`archive`, `isic2020`, `isic2024`) share one
coarse taxonomy (`ARCHIVE_CLASSES`, the ISIC 2019 classes plus `unknown` and `other`): the
Archive's hierarchical diagnoses (`diagnosis_1..5`, ISIC 2024's `iddx_1..5`) map by their place
in the taxonomy (`taxonomy_class`), older free-text diagnoses by keyword (`archive_class`). Their
binary label comes from the release's own benign/malignant field, not from the diagnosis.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
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

# Keyword rules for ARCHIVE_CLASSES, tried in order on the lower-cased text (first match wins):
# the older free-text `diagnosis` values ("nevus", "lentigo NOS", "angioma", ...), and the
# fallback for hierarchical diagnoses outside `_TAXONOMY` (see `taxonomy_class`).
_ARCHIVE_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("MEL", ("melanoma", "lentigo maligna")),
    ("BCC", ("basal cell carcinoma", "basal cell", "baso-squamous", "basosquamous")),
    # Before SCC: "Actinic keratosis, Bowenoid" is an actinic keratosis.
    ("AK", ("actinic keratosis", "solar keratosis", "actinic cheilitis", "akiec")),
    ("SCC", ("squamous cell carcinoma", "bowen", "keratoacanthoma", "verrucous carcinoma")),
    # Named "nevus" but not melanocytic (adnexal, adipocytic, vascular), before NV.
    (
        "other",
        (
            "nevus sebaceus",
            "nevus sebaceous",
            "nevus comedonicus",
            "lipomatous nevus",
            "not melanocytic nevus",
        ),
    ),
    ("VASC", ("nevus anemicus",)),
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
            "epidermal nevus",
        ),
    ),
    ("NV", ("nevus", "naevus", "nevi")),
    ("DF", ("dermatofibroma",)),
    (
        "VASC",
        ("vascular", "angioma", "angiokeratoma", "pyogenic granuloma", "hemorrhage"),
    ),
)

# The ISIC Archive's hierarchical diagnosis taxonomy (the Archive team's `isic-metadata` package,
# `DiagnosisEnum`; `diagnosis_1..5` of an `isic image download` export, `iddx_1..5` of ISIC 2024):
# level 1 is the status (Benign, Malignant, Indeterminate), level 2 the group, levels 3-5 ever
# finer diagnoses. A path takes the class of its longest prefix listed here (compared without
# case). Every group of isic-metadata 4.12 is listed; a path in a group not listed (a later
# version of the taxonomy) goes to the keyword rules, kept to the classes its status allows.
_TAXONOMY: dict[str, str] = {
    "Benign:Benign - Other": "other",
    "Benign:Benign adnexal epithelial proliferations - Apocrine or Eccrine": "other",
    # Nevus comedonicus, a follicular hamartoma; nevus sebaceus below: neither is melanocytic.
    "Benign:Benign adnexal epithelial proliferations - Follicular": "other",
    "Benign:Benign adnexal epithelial proliferations - Sebaceous": "other",
    # Benign keratinocytic lesions: seborrheic keratosis, solar lentigo, lichen planus like and
    # pigmented benign keratosis, the acanthomas, epidermal nevus, porokeratosis.
    "Benign:Benign epidermal proliferations": "BKL",
    # Nevi of every kind, and the other benign melanocytic lesions (dermal melanocytosis,
    # pigmented epithelioid melanocytoma, lentiginous melanocytic proliferation).
    "Benign:Benign melanocytic proliferations": "NV",
    # A lentigo, as ISIC 2019's BKL and the free-text "lentigo" have it.
    "Benign:Benign melanocytic proliferations:Lentigo simplex": "BKL",
    "Benign:Benign soft tissue proliferations - Adipocytic": "other",
    "Benign:Benign soft tissue proliferations - Cartilagenous and ossifying": "other",
    "Benign:Benign soft tissue proliferations - Fibro-histiocytic": "other",
    "Benign:Benign soft tissue proliferations - Fibro-histiocytic:Dermatofibroma": "DF",
    "Benign:Benign soft tissue proliferations - Muscle tissue or myofibroblastic": "other",
    "Benign:Benign soft tissue proliferations - Myoepithelial": "other",
    "Benign:Benign soft tissue proliferations - Neural": "other",
    "Benign:Benign soft tissue proliferations - Vascular": "VASC",
    "Benign:Collision - Only benign proliferations": "other",
    "Benign:Cysts": "other",
    "Benign:Exogenous": "other",
    # Cafe au lait macule, ephelis, mucosal melanotic macule: other; the lentigines: BKL.
    "Benign:Flat melanotic pigmentations - not melanocytic nevus": "other",
    "Benign:Flat melanotic pigmentations - not melanocytic nevus:Ink-spot lentigo": "BKL",
    "Benign:Flat melanotic pigmentations - not melanocytic nevus:Lentigo NOS": "BKL",
    "Benign:Hemorrhagic lesions": "VASC",  # as in ISIC 2019's VASC
    "Benign:Inflammatory or infectious diseases": "other",
    "Benign:Langerhans cell proliferations": "other",
    "Benign:Mast cell proliferations": "other",
    # Actinic keratosis (every subtype, "Bowenoid" too) and actinic cheilitis.
    "Indeterminate:Indeterminate epidermal proliferations": "AK",
    "Indeterminate:Indeterminate melanocytic proliferations": "other",
    # Not MEL although `DiagnosisEnum.is_melanoma` counts it: it names no one diagnosis.
    "Malignant:Collision - At least one malignant proliferation": "other",
    "Malignant:Lymphocytic proliferations - B-Cell": "other",
    "Malignant:Lymphocytic proliferations - T-Cell/NK": "other",
    "Malignant:Malignant adnexal epithelial proliferations - Apocrine or Eccrine": "other",
    "Malignant:Malignant adnexal epithelial proliferations - Follicular": "other",
    "Malignant:Malignant adnexal epithelial proliferations - Follicular:Basal cell carcinoma": (
        "BCC"
    ),
    # A subtype of basal cell carcinoma in the WHO classification.
    "Malignant:Malignant adnexal epithelial proliferations - Follicular:Baso-squamous carcinoma": (
        "BCC"
    ),
    "Malignant:Malignant adnexal epithelial proliferations - Sebaceous": "other",
    # Squamous cell carcinoma invasive, in situ (Bowen's disease), NOS; keratoacanthoma; bowenoid
    # papulosis; verrucous carcinoma.
    "Malignant:Malignant epidermal proliferations": "SCC",
    "Malignant:Malignant melanocytic proliferations (Melanoma)": "MEL",
    "Malignant:Malignant soft tissue proliferations - Adipocytic": "other",
    "Malignant:Malignant soft tissue proliferations - Cartilagenous and ossifying": "other",
    "Malignant:Malignant soft tissue proliferations - Fibro-histiocytic": "other",
    "Malignant:Malignant soft tissue proliferations - Muscle tissue or myofibroblastic": "other",
    "Malignant:Malignant soft tissue proliferations - Myoepithelial": "other",
    "Malignant:Malignant soft tissue proliferations - Neural": "other",
    "Malignant:Malignant soft tissue proliferations - Unknown or other histiogenesis": "other",
    "Malignant:Malignant soft tissue proliferations - Vascular": "other",  # Kaposi, angiosarcoma
    "Malignant:Merkel cell proliferation": "other",
    "Malignant:Skin metastasis of internal solid cancer - non-hematological": "other",
}
_TAXONOMY_KEYS: dict[tuple[str, ...], str] = {
    tuple(level.strip().lower() for level in path.split(":")): name
    for path, name in _TAXONOMY.items()
}
# The classes a keyword match may give under each status (anything else becomes "other"): never
# a malignant class for a benign diagnosis, nor a benign one for a malignant diagnosis.
_STATUS_CLASSES: dict[str, frozenset[str]] = {
    "benign": frozenset({"NV", "BKL", "DF", "VASC", "other", "unknown"}),
    "malignant": frozenset({"MEL", "BCC", "SCC", "AK", "other", "unknown"}),
    "indeterminate": frozenset({"AK", "other", "unknown"}),
}

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


def taxonomy_class(levels: Sequence[object], *texts: object) -> str:
    """Maps a diagnosis of the ISIC Archive's hierarchical taxonomy to a name in `ARCHIVE_CLASSES`.

    levels: the levels in order, status first (`diagnosis_1..5`; ISIC 2024: `iddx_1..5`), missing
      ones empty. texts: free-text diagnoses to try after them (an older export's `diagnosis`).

    The class is that of the longest listed prefix of the path (`_TAXONOMY`): it follows the
    status and group, not words in the name ("Nevus comedonicus" is adnexal, not a nevus). The
    status alone gives "unknown". A path outside the table (a gap in the levels, a group of a
    later taxonomy) or a first level that is not a status goes to the keyword rules
    (`archive_class`), kept under a status to the classes it allows (else "other").
    """
    parts = ["" if is_missing(v) else str(v).strip() for v in levels]
    status = parts[0].lower() if parts else ""
    keyword = archive_class(*reversed(parts[1:]), *texts)
    if status not in _STATUS_CLASSES:
        return keyword
    path = [status]
    for part in parts[1:]:
        if not part:
            break
        path.append(part.lower())
    for n in range(len(path), 1, -1):
        name = _TAXONOMY_KEYS.get(tuple(path[:n]))
        if name is not None:
            return name
    return keyword if keyword in _STATUS_CLASSES[status] else "other"


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
