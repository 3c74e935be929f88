"""Several prepared releases as one dataset: `config.data.release = "isic2019+isic2020"`.

    union = open_union(data_config, parts)       # parts: one `Part` per release, in that order
    train = union.source(union.train_folds(val_fold))
    union.summary                                # what was merged, what was removed

What the union is (built deterministically from the prepared records, in one pass over them,
images not decoded):
- One label map: `label` (benign/malignant) as each release has it; `diagnosis` in the common
  taxonomy (`labels.COMMON_CLASSES`: the ISIC 2019 classes plus "unknown"), each release's
  classes mapped by its entry (`Release.common`).
- An image in two releases (the same isic id, a `_downsampled` suffix ignored) is kept once, in
  the release named first; the others are removed and counted (`summary["duplicates"]`).
- `source`: every record says which release it comes from (the release name).
- Folds re-assigned over the union (`folds.assign_folds`): grouped by connected components of
  patient and lesion ids across releases (two examples share a group when they share a patient
  id or a lesion id; an example with neither is its own group), stratified by (source, label) and
  by the common diagnosis; `config.data.val_fold` picks one of these folds. The number of folds
  is `config.data.num_folds` when set, else the prepared datasets' own (when they agree), and the
  seed the first release's fold seed.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from isic_jax.data import pipeline
from isic_jax.data.isic import folds as folds_lib
from isic_jax.data.isic import labels as L
from isic_jax.data.isic.layouts import RELEASES as ENTRIES

DOWNSAMPLED = "_downsampled"  # ISIC 2019 names some images ISIC_xxxxxxx_downsampled


def canonical_id(image_id: str) -> str:
    """The isic id an image goes by in every release (ISIC 2019's `_downsampled` dropped)."""
    return image_id.removesuffix(DOWNSAMPLED)


@dataclasses.dataclass
class Part:
    """One release of the union: its name, its records (every prepared fold, as record dicts),
    the diagnosis class names stored in it, its number of folds and fold seed."""

    name: str
    source: Any
    diagnosis_classes: Sequence[str]
    num_folds: int
    fold_seed: int = 0

    def common_map(self) -> np.ndarray:
        """int32 [C_release]: stored diagnosis index -> index in COMMON_CLASSES."""
        entry = ENTRIES[self.name]
        return np.array(
            [L.COMMON_CLASSES.index(entry.common_class(c)) for c in self.diagnosis_classes],
            np.int32,
        )


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        parent = self.parent.setdefault(x, x)
        while parent != x:
            grand = self.parent[parent]
            self.parent[x] = grand  # path halving
            x, parent = parent, grand
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller key names the component: independent of the visiting order
            lo, hi = sorted((ra, rb))
            self.parent[hi] = lo


def group_keys(patient_ids: Sequence[str], lesion_ids: Sequence[str], image_ids: Sequence[str]
               ) -> list[str]:  # fmt: skip
    """The fold group of each example: the connected component of its patient and lesion ids
    (shared ids link examples across releases); "image:<id>" when it has neither."""
    uf = _UnionFind()
    keys: list[list[str]] = []
    for pid, lid, iid in zip(patient_ids, lesion_ids, image_ids, strict=True):
        own = [k for k in (f"patient:{pid}" if pid else "", f"lesion:{lid}" if lid else "") if k]
        own = own or [f"image:{iid}"]
        for k in own[1:]:
            uf.union(own[0], k)
        uf.find(own[0])
        keys.append(own)
    return [uf.find(k[0]) for k in keys]


class UnionSource:
    """Random-access records of some examples of the union (`pipeline.RandomAccessSource`).

    Each record is its release's record with `diagnosis` in the common taxonomy, `fold` the
    union fold, and `source` the release name. Picklable (Grain workers).
    """

    def __init__(self, union: Union, rows: np.ndarray):
        self._sources = [p.source for p in union.parts]
        self._maps = [p.common_map() for p in union.parts]
        self._names = [p.name.encode() for p in union.parts]
        self._release = union.release[rows]
        self._record = union.record[rows]
        self._fold = union.fold[rows]
        self.labels = union.label[rows]
        self.diagnoses = union.diagnosis[rows]

    def __len__(self) -> int:
        return len(self._record)

    def _fix(self, record: Mapping[str, Any], i: int) -> dict[str, Any]:
        out = dict(record)
        r = int(self._release[i])
        out["diagnosis"] = int(self._maps[r][int(record["diagnosis"])])
        out["fold"] = int(self._fold[i])
        out["source"] = self._names[r]
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        r, j = int(self._release[index]), int(self._record[index])
        return self._fix(self._sources[r][j], index)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        out: list[Any] = [None] * len(indices)
        by_release: dict[int, list[int]] = {}
        for k, i in enumerate(indices):
            by_release.setdefault(int(self._release[i]), []).append(k)
        for r, ks in by_release.items():
            source = self._sources[r]
            wanted = [int(self._record[indices[k]]) for k in ks]
            getitems = getattr(source, "__getitems__", None)
            records = getitems(wanted) if getitems else [source[j] for j in wanted]
            for k, rec in zip(ks, records, strict=True):
                out[k] = self._fix(rec, indices[k])
        return out

    def __repr__(self) -> str:
        return f"UnionSource({b'+'.join(self._names).decode()}, len={len(self)})"


@dataclasses.dataclass
class Union:
    """The union's index: one row per kept example (release index, record index in that
    release's source, label, common diagnosis, union fold), and what was merged."""

    parts: list[Part]
    release: np.ndarray  # int32 [N]
    record: np.ndarray  # int64 [N]
    label: np.ndarray  # int32 [N]
    diagnosis: np.ndarray  # int32 [N], index in COMMON_CLASSES
    fold: np.ndarray  # int32 [N]
    num_folds: int
    summary: dict[str, Any]

    @property
    def name(self) -> str:
        return "+".join(p.name for p in self.parts)

    def rows(self, folds: Sequence[int]) -> np.ndarray:
        """The union rows in `folds`, in a fixed order (release, then record)."""
        return np.flatnonzero(np.isin(self.fold, list(folds)))

    def source(self, folds: Sequence[int]) -> UnionSource:
        return UnionSource(self, self.rows(folds))


def open_union(parts: Sequence[Part], *, num_folds: int | None = None,
               fold_seed: int | None = None) -> Union:  # fmt: skip
    """Merges the releases `parts` (in that order; see the module docstring).

    Raises:
      ValueError: the parts disagree on their number of folds and `num_folds` is not given, or
        the union has fewer patient/lesion/image groups than folds.
    """
    names = [p.name for p in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"a release is named twice in {'+'.join(names)}")
    if num_folds is None:
        counts = sorted({p.num_folds for p in parts})
        if len(counts) != 1:
            raise ValueError(
                f"the prepared releases have different numbers of folds "
                f"({', '.join(f'{p.name}: {p.num_folds}' for p in parts)}): set "
                "config.data.num_folds for the union"
            )
        num_folds = counts[0]
    seed = parts[0].fold_seed if fold_seed is None else fold_seed

    text = lambda v: v.decode() if isinstance(v, bytes) else str(v)
    fields = lambda r: (text(r["image_id"]), text(r["patient_id"]), text(r["lesion_id"]),
                        int(r["label"]), int(r["diagnosis"]))  # fmt: skip
    seen: dict[str, str] = {}  # canonical id -> the release that keeps it
    duplicates: Counter[tuple[str, str]] = Counter()
    examples: list[dict[str, Any]] = []
    for r, part in enumerate(parts):
        common = part.common_map()
        for j, (iid, pid, lid, label, dx) in enumerate(pipeline.read_fields(part.source, fields)):
            key = canonical_id(iid)
            if key in seen:
                duplicates[(seen[key], part.name)] += 1
                continue
            seen[key] = part.name
            examples.append({"release": r, "record": j, "image_id": iid, "patient_id": pid,
                             "lesion_id": lid, "label": label, "diagnosis": int(common[dx])})
    groups = group_keys([e["patient_id"] for e in examples], [e["lesion_id"] for e in examples],
                        [e["image_id"] for e in examples])  # fmt: skip
    label = np.array([e["label"] for e in examples], np.int32)
    release = np.array([e["release"] for e in examples], np.int32)
    diagnosis = np.array([e["diagnosis"] for e in examples], np.int32)
    fold = folds_lib.assign_folds(
        groups, label + 2 * release, num_folds, diagnoses=diagnosis, seed=seed
    )  # stratified by (source, label): every fold holds its share of each release's positives
    per_source = Counter(names[r] for r in release)
    summary = {
        "releases": names,
        "num_examples": len(examples),
        "examples_per_source": {n: per_source.get(n, 0) for n in names},
        "num_duplicates_removed": sum(duplicates.values()),
        "duplicates": [{"kept_in": a, "removed_from": b, "count": n}
                       for (a, b), n in sorted(duplicates.items())],  # fmt: skip
        "num_groups": len(set(groups)),
        "num_folds": num_folds,
        "fold_seed": seed,
        "fold_sizes": np.bincount(fold, minlength=num_folds).tolist(),
    }
    return Union(
        parts=list(parts),
        release=release,
        record=np.array([e["record"] for e in examples], np.int64),
        label=label,
        diagnosis=diagnosis,
        fold=fold,
        num_folds=num_folds,
        summary=summary,
    )


def describe(summary: Mapping[str, Any]) -> str:
    """One line for the console: sizes per source and the duplicates removed."""
    sizes = " + ".join(f"{n} {s}" for s, n in summary["examples_per_source"].items())
    return (
        f"releases {'+'.join(summary['releases'])}: {sizes} = {summary['num_examples']} "
        f"examples after removing {summary['num_duplicates_removed']} images found in two "
        f"releases (kept in the one named first); {summary['num_folds']} folds re-assigned over "
        f"{summary['num_groups']} patient/lesion groups"
    )
