"""The plan of a synthetic dataset: every image's diagnosis, lesion, patient, size and name, then
its metadata, as the release's entry (`Release.synth`) describes them.

Structure: images belong to lesions (1-4 images each; the images of one lesion share shape and
colours and differ by orientation, framing and lighting) and lesions to patients (several lesions
per patient, skin tone per patient), so that patient/lesion-grouped splits matter. Metadata has
missing values (empty cells). Class counts are exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from isic_jax.data.isic.layouts.synthspec import (
    BENIGN,
    INDETERMINATE,
    MALIGNANT,
    Diagnosis,
    SynthSpec,
)
from isic_jax.data.synth.lesions import PALETTE, LesionParams, lerp, lesion_params

INDETERMINATE_FRACTION = 0.03  # releases with Indeterminate diagnoses; taken from the benign share


@dataclasses.dataclass
class Record:
    """One image of the plan.

    lesion: index into the plan's lesions; patient: the hidden patient index; h, w: size in px.
    duplicate_of: index of the record whose bytes this one repeats (-1: none).
    meta: patient_id, lesion_id, age_approx, sex, site, then the release's own official columns.
    traits: its patient's traits (`SynthSpec.per_patient`), what `per_image` draws around.
    """

    image_id: str
    dx: Diagnosis
    style: str
    lesion: int
    patient: int
    h: int = 0
    w: int = 0
    duplicate_of: int = -1
    meta: dict[str, str] = dataclasses.field(default_factory=dict)
    traits: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Plan:
    """records: every image; lesions: the look of each lesion; patients: skin, age, sex each;
    duplicates: (original, copy) record index pairs."""

    records: list[Record]
    lesions: list[LesionParams]
    patients: list[dict[str, Any]]
    duplicates: list[tuple[int, int]]


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


def _status_counts(spec: SynthSpec, n: int, malignant_fraction: float) -> dict[str, int]:
    n_mal = int(round(malignant_fraction * n))
    n_ind = 0
    if any(d.status == INDETERMINATE for d in spec.diagnoses) and n - n_mal >= 10:
        n_ind = max(1, int(round(INDETERMINATE_FRACTION * n)))
    return {MALIGNANT: n_mal, INDETERMINATE: n_ind, BENIGN: n - n_mal - n_ind}


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


def _image_shape(rng: np.random.Generator, spec: SynthSpec, size: int) -> tuple[int, int]:
    """(height, width) of one image: longer side = size, aspect ratio varies; tiles: square."""
    if spec.tiles:
        side = int(round(size * rng.choice([1.0, 0.9, 0.8])))
        return side, side
    aspect = float(rng.choice([4 / 3, 3 / 2, 1.0, 3 / 4], p=[0.5, 0.25, 0.15, 0.1]))
    if aspect >= 1:
        return int(round(size / aspect)), size
    return size, int(round(size * aspect))


def _image_numbers(rng: np.random.Generator, spec: SynthSpec, n: int) -> list[int]:
    if spec.ids == "consecutive":
        return list(range(spec.first_id, spec.first_id + n))
    if spec.ids == "sparse":
        return _unique_ids(rng, n, 0, 10_000_000)
    return _unique_ids(rng, n, 0, max(n * 4, 100))  # dense from ISIC_0000000


def make_plan(spec: SynthSpec, n: int, frac: float, size: int, rng: np.random.Generator) -> Plan:
    """Decide every image: diagnosis, lesion, patient, size, name, duplicates."""
    status_n = _status_counts(spec, n, frac)
    n_dup = 0
    if spec.duplicate_share and n >= 10:
        n_dup = max(1, int(round(spec.duplicate_share * n)))
    # Per status: diagnosis counts; then lesions (1-4 images each) per diagnosis.
    lesions: list[tuple[Diagnosis, str, int]] = []  # (diagnosis, style, num_images)
    for status in (BENIGN, MALIGNANT, INDETERMINATE):
        group = [d for d in spec.diagnoses if d.status == status]
        total = status_n[status]
        if not group or total == 0:
            continue
        counts = _allocate(total, [d.weight for d in group], spec.every_class)
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
                "skin": lerp(PALETTE["skin_light"], PALETTE["skin_dark"], rng.beta(2, 5))
                * rng.uniform(0.96, 1.04, 3).astype(np.float32),
                "age": int(rng.integers(4, 18)) * 5,  # 20..85
                "sex": "male" if rng.random() < 0.52 else "female",
            }
        )
    params = [lesion_params(style, rng) for _, style, _ in lesions]

    records: list[Record] = []
    for li, (d, style, count) in enumerate(lesions):
        for _ in range(count):
            rec = Record("", d, style, li, int(lesion_patient[li]))
            rec.h, rec.w = _image_shape(rng, spec, size)
            records.append(rec)
    # Image ids: sorted numbers, shuffled onto records so lesions are not contiguous.
    ids = _image_numbers(rng, spec, n)
    perm = rng.permutation(n)
    for rec, j in zip(records, perm, strict=True):
        rec.image_id = f"ISIC_{ids[j]:07d}"
    if spec.id_suffix:
        for i in rng.choice(n, size=max(1, n // 50), replace=False):
            records[i].image_id += spec.id_suffix
    # Duplicates: record j repeats record i (same status, so counts stay exact).
    duplicates: list[tuple[int, int]] = []
    if n_dup:
        n_dup_mal = int(round(n_dup * status_n[MALIGNANT] / n))
        for status, k in ((BENIGN, n_dup - n_dup_mal), (MALIGNANT, n_dup_mal)):
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
    return Plan(records, params, patients, duplicates)


# ----------------------------------------------------------------------------- metadata


def _missing(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    """bool[n]: which cells are empty; at least one when n >= 10, so tests always see one."""
    miss = rng.random(n) < rate
    if n >= 10 and not miss.any():
        miss[int(rng.integers(0, n))] = True
    return miss


def _id_number(rng: np.random.Generator, prefix: str, n: int) -> list[str]:
    return [f"{prefix}_{x:07d}" for x in _unique_ids(rng, n, 0, 10_000_000)]


def _common_meta(spec: SynthSpec, plan: Plan, rng: np.random.Generator) -> None:
    """Fill rec.meta with patient_id, lesion_id, age_approx, sex and site (blanked later)."""
    records, patients, num_lesions = plan.records, plan.patients, len(plan.lesions)
    pids = _id_number(rng, "IP", len(patients))
    lids = _id_number(rng, spec.lesion_prefix, num_lesions)
    site_p = np.asarray(spec.site_p) / sum(spec.site_p)
    lesion_site = rng.choice(len(spec.sites), size=num_lesions, p=site_p)
    for rec in records:
        pat = patients[rec.patient]
        age = pat["age"] + 5 * int(rng.integers(-1, 2) if rng.random() < 0.2 else 0)
        rec.meta.update(
            patient_id=pids[rec.patient],
            lesion_id=lids[rec.lesion],
            age_approx=str(max(age, 5)),
            sex=pat["sex"],
            site=spec.sites[int(lesion_site[rec.lesion])],
        )


def _signal(spec: SynthSpec, plan: Plan, rng: np.random.Generator) -> None:
    """What makes the metadata learnable beyond the images: patients with a malignant lesion are
    somewhat older (`spec.age_shift`), and every patient gets traits (`spec.per_patient`) that
    its images' tabular values are drawn around. Drawn from their own stream, so that the ids,
    sites and empty cells stay what they were without it."""
    malignant = {r.patient for r in plan.records if r.dx.status == MALIGNANT}
    shift = {
        p: int(rng.choice(spec.age_shift)) if spec.age_shift and p in malignant else 0
        for p in range(len(plan.patients))
    }
    traits = [spec.per_patient(rng) if spec.per_patient else {} for _ in plan.patients]
    for rec in plan.records:
        rec.traits = traits[rec.patient]
        if shift[rec.patient]:
            rec.meta["age_approx"] = str(min(90, int(rec.meta["age_approx"]) + shift[rec.patient]))


def invent_metadata(
    spec: SynthSpec, plan: Plan, rng: np.random.Generator, signal_rng: np.random.Generator
) -> None:
    """Fills every record's `meta`: ids, age, sex and site, the metadata signal (`_signal`),
    the release's own columns (`spec.per_image`), empty cells (`spec.blanks`); a duplicate gets
    its original's values."""
    _common_meta(spec, plan, rng)
    _signal(spec, plan, signal_rng)
    if spec.per_image is not None:
        for rec in plan.records:
            rec.meta.update(spec.per_image(rec, rng))
    for key, rate in spec.blanks:
        for rec, miss in zip(plan.records, _missing(rng, len(plan.records), rate), strict=True):
            if miss:
                rec.meta[key] = ""
    for src, dst in plan.duplicates:
        plan.records[dst].meta = dict(plan.records[src].meta)
