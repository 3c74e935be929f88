"""Subgroups of a split (anatomic site, sex, age band, Fitzpatrick skin type) and their AUCs.

    groups = subgroup_members(metadata, n)         # {variable: {group: bool[N]}}
    breakdown = subgroup_auc(is_malignant, score, metadata)

Dermatology reporting checklists ask for results by subgroup, skin type included; a variable is
reported only when the split records it (a variable whose values are all unknown is left out).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from isic_jax import metrics as isic_metrics
from isic_jax.data.isic import labels
from isic_jax.utils import to_json_compatible, to_str

SEX_NAMES: tuple[str, ...] = tuple(labels.SEX_NAMES)
AGE_BANDS: tuple[str, ...] = ("<30", "30-44", "45-59", "60-74", "75+", "unknown")
FITZPATRICK_TYPES: tuple[str, ...] = ("I", "II", "III", "IV", "V", "VI")
_AGE_EDGES = (30, 45, 60, 75)
UNKNOWN = "unknown"
# Metadata keys (Predictions fields) -> reported variable, in report order.
VARIABLES: tuple[tuple[str, str], ...] = (
    ("anatom_site", "anatom_site"),
    ("sex", "sex"),
    ("age", "age_band"),
    ("fitzpatrick", "fitzpatrick"),
    ("source", "source"),
)
TITLES = {
    "anatom_site": "Anatomic site",
    "sex": "Sex",
    "age_band": "Age band (years)",
    "fitzpatrick": "Fitzpatrick skin type",
    "source": "Source release",
}


def age_bands(age: Any) -> np.ndarray:
    """int[N] ages in years (-1 or any negative = missing) -> str[N] of AGE_BANDS."""
    a = np.asarray(age).reshape(-1).astype(np.int64)
    band = np.searchsorted(np.asarray(_AGE_EDGES), a, side="right")
    names = np.asarray(AGE_BANDS[:-1], dtype=object)[band]
    return np.where(a < 0, UNKNOWN, names).astype(object)


def as_names(values: Any) -> np.ndarray:
    """str/bytes[N] -> object[N] of str; "" becomes "unknown"."""
    return np.asarray([s.strip() or UNKNOWN for s in to_str(np.asarray(values).reshape(-1))],
                      dtype=object)


def _sex_names(sex: Any) -> np.ndarray:
    s = np.asarray(sex).reshape(-1)
    if s.dtype.kind in "iu":
        idx = np.where((s >= 0) & (s < len(SEX_NAMES)), s, 0)
        return np.asarray(SEX_NAMES, dtype=object)[idx]
    return as_names(s)


def fitzpatrick_names(values: Any) -> np.ndarray:
    """Fitzpatrick skin types as the metadata writes them ("I".."VI", "II", "fst3", "3", "") ->
    object[N] of FITZPATRICK_TYPES or "unknown"."""
    roman = {str(i + 1): t for i, t in enumerate(FITZPATRICK_TYPES)}
    out = []
    for raw in to_str(np.asarray(values).reshape(-1)):
        v = raw.strip().upper().removeprefix("FST").removeprefix("TYPE").strip()
        out.append(v if v in FITZPATRICK_TYPES else roman.get(v, UNKNOWN))
    return np.asarray(out, dtype=object)


def hanley_mcneil_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUC (Hanley & McNeil 1982); NaN when undefined.

    Closed form and approximate (it assumes exponential-like score distributions); kept beside the
    bootstrap interval for groups the bootstrap cannot cover.
    """
    if not math.isfinite(auc) or n_pos == 0 or n_neg == 0:
        return math.nan
    q1 = auc / (2.0 - auc)
    q2 = 2.0 * auc * auc / (1.0 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (
        n_pos * n_neg
    )
    return math.sqrt(max(var, 0.0))


def group_order(variable: str, names: np.ndarray) -> list[str]:
    """The groups of a variable in report order (bands and types in order, sites by size)."""
    present = set(names.tolist())
    if variable == "age_band":
        return [b for b in AGE_BANDS if b in present]
    if variable == "fitzpatrick":
        return [t for t in (*FITZPATRICK_TYPES, UNKNOWN) if t in present]
    if variable == "sex":
        return [s for s in ("female", "male", UNKNOWN) if s in present] + sorted(
            present - {"female", "male", UNKNOWN}
        )
    # Largest groups first, unknown last.
    counts = {g: int(np.sum(names == g)) for g in present}
    known = sorted(present - {UNKNOWN}, key=lambda g: (-counts[g], g))
    return known + ([UNKNOWN] if UNKNOWN in present else [])


def ordered(breakdown: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """A `subgroup_auc` result in report order (VARIABLES, then `group_order`), e.g. after a
    round trip through metrics.json, whose keys are written sorted."""
    rank = {variable: k for k, (_, variable) in enumerate(VARIABLES)}
    out: dict[str, dict[str, Any]] = {}
    for variable in sorted(breakdown, key=lambda v: (rank.get(v, len(rank)), v)):
        groups = breakdown[variable]
        names = np.asarray(list(groups), dtype=object)
        if variable in ("age_band", "fitzpatrick", "sex"):
            order = group_order(variable, names)
        else:  # by size, unknown last (as group_order, from the counts recorded)
            known = sorted((g for g in groups if g != UNKNOWN),
                           key=lambda g: (-int(groups[g].get("n") or 0), g))
            order = known + ([UNKNOWN] if UNKNOWN in groups else [])
        out[variable] = {g: groups[g] for g in order}
    return out


def subgroup_variables(metadata: Mapping[str, Any] | None, n: int) -> dict[str, np.ndarray]:
    """{variable: object[N] group of each image} for the variables the data has (not all
    unknown), in VARIABLES order."""
    if not metadata:
        return {}
    convert = {"anatom_site": as_names, "sex": _sex_names, "age": age_bands,
               "fitzpatrick": fitzpatrick_names, "source": as_names}
    out: dict[str, np.ndarray] = {}
    for key, variable in VARIABLES:
        if metadata.get(key) is None:
            continue
        names = convert[key](metadata[key])
        if names.shape[0] != n:
            raise ValueError(f"metadata[{key!r}] has {names.shape[0]} values for {n} images")
        if np.all(names == UNKNOWN):  # the release does not record it
            continue
        if variable == "source" and len(set(names.tolist())) < 2:
            continue  # one release: nothing to compare
        out[variable] = names
    return out


def subgroup_members(
    metadata: Mapping[str, Any] | None, n: int
) -> dict[str, dict[str, np.ndarray]]:
    """{variable: {group: bool[N] members}}, groups in `group_order`."""
    return {
        variable: {group: names == group for group in group_order(variable, names)}
        for variable, names in subgroup_variables(metadata, n).items()
    }


def subgroup_auc(
    labels: Any,
    scores: Any,
    metadata: Mapping[str, Any] | None,
    intervals: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """AUC of the malignant score within each anatomic site, sex, age band and skin type.

    Args:
      labels: {0,1}[N], 1 = malignant.
      scores: f[N] malignant score.
      metadata: {"sex": int32[N] (index in SEX_NAMES), "age": int32[N] (-1 missing),
        "anatom_site": str[N] ("unknown"/"" missing), "fitzpatrick": str[N] ("" missing),
        "patient_id": str[N] ("" missing)}, any key optional, or None. A variable whose values
        are all unknown is left out.
      intervals: bootstrap intervals keyed "variable/group" (`bootstrap.group_auc_fn`), or None.

    Returns:
      JSON-ready {variable: {group: {n, num_malignant, num_patients, auc, auc_ci, auc_se}}} with
      variable in ("anatom_site", "sex", "age_band", "fitzpatrick"); auc (`metrics.roc_auc`),
      auc_ci ([low, high] of the bootstrap, None without intervals) and auc_se (Hanley-McNeil)
      are None where the group holds one class only; num_patients is None without patient ids.
    """
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    s = np.asarray(scores, np.float64).reshape(-1)
    pids = None
    if metadata is not None and metadata.get("patient_id") is not None:
        pids = as_names(metadata["patient_id"])
        if np.all(pids == UNKNOWN):  # the release records no patients
            pids = None
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for variable, members in subgroup_members(metadata, y.size).items():
        groups: dict[str, dict[str, Any]] = {}
        for group, sel in members.items():
            n_pos, n = int(y[sel].sum()), int(sel.sum())
            auc = isic_metrics.roc_auc(y[sel], s[sel])
            num_patients = None
            if pids is not None:
                num_patients = len({p for p in pids[sel] if p != UNKNOWN})
            ci = (intervals or {}).get(f"{variable}/{group}")
            groups[group] = {
                "n": n,
                "num_malignant": n_pos,
                "num_patients": num_patients,
                "auc": auc,
                "auc_ci": ci if ci is not None and math.isfinite(auc) else None,
                "auc_se": hanley_mcneil_se(auc, n_pos, n - n_pos),
            }
        result[variable] = groups
    return to_json_compatible(result)
