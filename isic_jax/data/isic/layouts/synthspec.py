"""How `isic_jax.data.synth` imitates a release (`Release.synth`): the diagnoses it draws, how it
names images, and the metadata it invents. Only data and small functions of a random generator;
the drawing and the planning are synth's."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np

    from isic_jax.data.isic.layouts.spec import MetadataRow

BENIGN, MALIGNANT, INDETERMINATE = "benign", "malignant", "indeterminate"
STATUSES = (BENIGN, MALIGNANT, INDETERMINATE)


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """One diagnosis value a release writes, and how the generator draws it.

    name: the value in the release's files (column name for one-hot releases, diagnosis_3 for
      the archive, iddx_full for 2024). status: "benign" | "malignant" | "indeterminate".
    weight: typical share within its status group. styles: (drawing style, probability) pairs.
    """

    name: str
    status: str
    weight: float
    styles: tuple[tuple[str, float], ...]


def dx(name: str, status: str, weight: float, *styles: tuple[str, float] | str) -> Diagnosis:
    """A Diagnosis; a style given alone has probability 1."""
    parsed = tuple((s, 1.0) if isinstance(s, str) else s for s in styles)
    return Diagnosis(name, status, weight, parsed)


class Drawn(Protocol):
    """What a per-image metadata function sees of one planned image."""

    dx: Diagnosis
    style: str  # drawing style (synth's STYLES)
    h: int
    w: int
    traits: Mapping[str, float]  # its patient's (`SynthSpec.per_patient`; {} without)


PerImage = Callable[["Drawn", "np.random.Generator"], dict[str, str]]
PerPatient = Callable[["np.random.Generator"], dict[str, float]]


def label_is_name(d: Diagnosis) -> str:
    """The label field holds the diagnosis name (one-hot and 2016/2017 ground truths)."""
    return d.name


def label_is_target(d: Diagnosis) -> str:
    """The label field is a 0/1 `target` (1: malignant)."""
    return "1" if d.status == MALIGNANT else "0"


def label_is_status(d: Diagnosis) -> str:
    """The label field is the status, capitalised (the archive's diagnosis_1)."""
    return d.status.capitalize()


# Anatomical sites and their shares (the archive's and the older challenges' vocabulary).
ARCHIVE_SITES: tuple[str, ...] = (
    "anterior torso", "posterior torso", "lower extremity", "upper extremity", "head/neck",
    "palms/soles", "lateral torso", "oral/genital",
)  # fmt: skip
ARCHIVE_SITE_P: tuple[float, ...] = (0.4, 0.22, 0.16, 0.14, 0.04, 0.02, 0.01, 0.01)
CONFIRM_TYPES: tuple[str, ...] = (
    "histopathology",
    "serial imaging showing no change",
    "single image expert consensus",
    "confocal microscopy with consensus dermoscopy",
)


def confirm_type(image: Drawn, rng: np.random.Generator) -> dict[str, str]:
    """diagnosis_confirm_type: malignant lesions are biopsied, others confirmed any way."""
    if image.dx.status == MALIGNANT:
        return {"diagnosis_confirm_type": "histopathology"}
    return {"diagnosis_confirm_type": str(rng.choice(CONFIRM_TYPES))}


@dataclasses.dataclass(frozen=True)
class SynthSpec:
    """How synth imitates one release.

    diagnoses: what it draws, in file order. label: the label field's value for a diagnosis.
    every_class: every diagnosis gets at least one image when its status group has enough.
    ids: image numbers: "dense" (0 .. 4n, as the older collections), "sparse" (0 .. 9,999,999) or
      "consecutive" (from `first_id`, as HAM10000). id_suffix: carried by 1 in 50 image names.
    duplicate_share: images that repeat another image's bytes under a second name (at least one
      pair from 10 images on).
    tiles: square crops (80-100 % of the size) of total-body photography instead of dermoscopic
      photos of varied aspect (no hair, no dark rim). jpeg_quality: of the images.
    sites, site_p: anatomical sites and their shares; lesion_prefix: of the lesion ids.
    per_image: more metadata of one image (official column names; "site" replaces the site).
    per_patient: traits of one patient that its images' `per_image` sees (`Drawn.traits`), e.g.
      how the lesions of that patient typically look in the tabular measurements.
    age_shift: years added to the age of a patient with a malignant lesion, drawn uniformly from
      these values (a mild age signal); () for none.
    blanks: (field, share) of cells left empty; fields: patient_id, lesion_id, age_approx, sex,
      site. decimal_ages: ages written as "45.0".
    superpixels: a `<id>_superpixels.png` beside each image (ISIC 2017).
    licence_folders: folders that get ATTRIBUTION.txt and LICENSE.txt (ISIC 2018/2019).
    extra_files: writes more files from the metadata rows; returns the names to report.
    """

    diagnoses: tuple[Diagnosis, ...]
    label: Callable[[Diagnosis], str]
    every_class: bool = False
    ids: str = "dense"
    first_id: int = 0
    id_suffix: str = ""
    duplicate_share: float = 0.0
    tiles: bool = False
    jpeg_quality: int = 90
    sites: tuple[str, ...] = ARCHIVE_SITES
    site_p: tuple[float, ...] = ARCHIVE_SITE_P
    lesion_prefix: str = "IL"
    per_image: PerImage | None = None
    per_patient: PerPatient | None = None
    age_shift: tuple[int, ...] = (5, 10, 15, 20)
    blanks: tuple[tuple[str, float], ...] = ()
    decimal_ages: bool = False
    superpixels: bool = False
    licence_folders: tuple[str, ...] = ()
    extra_files: Callable[[pathlib.Path, Sequence[MetadataRow]], list[str]] | None = None

    def __post_init__(self) -> None:
        if self.ids not in ("dense", "sparse", "consecutive"):
            raise ValueError(f"unknown id scheme {self.ids!r}")
        if any(d.status not in STATUSES for d in self.diagnoses):
            raise ValueError(f"diagnosis status must be one of {STATUSES}")
