"""Synthetic ISIC-like datasets written in the official layout of each ISIC release.

`write_synthetic(output_dir, fmt, num_images, seed)` draws lesion-like dermoscopy images with numpy
(vectorised, no per-pixel Python loops), encodes them as JPEG and writes them, with their ground
truth and metadata files, exactly where and how the real download has them (see DESIGN.md):

- archive: `<isic_id>.jpg`, `metadata.csv` as isic-cli writes it (isic_id, attribution,
  copyright_license, then the metadata fields sorted; CRLF line ends), `attribution.txt`,
  `licenses/<license>.txt`.
- isic2016: `ISBI2016_ISIC_Part3_Training_Data/*.jpg`,
  `ISBI2016_ISIC_Part3_Training_GroundTruth.csv` (no header: `ISIC_xxxxxxx,benign|malignant`).
- isic2017: `ISIC-2017_Training_Data/` (`*.jpg`, `*_superpixels.png`,
  `ISIC-2017_Training_Data_metadata.csv`), `ISIC-2017_Training_Part3_GroundTruth.csv`.
- isic2018: `ISIC2018_Task3_Training_Input/` (+ ATTRIBUTION.txt, LICENSE.txt),
  `ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv`,
  `ISIC2018_Task3_Training_LesionGroupings.csv`.
- isic2019: `ISIC_2019_Training_Input/` (+ ATTRIBUTION.txt, LICENSE.txt),
  `ISIC_2019_Training_GroundTruth.csv`, `ISIC_2019_Training_Metadata.csv`; a few image names
  carry the real `_downsampled` suffix.
- isic2020: `train/*.jpg`, `ISIC_2020_Training_GroundTruth_v2.csv`,
  `ISIC_2020_Training_Duplicates.csv` (real pairs: the same JPEG bytes under two names).
- isic2024: `train-image.hdf5` (one scalar dataset per isic_id holding the JPEG bytes),
  `train-metadata.csv` (the 55 Kaggle columns).

What is learnable: malignant lesions (melanoma, BCC, SCC, AK) are drawn asymmetric, with irregular
borders and several colours (black, dark brown, blue-grey, red, white regression), or with the
cues of their class (BCC: pink with red branching vessels and blue-grey nests; SCC: keratin
centre and dotted vessels; AK: ill-defined red scaly patch). Benign ones are round-ish, sharply
bordered and uniformly coloured, with their own cues (seborrheic keratosis: milia and fissures;
dermatofibroma: white centre; vascular: red-purple lacunae). Lesion size and overall darkness
are drawn from overlapping ranges in both groups so that a global colour mean is a weak cue.

Structure: images belong to lesions (1-4 images each; the images of one lesion share shape and
colours and differ by orientation, framing and lighting) and lesions to patients (several lesions
per patient, skin tone per patient), so that patient/lesion-grouped splits matter. Metadata has
missing values (empty cells). Same seed -> byte-identical files (fixed JPEG settings, no EXIF, HDF5
written without timestamps).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import io
import math
import os
import pathlib
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from isic_jax.data.isic.labels import DIAGNOSIS_CLASSES, RELEASES

# One layout per release the builder reads.
FORMATS: tuple[str, ...] = RELEASES
# Far above the real 2020/2024 rates: small test sets need positives.
DEFAULT_MALIGNANT_FRACTION = 0.3
DEFAULT_IMAGE_SIZE = 160  # longer side, px; aspect ratios vary (4:3, 3:2, 1:1, 3:4)
INDETERMINATE_FRACTION = 0.03  # archive and isic2024 only; carved out of the benign share
JPEG_QUALITY = 90


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


def _dx(name: str, status: str, weight: float, *styles: tuple[str, float] | str) -> Diagnosis:
    parsed = tuple((s, 1.0) if isinstance(s, str) else s for s in styles)
    return Diagnosis(name, status, weight, parsed)


_BEN, _MAL, _IND = "benign", "malignant", "indeterminate"

# Archive: diagnosis_3 value -> (diagnosis_1, diagnosis_2) of the ISIC hierarchical taxonomy.
_ARCHIVE_TAXONOMY: dict[str, tuple[str, str]] = {
    "Nevus": ("Benign", "Benign melanocytic proliferations"),
    "Seborrheic keratosis": ("Benign", "Benign epidermal proliferations"),
    "Solar lentigo": ("Benign", "Benign epidermal proliferations"),
    "Dermatofibroma": ("Benign", "Benign soft tissue proliferations - Fibro-histiocytic"),
    "Hemangioma": ("Benign", "Benign soft tissue proliferations - Vascular"),
    "Melanoma Invasive": ("Malignant", "Malignant melanocytic proliferations (Melanoma)"),
    "Melanoma in situ": ("Malignant", "Malignant melanocytic proliferations (Melanoma)"),
    "Basal cell carcinoma": (
        "Malignant",
        "Malignant adnexal epithelial proliferations - Follicular",
    ),
    "Squamous cell carcinoma, Invasive": ("Malignant", "Malignant epidermal proliferations"),
    "Atypical melanocytic neoplasm": ("Indeterminate", "Indeterminate melanocytic proliferations"),
    "Solar or actinic keratosis": ("Indeterminate", "Indeterminate epidermal proliferations"),
}

RELEASE_DIAGNOSES: dict[str, tuple[Diagnosis, ...]] = {
    "archive": (
        _dx("Nevus", _BEN, 0.70, "NV"),
        _dx("Seborrheic keratosis", _BEN, 0.14, "BKL"),
        _dx("Solar lentigo", _BEN, 0.08, "LENTIGO"),
        _dx("Dermatofibroma", _BEN, 0.04, "DF"),
        _dx("Hemangioma", _BEN, 0.04, "VASC"),
        _dx("Melanoma Invasive", _MAL, 0.35, "MEL"),
        _dx("Melanoma in situ", _MAL, 0.20, "MEL"),
        _dx("Basal cell carcinoma", _MAL, 0.30, "BCC"),
        _dx("Squamous cell carcinoma, Invasive", _MAL, 0.15, "SCC"),
        _dx("Atypical melanocytic neoplasm", _IND, 0.6, "ATYP"),
        _dx("Solar or actinic keratosis", _IND, 0.4, "AK"),
    ),
    "isic2016": (
        _dx("benign", _BEN, 1.0, ("NV", 0.8), ("BKL", 0.1), ("LENTIGO", 0.1)),
        _dx("malignant", _MAL, 1.0, "MEL"),
    ),
    "isic2017": (
        _dx("nevus", _BEN, 0.84, ("NV", 0.85), ("ATYP", 0.15)),
        _dx("seborrheic_keratosis", _BEN, 0.16, "BKL"),
        _dx("melanoma", _MAL, 1.0, "MEL"),
    ),
    # HAM10000 shares (Tschandl et al. 2018).
    "isic2018": (
        _dx("MEL", _MAL, 0.57, "MEL"),
        _dx("NV", _BEN, 0.83, "NV"),
        _dx("BCC", _MAL, 0.26, "BCC"),
        _dx("AKIEC", _MAL, 0.17, "AK"),
        _dx("BKL", _BEN, 0.136, "BKL"),
        _dx("DF", _BEN, 0.016, "DF"),
        _dx("VASC", _BEN, 0.018, "VASC"),
    ),
    # ISIC 2019 training shares; AK counted malignant like 2018's AKIEC. UNK: test set only.
    "isic2019": (
        _dx("MEL", _MAL, 0.48, "MEL"),
        _dx("NV", _BEN, 0.80, "NV"),
        _dx("BCC", _MAL, 0.36, "BCC"),
        _dx("AK", _MAL, 0.09, "AK"),
        _dx("BKL", _BEN, 0.165, "BKL"),
        _dx("DF", _BEN, 0.016, "DF"),
        _dx("VASC", _BEN, 0.019, "VASC"),
        _dx("SCC", _MAL, 0.07, "SCC"),
    ),
    "isic2020": (
        _dx("unknown", _BEN, 0.80, ("NV", 0.85), ("LENTIGO", 0.1), ("BKL", 0.05)),
        _dx("nevus", _BEN, 0.15, "NV"),
        _dx("seborrheic keratosis", _BEN, 0.025, "BKL"),
        _dx("lentigo NOS", _BEN, 0.01, "LENTIGO"),
        _dx("lichenoid keratosis", _BEN, 0.01, "BKL"),
        _dx("solar lentigo", _BEN, 0.003, "LENTIGO"),
        _dx("cafe-au-lait macule", _BEN, 0.001, "LENTIGO"),
        _dx("atypical melanocytic proliferation", _BEN, 0.001, "ATYP"),
        _dx("melanoma", _MAL, 1.0, "MEL"),
    ),
    "isic2024": (
        _dx("Benign", _BEN, 0.90, ("NV", 0.8), ("LENTIGO", 0.1), ("BKL", 0.1)),
        _dx("Benign::Benign melanocytic proliferations::Nevus", _BEN, 0.05, "NV"),
        _dx("Benign::Benign epidermal proliferations::Seborrheic keratosis", _BEN, 0.03, "BKL"),
        _dx("Benign::Benign epidermal proliferations::Solar lentigo", _BEN, 0.02, "LENTIGO"),
        _dx(
            "Malignant::Malignant adnexal epithelial proliferations - Follicular::"
            "Basal cell carcinoma",
            _MAL,
            0.45,
            "BCC",
        ),
        _dx(
            "Malignant::Malignant melanocytic proliferations (Melanoma)::Melanoma Invasive",
            _MAL,
            0.20,
            "MEL",
        ),
        _dx(
            "Malignant::Malignant melanocytic proliferations (Melanoma)::Melanoma in situ",
            _MAL,
            0.15,
            "MEL",
        ),
        _dx(
            "Malignant::Malignant epidermal proliferations::Squamous cell carcinoma in situ",
            _MAL,
            0.20,
            "SCC",
        ),
        _dx(
            "Indeterminate::Indeterminate epidermal proliferations::Solar or actinic keratosis",
            _IND,
            0.5,
            "AK",
        ),
        _dx(
            "Indeterminate::Indeterminate melanocytic proliferations::"
            "Atypical melanocytic neoplasm",
            _IND,
            0.5,
            "ATYP",
        ),
    ),
}

# Diagnosis names per release, in file order, and the malignant ones (the generator's notion,
# which --malignant-fraction counts).
CLASSES: dict[str, list[str]] = {f: [d.name for d in RELEASE_DIAGNOSES[f]] for f in FORMATS}
MALIGNANT: dict[str, list[str]] = {
    f: [d.name for d in RELEASE_DIAGNOSES[f] if d.status == _MAL] for f in FORMATS
}
# Releases with several classes: every class appears at least once when the group allows it.
_MULTICLASS = ("archive", "isic2017", "isic2018", "isic2019")
# Ground-truth CSV columns after `image`: the builder's classes are these, in file order
# (2019's UNK column is for the test set only).
_ONE_HOT_2018 = list(DIAGNOSIS_CLASSES["isic2018"])
_ONE_HOT_2019 = [*DIAGNOSIS_CLASSES["isic2019"], "UNK"]

# The 55 columns of the ISIC 2024 Kaggle train-metadata.csv, in file order.
METADATA_2024_COLUMNS: list[str] = [
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

# isic-cli writes isic_id, attribution, copyright_license, then the union of the records'
# acquisition and clinical fields, sorted (isic_cli/cli/utils.py:_extract_metadata).
ARCHIVE_METADATA_FIELDS: list[str] = sorted(
    [
        "age_approx", "anatom_site_general", "clin_size_long_diam_mm", "concomitant_biopsy",
        "dermoscopic_type", "diagnosis_1", "diagnosis_2", "diagnosis_3", "diagnosis_4",
        "diagnosis_5", "diagnosis_confirm_type", "image_type", "lesion_id", "melanocytic",
        "patient_id", "pixels_x", "pixels_y", "sex",
    ]
)  # fmt: skip
ARCHIVE_COLUMNS: list[str] = [
    "isic_id",
    "attribution",
    "copyright_license",
    *ARCHIVE_METADATA_FIELDS,
]

_SITES_ARCHIVE = [
    "anterior torso", "posterior torso", "lower extremity", "upper extremity", "head/neck",
    "palms/soles", "lateral torso", "oral/genital",
]  # fmt: skip
_SITES_2020 = ["torso", "lower extremity", "upper extremity", "head/neck", "palms/soles",
               "oral/genital"]  # fmt: skip
_SITE_P = [0.4, 0.22, 0.16, 0.14, 0.04, 0.02, 0.01, 0.01]
_SITE_P_2020 = [0.5, 0.25, 0.15, 0.06, 0.03, 0.01]
# 2024: tbp_lv_location -> (tbp_lv_location_simple, anatom_site_general)
_LOCATIONS_2024: list[tuple[str, str, str]] = [
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
    ("Department of Dermatology, Hospital Clínic de Barcelona", "CC-BY-NC"),
    ("ViDIR Group, Department of Dermatology, Medical University of Vienna", "CC-BY-NC"),
    ("Anonymous", "CC-0"),
]
_ATTRIBUTIONS_2024 = [
    ("Memorial Sloan Kettering Cancer Center", "CC-BY"),
    ("ACEMID MIA", "CC-0"),
    ("Frazer Institute, The University of Queensland, Dermatology Research Centre", "CC-BY"),
    ("FNQH Cairns", "CC-BY"),
    ("Department of Dermatology, Hospital Clínic de Barcelona", "CC-BY-NC"),
    ("University Hospital of Basel", "CC-BY-NC"),
    ("ViDIR Group, Department of Dermatology, Medical University of Vienna", "CC-BY-NC"),
]
_CONFIRM_TYPES = [
    "histopathology",
    "serial imaging showing no change",
    "single image expert consensus",
    "confocal microscopy with consensus dermoscopy",
]

# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------

_PALETTE: dict[str, np.ndarray] = {
    k: np.asarray(v, np.float32)
    for k, v in {
        "black": (38, 28, 28),
        "dark_brown": (80, 48, 32),
        "brown": (128, 84, 56),
        "light_brown": (170, 120, 84),
        "tan": (196, 154, 116),
        "blue_grey": (100, 112, 138),
        "red": (178, 62, 66),
        "dark_red": (120, 30, 45),
        "pink": (214, 138, 142),
        "purple": (118, 52, 92),
        "white": (226, 216, 212),
        "yellow": (224, 204, 150),
        "skin_light": (238, 204, 184),
        "skin_dark": (168, 118, 88),
    }.items()
}
STYLES = ("NV", "ATYP", "MEL", "BKL", "LENTIGO", "BCC", "AK", "SCC", "DF", "VASC")
_MEL_COLOURS = ["black", "dark_brown", "blue_grey", "red", "tan", "white"]
_EXTENT = 1.7  # canonical lesion fields span [-EXTENT, EXTENT] lesion radii
_SQRT_PI = math.sqrt(math.pi)


def _lerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    return a + (b - a) * np.float32(t)


def _basis(coords: np.ndarray, n: int, extent: float = _EXTENT) -> np.ndarray:
    """Gaussian bumps at n nodes over [-extent, extent]. coords f32[L] -> f32[L, n].

    A field sum_jk G[j,k] basis(q)[j] basis(p)[k] with G ~ N(0, 1) has unit variance roughly
    (the squared bumps of width = node spacing sum to sqrt(pi) per axis).
    """
    centres = np.linspace(-extent, extent, n, dtype=np.float32)
    d = (coords[:, None] - centres[None, :]) * np.float32((n - 1) / (2 * extent))
    return np.exp(-0.5 * d * d) * np.float32(1 / math.sqrt(_SQRT_PI))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.float32(0.5) + np.float32(0.5) * np.tanh(np.float32(0.5) * x)


class _Canvas:
    """Pixel grid of one image, in canonical lesion coordinates (units of the lesion radius).

    The image shows the lesion in one of the 8 dihedral orientations (rotations by 90 degrees and
    flips), so canonical p and q each depend on one image axis only and every canonical field
    stays separable: F = basis(rows) @ G @ basis(cols).T, a few small matrix products.
    """

    def __init__(self, h: int, w: int, cx: float, cy: float, radius: float, orient: int):
        self.h, self.w = h, w
        u = (np.arange(w, dtype=np.float32) - np.float32(cx)) / np.float32(radius)  # [W]
        v = (np.arange(h, dtype=np.float32) - np.float32(cy)) / np.float32(radius)  # [H]
        self.swap = bool(orient & 4)
        s1 = np.float32(-1.0 if orient & 1 else 1.0)
        s2 = np.float32(-1.0 if orient & 2 else 1.0)
        if self.swap:  # p along image rows, q along image columns
            self.p1d, self.q1d = s1 * v, s2 * u
            p2, q2 = self.p1d[:, None], self.q1d[None, :]
        else:
            self.p1d, self.q1d = s1 * u, s2 * v
            p2, q2 = self.p1d[None, :], self.q1d[:, None]
        self.rho = np.sqrt(p2 * p2 + q2 * q2)  # f32[H, W]
        self.theta = np.arctan2(q2, p2)  # f32[H, W]
        self._bases: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def field(self, g: np.ndarray) -> np.ndarray:
        """Smooth random field from node weights g f32[n, n] (rows: q, cols: p) -> f32[H, W]."""
        n = g.shape[0]
        if n not in self._bases:
            self._bases[n] = (_basis(self.p1d, n), _basis(self.q1d, n))
        bp, bq = self._bases[n]
        if self.swap:
            return bp @ g.T @ bq.T
        return bq @ g @ bp.T


def _image_field(rng: np.random.Generator, h: int, w: int, n: int) -> np.ndarray:
    """Smooth unit-variance noise over the whole image f32[H, W] (background shading)."""
    g = rng.standard_normal((n, n), dtype=np.float32)
    rows = _basis(np.linspace(-1, 1, h, dtype=np.float32), n, 1.0)
    cols = _basis(np.linspace(-1, 1, w, dtype=np.float32), n, 1.0)
    return rows @ g @ cols.T


@dataclasses.dataclass
class _Region:
    colour: np.ndarray  # f32[3]
    g: np.ndarray  # f32[n, n] node weights of the region's field
    threshold: float
    strength: float


@dataclasses.dataclass
class _LesionParams:
    """Everything that makes one lesion look like itself across its images."""

    style: str
    size: float  # lesion radius as a fraction of half the shorter image side
    # f32[K] border amplitudes a_k of r(theta) = 1 + sum_k a_k cos(k theta + phi_k)
    harmonics: np.ndarray
    phases: np.ndarray  # f32[K]
    edge: float  # border softness, lesion radii
    base: np.ndarray  # f32[3] lesion colour
    centre_dark: float  # darkening toward the centre, fraction
    regions: list[_Region]
    network: float  # pigment network strength
    g_network: np.ndarray
    texture: dict[str, Any]


def _harmonics(rng: np.random.Generator, low: Sequence[float], high: float) -> np.ndarray:
    """Border harmonics: explicit amplitudes for k=1..len(low), then noise of scale `high`/k."""
    k_total = 10
    a = np.zeros(k_total, np.float32)
    for i, amp in enumerate(low):
        a[i] = amp
    ks = np.arange(len(low) + 1, k_total + 1, dtype=np.float32)
    a[len(low) :] = rng.standard_normal(len(ks), dtype=np.float32) * np.float32(high) / np.sqrt(ks)
    return a


def _lesion_params(style: str, rng: np.random.Generator) -> _LesionParams:
    """Draw the parameters of one lesion of a drawing style."""
    u = rng.uniform
    pal = _PALETTE
    regions: list[_Region] = []
    texture: dict[str, Any] = {}
    network = 0.0
    centre_dark = 0.0
    g = lambda n: rng.standard_normal((n, n), dtype=np.float32)  # noqa: E731

    if style in ("NV", "ATYP"):
        size = u(0.45, 0.85)
        low = [u(0, 0.03), u(0, 0.12), u(0, 0.02)]
        harm = _harmonics(rng, low, 0.008)
        edge = u(0.025, 0.06)
        kind = rng.random()
        if kind < 0.12:  # blue nevus: benign, uniformly blue-grey
            base = _lerp(pal["blue_grey"], pal["dark_brown"], u(0.0, 0.5))
        elif kind < 0.22:  # dermal nevus: pinkish tan
            base = _lerp(pal["pink"], pal["light_brown"], u(0.3, 0.8))
        else:
            base = _lerp(pal["tan"], pal["dark_brown"], u(0.0, 1.0))
        base = base * rng.uniform(0.93, 1.07, 3).astype(np.float32)
        centre_dark = u(0.0, 0.3)
        network = u(0.05, 0.3)
        # A faint second brown keeps benign lesions from being perfectly flat.
        regions.append(_Region(base * np.float32(u(0.8, 0.9)), g(5), u(0.3, 1.0), u(0.3, 0.6)))
        if style == "ATYP":  # between nevus and melanoma
            harm[0] = u(0.05, 0.12)
            harm[2] = u(0.03, 0.08)
            colour = pal["dark_brown"] if rng.random() < 0.6 else pal["tan"]
            regions.append(_Region(colour, g(5), u(0.3, 0.8), u(0.6, 0.9)))
    elif style == "MEL":
        size = u(0.45, 0.85)
        low = [u(0.08, 0.22), u(0.05, 0.2), u(0.04, 0.15)]
        harm = _harmonics(rng, low, 0.05)
        edge = u(0.04, 0.14)
        base = _lerp(pal["light_brown"], pal["dark_brown"], u(0.1, 0.9))
        network = u(0.0, 0.35)
        # One colour that contrasts with brown (the multicolour cue), then 1-3 more of any kind.
        contrast = ["blue_grey", "red", "white", "black"]
        first = str(rng.choice(contrast, p=[0.35, 0.25, 0.15, 0.25]))
        names = [c for c in _MEL_COLOURS if c != first]
        p = np.asarray([0.25, 0.22, 0.22, 0.13, 0.1, 0.08])[[c != first for c in _MEL_COLOURS]]
        more = rng.choice(names, size=int(rng.integers(1, 4)), replace=False, p=p / p.sum())
        picks = [first, *more]
        for name in picks:
            regions.append(_Region(pal[str(name)], g(5), u(0.0, 0.8), u(0.75, 1.0)))
    elif style == "BKL":
        size = u(0.45, 0.85)
        harm = _harmonics(rng, [u(0, 0.04), u(0.04, 0.18)], 0.02)
        edge = u(0.02, 0.05)
        base = _lerp(pal["tan"], pal["brown"], u(0.1, 0.9))
        centre_dark = u(-0.1, 0.15)
        texture = {"milia": g(21), "comedo": g(21), "fissure": g(9), "fissure_amp": u(0.15, 0.35)}
    elif style == "LENTIGO":
        size = u(0.5, 0.9)
        harm = _harmonics(rng, [u(0, 0.05), u(0.04, 0.16)], 0.04)
        edge = u(0.04, 0.09)
        base = _lerp(pal["tan"], pal["light_brown"], u(0.0, 1.0))
        network = u(0.05, 0.2)
        regions.append(_Region(base * np.float32(0.88), g(5), u(0.4, 1.0), u(0.3, 0.5)))
    elif style == "BCC":
        size = u(0.45, 0.85)
        harm = _harmonics(rng, [u(0.03, 0.12), u(0.04, 0.15), u(0.02, 0.1)], 0.03)
        edge = u(0.08, 0.16)
        base = _lerp(pal["pink"], pal["skin_light"], u(0.0, 0.4))
        regions.append(_Region(pal["blue_grey"], g(9), u(0.9, 1.4), u(0.8, 1.0)))
        texture = {"vessels": g(11), "vessel_width": u(0.06, 0.1)}
        if rng.random() < 0.4:  # ulceration
            regions.append(_Region(pal["dark_red"], g(5), u(1.0, 1.5), u(0.7, 0.95)))
    elif style == "AK":
        size = u(0.5, 0.9)
        harm = _harmonics(rng, [u(0.04, 0.12), u(0.05, 0.15), u(0.03, 0.1)], 0.05)
        edge = u(0.15, 0.3)
        base = _lerp(pal["pink"], pal["red"], u(0.2, 0.7))
        texture = {"scale": g(21), "scale_threshold": u(0.5, 1.0)}
        regions.append(_Region(pal["light_brown"], g(5), u(0.4, 1.2), u(0.4, 0.8)))
    elif style == "SCC":
        size = u(0.45, 0.85)
        harm = _harmonics(rng, [u(0.04, 0.14), u(0.04, 0.14), u(0.03, 0.1)], 0.04)
        edge = u(0.05, 0.12)
        base = _lerp(pal["pink"], pal["red"], u(0.0, 0.5))
        texture = {"keratin": u(0.35, 0.6), "dots": g(25)}
        regions.append(_Region(pal["white"], g(5), u(0.2, 0.9), u(0.5, 0.9)))
    elif style == "DF":
        size = u(0.35, 0.6)
        harm = _harmonics(rng, [u(0, 0.04), u(0.02, 0.12)], 0.01)
        edge = u(0.12, 0.22)
        base = _lerp(pal["light_brown"], pal["brown"], u(0.0, 0.6))
        network = u(0.15, 0.35)
        texture = {"white_centre": u(0.35, 0.55)}
    elif style == "VASC":
        size = u(0.4, 0.75)
        harm = _harmonics(rng, [u(0, 0.04), u(0.02, 0.12)], 0.01)
        edge = u(0.02, 0.05)
        base = _lerp(pal["red"], pal["purple"], u(0.0, 1.0))
        texture = {"lacunae": g(11)}
    else:
        raise ValueError(f"unknown drawing style {style!r}")

    phases = rng.uniform(0, 2 * np.pi, len(harm)).astype(np.float32)
    return _LesionParams(
        style=style,
        size=float(size),
        harmonics=harm,
        phases=phases,
        edge=float(edge),
        base=np.asarray(base, np.float32),
        centre_dark=float(centre_dark),
        regions=regions,
        network=float(network),
        g_network=g(25),
        texture=texture,
    )


def _hair(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """0-4 dark curved hairs as an alpha map f32[H, W] (image coordinates)."""
    alpha = np.zeros((h, w), np.float32)
    x = np.arange(w, dtype=np.float32)[None, :]
    y = np.arange(h, dtype=np.float32)[:, None]
    for _ in range(int(rng.integers(1, 5))):
        px, py = rng.uniform(0, w), rng.uniform(0, h)
        a = rng.uniform(0, np.pi)
        ca, sa = np.float32(math.cos(a)), np.float32(math.sin(a))
        perp = (x - px) * -sa + (y - py) * ca
        along = (x - px) * ca + (y - py) * sa
        amp, freq = rng.uniform(0, 0.08) * w, rng.uniform(1, 3) * 2 * np.pi / w
        s = perp - np.float32(amp) * np.sin(
            np.float32(freq) * along + np.float32(rng.uniform(0, 6))
        )
        width = np.float32(rng.uniform(0.5, 1.1))
        half_len = np.float32(rng.uniform(0.3, 0.8) * max(h, w))
        line = np.exp(-(s * s) / (width * width)) * (np.abs(along) < half_len)
        alpha = np.maximum(alpha, line)
    return alpha


def _render(
    params: _LesionParams,
    skin: np.ndarray,
    h: int,
    w: int,
    rng: np.random.Generator,
    *,
    dermoscopic: bool = True,
) -> np.ndarray:
    """One image of a lesion: uint8[H, W, 3]. `rng` draws what varies from photo to photo."""
    f32 = np.float32
    radius = params.size * min(h, w) / 2 * rng.uniform(0.9, 1.1)
    cx = w / 2 + rng.normal(0, 0.05) * w
    cy = h / 2 + rng.normal(0, 0.05) * h
    canvas = _Canvas(h, w, cx, cy, radius, int(rng.integers(0, 8)))

    # Background skin: patient skin tone, smooth shading, later pixel noise.
    shade = _image_field(rng, h, w, 4)
    img = skin[None, None, :] * (f32(1) + f32(0.05) * shade)[..., None]

    # Lesion mask from the border r(theta).
    theta = canvas.theta
    r = np.ones_like(theta)
    for k in range(len(params.harmonics)):
        if params.harmonics[k] != 0:
            r += params.harmonics[k] * np.cos(f32(k + 1) * theta + params.phases[k])
    r = np.clip(r, f32(0.35), f32(1.8))
    mask = _sigmoid((r - canvas.rho) / f32(params.edge))  # f32[H, W]
    t = np.clip(canvas.rho / r, f32(0), f32(1))  # 0 at the centre, 1 on the border

    col = np.broadcast_to(params.base, (h, w, 3)).astype(np.float32)
    if params.centre_dark:
        col = col * (f32(1) - f32(params.centre_dark) * (f32(1) - t))[..., None]
    for region in params.regions:
        wgt = _sigmoid((canvas.field(region.g) - f32(region.threshold)) / f32(0.18))
        wgt = (wgt * f32(region.strength))[..., None]
        col = col + (region.colour - col) * wgt
    if params.network:
        lines = np.exp(-((canvas.field(params.g_network) / f32(0.3)) ** 2))
        col = col * (f32(1) - f32(params.network) * lines)[..., None]

    tex = params.texture
    if "milia" in tex:  # seborrheic keratosis: white milia-like cysts, dark comedo openings
        milia = _sigmoid((canvas.field(tex["milia"]) - f32(1.7)) / f32(0.12))[..., None]
        col = col + (_PALETTE["white"] - col) * milia
        comedo = _sigmoid((canvas.field(tex["comedo"]) - f32(1.8)) / f32(0.12))[..., None]
        col = col + (_PALETTE["dark_brown"] - col) * comedo
        fissure = np.exp(-((canvas.field(tex["fissure"]) / f32(0.2)) ** 2))
        col = col * (f32(1) - f32(tex["fissure_amp"]) * fissure)[..., None]
    if "vessels" in tex:  # BCC: branching red vessels
        vessels = np.exp(-((canvas.field(tex["vessels"]) / f32(tex["vessel_width"])) ** 2))
        vessels = (vessels * (t < 0.92))[..., None]
        col = col + (_PALETTE["red"] - col) * vessels * f32(0.9)
    if "scale" in tex:  # AK: white scale
        scale = _sigmoid((canvas.field(tex["scale"]) - f32(tex["scale_threshold"])) / f32(0.1))
        col = col + (_PALETTE["white"] - col) * (scale * f32(0.8))[..., None]
    if "keratin" in tex:  # SCC: keratin centre, dotted vessels
        keratin = _sigmoid((f32(tex["keratin"]) - t) / f32(0.08))[..., None]
        col = col + (_PALETTE["yellow"] - col) * keratin * f32(0.9)
        dots = _sigmoid((canvas.field(tex["dots"]) - f32(1.5)) / f32(0.1))[..., None]
        col = col + (_PALETTE["dark_red"] - col) * dots * f32(0.9)
    if "white_centre" in tex:  # DF: central white scar-like patch
        centre = _sigmoid((f32(tex["white_centre"]) - t) / f32(0.1))[..., None]
        col = col + (_PALETTE["white"] - col) * centre * f32(0.85)
    if "lacunae" in tex:  # VASC: red-purple lacunae
        lac = _sigmoid((canvas.field(tex["lacunae"]) - f32(0.5)) / f32(0.15))[..., None]
        col = col + (_PALETTE["dark_red"] - col) * lac * f32(0.8)

    img = img + (col - img) * mask[..., None]

    if dermoscopic and rng.random() < 0.35:
        hair = _hair(rng, h, w)[..., None]
        img = img + (_PALETTE["black"] * f32(1.2) - img) * hair * f32(0.85)
    img = img * f32(rng.uniform(0.92, 1.08))  # exposure
    if dermoscopic and rng.random() < 0.3:  # dark circular surround of contact dermoscopy
        yy = (np.arange(h, dtype=np.float32)[:, None] - f32(h / 2)) ** 2
        xx = (np.arange(w, dtype=np.float32)[None, :] - f32(w / 2)) ** 2
        dist = np.sqrt(yy + xx)
        rim = f32(rng.uniform(0.52, 0.62) * math.hypot(h, w))
        img = img * (f32(1) - f32(0.92) * _sigmoid((dist - rim) / f32(2.5)))[..., None]
    img = img + rng.standard_normal((h, w, 3), dtype=np.float32) * f32(2.5)
    return np.clip(img + f32(0.5), 0, 255).astype(np.uint8)


def _single_threaded_blas() -> contextlib.AbstractContextManager[Any]:
    """The fields are tiny matrix products: BLAS threads only add overhead (2-5x slower on a busy
    2-core machine). threadpoolctl comes with scikit-learn; without it, change nothing."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _encode_jpeg(pixels: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """uint8[H, W, 3] -> JPEG bytes; fixed settings and no metadata, so bytes are reproducible."""
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(
        buf, format="JPEG", quality=quality, subsampling=2, optimize=False, progressive=False
    )
    return buf.getvalue()


def render_lesion(style: str, seed: int, height: int = 120, width: int = 160) -> np.ndarray:
    """One synthetic lesion image of a drawing style: uint8[height, width, 3] (for notebooks/tests).

    Styles: STYLES (NV, ATYP, MEL, BKL, LENTIGO, BCC, AK, SCC, DF, VASC).
    """
    rng = np.random.default_rng(seed)
    params = _lesion_params(style, rng)
    skin = _lerp(_PALETTE["skin_light"], _PALETTE["skin_dark"], rng.beta(2, 5))
    return _render(params, skin, height, width, rng)


# --------------------------------------------------------------------------------------------
# Dataset plan: ids, labels, patients, lesions, metadata
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Record:
    """One image of the plan (internal)."""

    image_id: str
    dx: Diagnosis
    style: str
    lesion: int  # index into the plan's lesions
    patient: int  # hidden patient index
    h: int = 0
    w: int = 0
    duplicate_of: int = -1  # isic2020: index of the record whose bytes this one repeats
    meta: dict[str, str] = dataclasses.field(default_factory=dict)


def _allocate(total: int, weights: Sequence[float], min_one: bool) -> list[int]:
    """Split `total` into integer counts proportional to weights (largest remainder)."""
    weights = np.asarray(weights, np.float64)
    weights = weights / weights.sum()
    counts = np.zeros(len(weights), np.int64)
    if min_one and total >= len(weights):
        counts += 1
    rest = total - int(counts.sum())
    raw = weights * rest
    counts += np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - np.floor(raw)), kind="stable")
    for i in order[: total - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


def _status_counts(fmt: str, n: int, malignant_fraction: float) -> dict[str, int]:
    n_mal = int(round(malignant_fraction * n))
    n_ind = 0
    if any(d.status == _IND for d in RELEASE_DIAGNOSES[fmt]) and n - n_mal >= 10:
        n_ind = max(1, int(round(INDETERMINATE_FRACTION * n)))
    return {_MAL: n_mal, _IND: n_ind, _BEN: n - n_mal - n_ind}


def _partition(
    rng: np.random.Generator, n: int, sizes: Sequence[int], p: Sequence[float]
) -> list[int]:
    """Random group sizes (from `sizes` with probabilities `p`) that sum to n."""
    out: list[int] = []
    while n > 0:
        s = min(int(rng.choice(sizes, p=p)), n)
        out.append(s)
        n -= s
    return out


def _unique_ids(rng: np.random.Generator, n: int, low: int, high: int) -> list[int]:
    return sorted(int(x) for x in rng.choice(high - low, size=n, replace=False) + low)


def _image_shape(rng: np.random.Generator, fmt: str, size: int) -> tuple[int, int]:
    """(height, width) of one image: longer side = size, aspect ratio varies; 2024: square tiles."""
    if fmt == "isic2024":
        side = int(round(size * rng.choice([1.0, 0.9, 0.8])))
        return side, side
    aspect = float(rng.choice([4 / 3, 3 / 2, 1.0, 3 / 4], p=[0.5, 0.25, 0.15, 0.1]))
    if aspect >= 1:
        return int(round(size / aspect)), size
    return size, int(round(size * aspect))


def _plan(
    fmt: str, n: int, frac: float, size: int, rng: np.random.Generator
) -> tuple[list[_Record], list[_LesionParams], list[dict[str, Any]], list[tuple[int, int]]]:
    """Decide every image: diagnosis, lesion, patient, size, duplicates. Exact class counts."""
    diagnoses = RELEASE_DIAGNOSES[fmt]
    status_n = _status_counts(fmt, n, frac)
    n_dup = 0
    if fmt == "isic2020" and n >= 10:
        n_dup = max(1, int(round(0.015 * n)))  # the real 425 pairs are 1.3 % of 33126 images
    # Per status: diagnosis counts; then lesions (1-4 images each) per diagnosis.
    lesions: list[tuple[Diagnosis, str, int]] = []  # (diagnosis, style, num_images)
    for status in (_BEN, _MAL, _IND):
        group = [d for d in diagnoses if d.status == status]
        total = status_n[status]
        if not group or total == 0:
            continue
        counts = _allocate(total, [d.weight for d in group], fmt in _MULTICLASS)
        for d, c in zip(group, counts, strict=True):
            for s in _partition(rng, c, [1, 2, 3, 4], [0.55, 0.25, 0.12, 0.08]):
                names = [x[0] for x in d.styles]
                probs = np.asarray([x[1] for x in d.styles])
                style = str(rng.choice(names, p=probs / probs.sum()))
                lesions.append((d, style, s))
    order = rng.permutation(len(lesions))
    lesions = [lesions[i] for i in order]
    # Patients: 1-5 lesions each.
    patient_sizes = _partition(rng, len(lesions), [1, 2, 3, 5], [0.3, 0.35, 0.2, 0.15])
    lesion_patient = np.repeat(np.arange(len(patient_sizes)), patient_sizes)
    patients = []
    for _ in patient_sizes:
        patients.append(
            {
                "skin": _lerp(_PALETTE["skin_light"], _PALETTE["skin_dark"], rng.beta(2, 5))
                * rng.uniform(0.96, 1.04, 3).astype(np.float32),
                "age": int(rng.integers(4, 18)) * 5,  # 20..85
                "sex": "male" if rng.random() < 0.52 else "female",
            }
        )
    params = [_lesion_params(style, rng) for _, style, _ in lesions]

    records: list[_Record] = []
    for li, (d, style, count) in enumerate(lesions):
        for _ in range(count):
            rec = _Record("", d, style, li, int(lesion_patient[li]))
            rec.h, rec.w = _image_shape(rng, fmt, size)
            records.append(rec)
    # Image ids: sorted random numbers, shuffled onto records so lesions are not contiguous.
    if fmt == "isic2018":  # HAM10000 ids are consecutive from ISIC_0024306
        ids = list(range(24306, 24306 + n))
    elif fmt in ("isic2020", "isic2024"):
        ids = _unique_ids(rng, n, 0, 10_000_000)
    else:  # the older collections are dense from ISIC_0000000
        ids = _unique_ids(rng, n, 0, max(n * 4, 100))
    perm = rng.permutation(n)
    for rec, j in zip(records, perm, strict=True):
        rec.image_id = f"ISIC_{ids[j]:07d}"
    if fmt == "isic2019":  # a few real 2019 names carry this suffix
        for i in rng.choice(n, size=max(1, n // 50), replace=False):
            records[i].image_id += "_downsampled"
    # isic2020 duplicates: record j repeats record i (same status, so counts stay exact).
    duplicates: list[tuple[int, int]] = []
    if n_dup:
        n_dup_mal = int(round(n_dup * status_n[_MAL] / n))
        for status, k in ((_BEN, n_dup - n_dup_mal), (_MAL, n_dup_mal)):
            idx = [i for i, r in enumerate(records) if r.dx.status == status]
            k = min(k, len(idx) // 2)
            if k == 0:
                continue
            pick = rng.choice(idx, size=2 * k, replace=False)
            for a, b in zip(pick[0::2], pick[1::2], strict=True):
                src, dst = sorted((int(a), int(b)), key=lambda i: records[i].image_id)
                records[dst].duplicate_of = src
                records[dst].dx, records[dst].style = records[src].dx, records[src].style
                records[dst].lesion, records[dst].patient = (
                    records[src].lesion,
                    records[src].patient,
                )
                records[dst].h, records[dst].w = records[src].h, records[src].w
                duplicates.append((src, dst))
    return records, params, patients, duplicates


def _missing(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    """bool[n]: which cells are empty; at least one when n >= 10, so tests always see one."""
    miss = rng.random(n) < rate
    if n >= 10 and not miss.any():
        miss[int(rng.integers(0, n))] = True
    return miss


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


def _write_csv(
    path: pathlib.Path, header: list[str] | None, rows: list[list[str]], crlf: bool = False
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf8") as f:
        writer = csv.writer(f, lineterminator="\r\n" if crlf else "\n")
        if header is not None:
            writer.writerow(header)
        writer.writerows(rows)


def _f1(x: float) -> str:
    return f"{x:.1f}"


def _one_hot(names: list[str], name: str) -> list[str]:
    return ["1.0" if c == name else "0.0" for c in names]


def _id_number(rng: np.random.Generator, prefix: str, n: int) -> list[str]:
    return [f"{prefix}_{x:07d}" for x in _unique_ids(rng, n, 0, 10_000_000)]


def _common_meta(
    records: list[_Record],
    patients: list[dict[str, Any]],
    num_lesions: int,
    rng: np.random.Generator,
    sites: list[str],
    site_p: list[float],
    lesion_prefix: str = "IL",
) -> None:
    """Fill rec.meta with patient_id, lesion_id, age_approx, sex and site (blanked later)."""
    pids = _id_number(rng, "IP", len(patients))
    lids = _id_number(rng, lesion_prefix, num_lesions)
    lesion_site = rng.choice(len(sites), size=num_lesions, p=np.asarray(site_p) / sum(site_p))
    for rec in records:
        pat = patients[rec.patient]
        age = pat["age"] + 5 * int(rng.integers(-1, 2) if rng.random() < 0.2 else 0)
        rec.meta.update(
            patient_id=pids[rec.patient],
            lesion_id=lids[rec.lesion],
            age_approx=str(max(age, 5)),
            sex=pat["sex"],
            site=sites[int(lesion_site[rec.lesion])],
        )


def _blank(records: list[_Record], key: str, rng: np.random.Generator, rate: float) -> None:
    for rec, miss in zip(records, _missing(rng, len(records), rate), strict=True):
        if miss:
            rec.meta[key] = ""


def _sync_duplicates(records: list[_Record], duplicates: list[tuple[int, int]]) -> None:
    for src, dst in duplicates:
        records[dst].meta = dict(records[src].meta)


def _write_archive(out: pathlib.Path, records: list[_Record]) -> list[str]:
    rows = []
    for rec in sorted(records, key=lambda r: r.image_id):
        m = rec.meta
        d1, d2 = _ARCHIVE_TAXONOMY[rec.dx.name]
        d3 = rec.dx.name
        if m.get("shallow"):  # some records carry only diagnosis_1, as in the archive
            d2 = d3 = ""
        attribution, license_ = m["attribution"], m["license"]
        value = {
            "age_approx": m["age_approx"],
            "anatom_site_general": m["site"],
            "clin_size_long_diam_mm": m["size_mm"],
            "concomitant_biopsy": "True" if rec.dx.status == _MAL else "False",
            "dermoscopic_type": m["dermoscopic_type"],
            "diagnosis_1": d1,
            "diagnosis_2": d2,
            "diagnosis_3": d3,
            "diagnosis_4": "",
            "diagnosis_5": "",
            "diagnosis_confirm_type": m["confirm"],
            "image_type": "dermoscopic",
            "lesion_id": m["lesion_id"],
            "melanocytic": m["melanocytic"],
            "patient_id": m["patient_id"],
            "pixels_x": str(rec.w),
            "pixels_y": str(rec.h),
            "sex": m["sex"],
        }
        rows.append(
            [rec.image_id, attribution, license_] + [value[k] for k in ARCHIVE_METADATA_FIELDS]
        )
    # csv.DictWriter's default dialect ends lines with \r\n, as the isic-cli file does.
    _write_csv(out / "metadata.csv", ARCHIVE_COLUMNS, rows, crlf=True)
    counts = Counter(r.meta["attribution"] for r in records)
    attributions = sorted(counts.items(), key=lambda kv: (kv[0] == "Anonymous", -kv[1], kv[0]))
    (out / "attribution.txt").write_text("\n\n".join(a for a, _ in attributions), encoding="utf8")
    for license_ in sorted({r.meta["license"] for r in records}):
        path = out / "licenses" / f"{license_}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{license_} (synthetic placeholder licence text)\n", encoding="utf8")
    return ["metadata.csv", "attribution.txt", "licenses/"]


def _archive_meta(records: list[_Record], patients, num_lesions, rng) -> None:
    _common_meta(records, patients, num_lesions, rng, _SITES_ARCHIVE, _SITE_P)
    melanocytic = {"NV", "MEL", "ATYP"}
    for rec in records:
        attribution, license_ = _ATTRIBUTIONS[int(rng.integers(0, len(_ATTRIBUTIONS)))]
        rec.meta.update(
            attribution=attribution,
            license=license_,
            size_mm=_f1(rng.uniform(2, 15)) if rng.random() < 0.4 else "",
            dermoscopic_type=str(rng.choice(["contact polarized", "contact non-polarized", ""])),
            confirm="histopathology" if rec.dx.status != _BEN else str(rng.choice(_CONFIRM_TYPES)),
            melanocytic="True" if rec.style in melanocytic else "False",
        )
        if rec.dx.name == "Nevus" and rng.random() < 0.1:
            rec.meta["shallow"] = "1"
    for key, rate in (("age_approx", 0.05), ("sex", 0.05), ("site", 0.08), ("patient_id", 0.08),
                      ("lesion_id", 0.05)):  # fmt: skip
        _blank(records, key, rng, rate)


def _write_isic2016(out: pathlib.Path, records: list[_Record]) -> list[str]:
    rows = [[r.image_id, r.dx.name] for r in sorted(records, key=lambda r: r.image_id)]
    _write_csv(out / "ISBI2016_ISIC_Part3_Training_GroundTruth.csv", None, rows)
    return ["ISBI2016_ISIC_Part3_Training_GroundTruth.csv"]


def _write_isic2017(out: pathlib.Path, records: list[_Record]) -> list[str]:
    rows, meta = [], []
    for r in sorted(records, key=lambda r: r.image_id):
        mel = "1.0" if r.dx.name == "melanoma" else "0.0"
        sk = "1.0" if r.dx.name == "seborrheic_keratosis" else "0.0"
        rows.append([r.image_id, mel, sk])
        meta.append([r.image_id, r.meta["age_approx"] or "unknown", r.meta["sex"] or "unknown"])
    _write_csv(
        out / "ISIC-2017_Training_Part3_GroundTruth.csv",
        ["image_id", "melanoma", "seborrheic_keratosis"],
        rows,
    )
    _write_csv(
        out / "ISIC-2017_Training_Data" / "ISIC-2017_Training_Data_metadata.csv",
        ["image_id", "age_approximate", "sex"],
        meta,
    )
    return [
        "ISIC-2017_Training_Part3_GroundTruth.csv",
        "ISIC-2017_Training_Data/ISIC-2017_Training_Data_metadata.csv",
    ]


@functools.lru_cache(maxsize=8)  # one per image shape (4 aspect ratios): encode each once
def _superpixels_png(h: int, w: int) -> bytes:
    """A coarse superpixel index map encoded in RGB, as the 2017 *_superpixels.png files are."""
    cell = 16
    idx = (np.arange(h)[:, None] // cell) * ((w + cell - 1) // cell) + np.arange(w)[None, :] // cell
    rgb = np.stack([idx & 255, (idx >> 8) & 255, (idx >> 16) & 255], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _write_licence_files(folder: pathlib.Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ATTRIBUTION.txt").write_text("Synthetic data generated by isic_jax.synth\n")
    (folder / "LICENSE.txt").write_text("CC-0 (synthetic data)\n")


def _write_isic2018(out: pathlib.Path, records: list[_Record]) -> list[str]:
    gt_dir = out / "ISIC2018_Task3_Training_GroundTruth"
    rows, groups = [], []
    for r in sorted(records, key=lambda r: r.image_id):
        rows.append([r.image_id, *_one_hot(_ONE_HOT_2018, r.dx.name)])
        groups.append([r.image_id, r.meta["lesion_id"], r.meta["confirm"]])
    _write_csv(gt_dir / "ISIC2018_Task3_Training_GroundTruth.csv", ["image", *_ONE_HOT_2018], rows)
    _write_licence_files(gt_dir)
    _write_csv(
        out / "ISIC2018_Task3_Training_LesionGroupings.csv",
        ["image", "lesion_id", "diagnosis_confirm_type"],
        groups,
    )
    return [
        "ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv",
        "ISIC2018_Task3_Training_LesionGroupings.csv",
    ]


def _write_isic2019(out: pathlib.Path, records: list[_Record]) -> list[str]:
    rows, meta = [], []
    for r in sorted(records, key=lambda r: r.image_id):
        rows.append([r.image_id, *_one_hot(_ONE_HOT_2019, r.dx.name)])
        age = r.meta["age_approx"]
        meta.append([r.image_id, _f1(float(age)) if age else "", r.meta["site"],
                     r.meta["lesion_id"], r.meta["sex"]])  # fmt: skip
    _write_csv(out / "ISIC_2019_Training_GroundTruth.csv", ["image", *_ONE_HOT_2019], rows)
    _write_csv(
        out / "ISIC_2019_Training_Metadata.csv",
        ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"],
        meta,
    )
    return ["ISIC_2019_Training_GroundTruth.csv", "ISIC_2019_Training_Metadata.csv"]


def _write_isic2020(
    out: pathlib.Path, records: list[_Record], duplicates: list[tuple[int, int]]
) -> list[str]:
    rows = []
    for r in sorted(records, key=lambda r: r.image_id):
        m = r.meta
        age = _f1(float(m["age_approx"])) if m["age_approx"] else ""
        mal = r.dx.status == _MAL
        rows.append([r.image_id, m["patient_id"], m["lesion_id"], m["sex"], age, m["site"],
                     r.dx.name, "malignant" if mal else "benign", "1" if mal else "0"])  # fmt: skip
    header = ["image_name", "patient_id", "lesion_id", "sex", "age_approx",
              "anatom_site_general_challenge", "diagnosis", "benign_malignant",
              "target"]  # fmt: skip
    _write_csv(out / "ISIC_2020_Training_GroundTruth_v2.csv", header, rows)
    pairs = sorted((records[a].image_id, records[b].image_id) for a, b in duplicates)
    _write_csv(out / "ISIC_2020_Training_Duplicates.csv", ["image_name_1", "image_name_2"],
               [list(p) for p in pairs])  # fmt: skip
    return ["ISIC_2020_Training_GroundTruth_v2.csv", "ISIC_2020_Training_Duplicates.csv"]


def _meta_2024(rec: _Record, rng: np.random.Generator) -> dict[str, str]:
    """Plausible values for the TBP lesion-visualizer columns (not tied to the image)."""
    u = rng.uniform
    mal = rec.dx.status == _MAL
    loc, loc_simple, site = _LOCATIONS_2024[int(rng.integers(0, len(_LOCATIONS_2024)))]
    attribution, license_ = _ATTRIBUTIONS_2024[int(rng.integers(0, len(_ATTRIBUTIONS_2024)))]
    L, Lext = u(25, 60), u(45, 75)
    A, Aext = u(12, 35), u(10, 28)
    Bc, Bext = u(18, 40), u(18, 35)
    area = u(3, 40)
    perim = math.sqrt(area) * u(3.6, 5.5)
    parts = rec.dx.name.split("::") + [""] * 5
    invasive = rec.dx.name.endswith("Melanoma Invasive")
    v = {
        "clin_size_long_diam_mm": f"{u(1, 12):.2f}",
        "image_type": "TBP tile: close-up",
        "tbp_tile_type": "3D: XP" if rng.random() < 0.6 else "3D: white",
        "tbp_lv_A": f"{A:.6g}", "tbp_lv_Aext": f"{Aext:.6g}",
        "tbp_lv_B": f"{Bc:.6g}", "tbp_lv_Bext": f"{Bext:.6g}",
        "tbp_lv_C": f"{math.hypot(A, Bc):.6g}", "tbp_lv_Cext": f"{math.hypot(Aext, Bext):.6g}",
        "tbp_lv_H": f"{math.degrees(math.atan2(Bc, A)):.6g}",
        "tbp_lv_Hext": f"{math.degrees(math.atan2(Bext, Aext)):.6g}",
        "tbp_lv_L": f"{L:.6g}", "tbp_lv_Lext": f"{Lext:.6g}",
        "tbp_lv_areaMM2": f"{area:.6g}", "tbp_lv_area_perim_ratio": f"{perim**2 / area:.6g}",
        "tbp_lv_color_std_mean": f"{u(0, 3) + (1.5 if mal else 0):.6g}",
        "tbp_lv_deltaA": f"{A - Aext:.6g}", "tbp_lv_deltaB": f"{Bc - Bext:.6g}",
        "tbp_lv_deltaL": f"{L - Lext:.6g}",
        "tbp_lv_deltaLB": f"{math.hypot(L - Lext, Bc - Bext):.6g}",
        "tbp_lv_deltaLBnorm": f"{u(4, 15):.6g}",
        "tbp_lv_eccentricity": f"{u(0.3, 0.95):.6g}",
        "tbp_lv_location": loc, "tbp_lv_location_simple": loc_simple,
        "tbp_lv_minorAxisMM": f"{u(1, 6):.6g}",
        "tbp_lv_nevi_confidence": f"{u(0, 100):.6g}",
        "tbp_lv_norm_border": f"{u(0, 10):.6g}", "tbp_lv_norm_color": f"{u(0, 10):.6g}",
        "tbp_lv_perimeterMM": f"{perim:.6g}",
        "tbp_lv_radial_color_std_max": f"{u(0, 3):.6g}",
        "tbp_lv_stdL": f"{u(0.5, 5):.6g}", "tbp_lv_stdLExt": f"{u(0.5, 4):.6g}",
        "tbp_lv_symm_2axis": f"{u(0.1, 0.8):.6g}",
        "tbp_lv_symm_2axis_angle": str(int(rng.integers(0, 36)) * 5),
        "tbp_lv_x": f"{u(-200, 200):.6g}", "tbp_lv_y": f"{u(0, 1600):.6g}",
        "tbp_lv_z": f"{u(-150, 150):.6g}",
        "attribution": attribution, "copyright_license": license_,
        "iddx_full": rec.dx.name,
        "iddx_1": parts[0], "iddx_2": parts[1], "iddx_3": parts[2], "iddx_4": parts[3],
        "iddx_5": parts[4],
        "mel_mitotic_index": str(rng.choice(["<1/mm^2", "1/mm^2", "2/mm^2"])) if invasive else "",
        "mel_thick_mm": f"{u(0.2, 1.5):.2f}" if invasive else "",
        "tbp_lv_dnn_lesion_confidence": f"{u(50, 100):.6g}",
        "site": site,
    }  # fmt: skip
    return v


def _write_isic2024(
    out: pathlib.Path, records: list[_Record], images: dict[str, bytes], hdf5_storage: str
) -> list[str]:
    import h5py  # only this release needs it

    rows = []
    for r in sorted(records, key=lambda r: r.image_id):
        m = r.meta
        age = _f1(float(m["age_approx"])) if m["age_approx"] else ""
        value = {**m, "isic_id": r.image_id, "target": "1" if r.dx.status == _MAL else "0",
                 "age_approx": age, "anatom_site_general": m["site"]}  # fmt: skip
        rows.append([value[c] for c in METADATA_2024_COLUMNS])
    _write_csv(out / "train-metadata.csv", METADATA_2024_COLUMNS, rows)
    path = out / "train-image.hdf5"
    if path.exists():
        path.unlink()
    # One scalar dataset per isic_id holding the encoded JPEG. "string": fixed-length bytes
    # (dtype |S<n>, reads back as numpy.bytes_, which is a bytes subclass), the layout the Kaggle
    # file appears to use; "opaque": np.void (dtype |V<n>). Both read with bytes(ds[()]).
    # track_times=False keeps the file byte-identical across runs.
    with h5py.File(path, "w", libver="earliest") as f:
        for image_id in sorted(images):
            data = images[image_id]
            value = np.asarray(data) if hdf5_storage == "string" else np.void(data)
            f.create_dataset(image_id, data=value, track_times=False)
    return ["train-image.hdf5", "train-metadata.csv"]


# Where each release keeps its image files (None: inside train-image.hdf5).
IMAGE_DIRS: dict[str, str | None] = {
    "archive": "",
    "isic2016": "ISBI2016_ISIC_Part3_Training_Data",
    "isic2017": "ISIC-2017_Training_Data",
    "isic2018": "ISIC2018_Task3_Training_Input",
    "isic2019": "ISIC_2019_Training_Input",
    "isic2020": "train",
    "isic2024": None,
}


def write_synthetic(
    output_dir: str | os.PathLike[str],
    fmt: str,
    num_images: int,
    seed: int,
    malignant_fraction: float | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    *,
    hdf5_storage: str = "string",
) -> dict[str, Any]:
    """Write a synthetic dataset in the official layout of release `fmt` under `output_dir`.

    Args:
      output_dir: folder to write into (created; existing files of the same names are replaced).
      fmt: one of FORMATS.
      num_images: number of images (isic2020: duplicates included).
      seed: everything is a function of (fmt, num_images, seed, malignant_fraction, image_size).
      malignant_fraction: share of malignant images (MALIGNANT[fmt] diagnoses), exact up to
        rounding; default DEFAULT_MALIGNANT_FRACTION. archive and isic2024 also get ~3 %
        Indeterminate images, taken from the benign share.
      image_size: longer image side in px (isic2024: side of the square tiles, 80-100 % of it).
      hdf5_storage: isic2024 only: "string" (|S<n> scalar) or "opaque" (np.void scalar).

    Returns:
      A JSON-serialisable summary: format, output_dir, num_images, label_counts
      ({"benign","malignant","indeterminate"}), diagnosis_counts, num_patients, num_lesions,
      duplicates (isic2020 pairs of image ids), metadata_files, image_dir, seconds, and records:
      one dict per image (image_id, diagnosis, status, patient_id, lesion_id, height, width) with
      the ids as written ("" where the release has no such column or the cell is empty).
    """
    start = time.perf_counter()
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if num_images < 1:
        raise ValueError("num_images must be >= 1")
    frac = DEFAULT_MALIGNANT_FRACTION if malignant_fraction is None else float(malignant_fraction)
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"malignant_fraction must be in [0, 1], got {frac}")
    if image_size < 16:
        raise ValueError("image_size must be >= 16")
    if hdf5_storage not in ("string", "opaque"):
        raise ValueError("hdf5_storage must be 'string' or 'opaque'")
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    # Independent streams: the plan, the metadata and every image, so that e.g. a metadata
    # change does not reshuffle pixels. The format is part of the seed.
    fmt_key = FORMATS.index(fmt)
    plan_rng = np.random.default_rng([seed, fmt_key, 0])
    meta_rng = np.random.default_rng([seed, fmt_key, 1])
    records, params, patients, duplicates = _plan(fmt, num_images, frac, image_size, plan_rng)
    num_lesions = len(params)

    # Metadata per release.
    if fmt == "archive":
        _archive_meta(records, patients, num_lesions, meta_rng)
    elif fmt == "isic2020":
        _common_meta(records, patients, num_lesions, meta_rng, _SITES_2020, _SITE_P_2020)
        for key, rate in (("age_approx", 0.01), ("sex", 0.01), ("site", 0.02)):
            _blank(records, key, meta_rng, rate)
        _sync_duplicates(records, duplicates)
    elif fmt == "isic2024":
        _common_meta(records, patients, num_lesions, meta_rng, ["x"], [1.0])
        for rec in records:
            rec.meta.update(_meta_2024(rec, meta_rng))
            # Only biopsied (strongly labelled) lesions have a lesion_id.
            if rec.dx.status == _BEN and rec.dx.name == "Benign" and meta_rng.random() < 0.85:
                rec.meta["lesion_id"] = ""
        for key, rate in (("age_approx", 0.01), ("sex", 0.03), ("site", 0.02)):
            _blank(records, key, meta_rng, rate)
    else:
        prefix = {"isic2018": "HAM", "isic2019": "BCN"}.get(fmt, "IL")
        _common_meta(records, patients, num_lesions, meta_rng, _SITES_ARCHIVE, _SITE_P, prefix)
        for rec in records:
            rec.meta["confirm"] = (
                "histopathology" if rec.dx.status == _MAL else str(meta_rng.choice(_CONFIRM_TYPES))
            )
        if fmt == "isic2019":
            for key, rate in (("age_approx", 0.02), ("sex", 0.02), ("site", 0.08),
                              ("lesion_id", 0.1)):  # fmt: skip
                _blank(records, key, meta_rng, rate)
        elif fmt == "isic2017":
            for key, rate in (("age_approx", 0.05), ("sex", 0.05)):
                _blank(records, key, meta_rng, rate)

    # Images: one generator per lesion (its look) and per image (its photo).
    image_dir = IMAGE_DIRS[fmt]
    folder = out / image_dir if image_dir else out
    folder.mkdir(parents=True, exist_ok=True)
    in_hdf5: dict[str, bytes] = {}
    encoded: dict[int, bytes] = {}
    with _single_threaded_blas():
        for i, rec in enumerate(records):
            if rec.duplicate_of >= 0:
                continue
            img_rng = np.random.default_rng([seed, fmt_key, 2, i])
            pixels = _render(
                params[rec.lesion],
                patients[rec.patient]["skin"],
                rec.h,
                rec.w,
                img_rng,
                dermoscopic=fmt != "isic2024",
            )
            encoded[i] = _encode_jpeg(pixels, JPEG_QUALITY if fmt != "isic2024" else 85)
    for i, rec in enumerate(records):
        data = encoded[rec.duplicate_of if rec.duplicate_of >= 0 else i]
        if image_dir is None:
            in_hdf5[rec.image_id] = data
        else:
            (folder / f"{rec.image_id}.jpg").write_bytes(data)
            if fmt == "isic2017":
                png = _superpixels_png(rec.h, rec.w)
                (folder / f"{rec.image_id}_superpixels.png").write_bytes(png)

    if fmt == "archive":
        files = _write_archive(out, records)
    elif fmt == "isic2016":
        files = _write_isic2016(out, records)
    elif fmt == "isic2017":
        files = _write_isic2017(out, records)
    elif fmt == "isic2018":
        _write_licence_files(folder)
        files = _write_isic2018(out, records)
    elif fmt == "isic2019":
        _write_licence_files(folder)
        files = _write_isic2019(out, records)
    elif fmt == "isic2020":
        files = _write_isic2020(out, records, duplicates)
    else:
        files = _write_isic2024(out, records, in_hdf5, hdf5_storage)

    has_patients = fmt in ("archive", "isic2020", "isic2024")
    has_lesions = fmt in ("archive", "isic2018", "isic2019", "isic2020", "isic2024")
    recs = []
    for r in sorted(records, key=lambda r: r.image_id):
        recs.append(
            {
                "image_id": r.image_id,
                "diagnosis": r.dx.name,
                "status": r.dx.status,
                "style": r.style,
                "patient_id": r.meta.get("patient_id", "") if has_patients else "",
                "lesion_id": r.meta.get("lesion_id", "") if has_lesions else "",
                "height": r.h,
                "width": r.w,
            }
        )
    status_counts = Counter(r.dx.status for r in records)
    return {
        "format": fmt,
        "output_dir": str(out),
        "image_dir": image_dir,
        "num_images": len(records),
        "seed": seed,
        "malignant_fraction": frac,
        "image_size": image_size,
        "label_counts": {s: int(status_counts.get(s, 0)) for s in (_BEN, _MAL, _IND)},
        "diagnosis_counts": {
            name: int(c) for name, c in sorted(Counter(r.dx.name for r in records).items())
        },
        "num_patients": len({r.patient for r in records}),
        "num_lesions": len({r.lesion for r in records}),
        "duplicates": [[records[a].image_id, records[b].image_id] for a, b in duplicates],
        "metadata_files": files,
        "seconds": time.perf_counter() - start,
        "records": recs,
    }
