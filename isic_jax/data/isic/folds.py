"""Deterministic K-fold assignment, grouped (no group in two folds) and stratified.

Groups are patients (else lesions, else single images: see `Candidate.group`). The assignment is a
greedy balance, like longest-processing-time scheduling:

1. Every group is summarised by its counts per stratum: each label value and, as a secondary
   view, each diagnosis value.
2. Groups are visited rarest-first: by the largest share of any stratum total that they hold
   (a patient with 3 of the 10 melanomas comes before a patient with 50 of 5000 nevi), ties broken
   by a salted hash of the group key, so the order is fixed but not alphabetical.
3. Each group goes to the fold that, for the strata the group has, is the least filled relative to
   the stratum totals; ties go to the fold with the fewest examples, then the lowest index.

It depends only on (group key, label, diagnosis) of each example, the number of folds and the seed:
the same inputs give the same folds on any machine, in any order. A fold gets an example only from
groups, so with at least K groups no fold is empty. Per stratum, fold counts differ by about the
size of the largest group of that stratum.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def _salted_hash(seed: int, key: str) -> bytes:
    return hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()


def assign_folds(
    groups: Sequence[str],
    labels: Sequence[int],
    num_folds: int,
    *,
    diagnoses: Sequence[int] | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Fold index of every example.

    Args:
      groups: [N] group key per example (examples of one group share a fold).
      labels: [N] int label per example (the primary stratification).
      num_folds: K >= 2.
      diagnoses: optional [N] int, a secondary stratification.
      seed: salts the tie-breaking order.

    Returns:
      int32 array [N] with values in [0, K).

    Raises:
      ValueError: fewer than K distinct groups, or mismatched lengths.
    """
    n = len(groups)
    if len(labels) != n or (diagnoses is not None and len(diagnoses) != n):
        raise ValueError("groups, labels and diagnoses must have the same length")
    if num_folds < 2:
        raise ValueError(f"num_folds must be >= 2, got {num_folds}")

    # Strata: ("label", value) and ("diagnosis", value), numbered densely.
    strata: dict[tuple[str, int], int] = {}
    example_strata: list[tuple[int, ...]] = []
    for i in range(n):
        keys = [("label", int(labels[i]))]
        if diagnoses is not None:
            keys.append(("diagnosis", int(diagnoses[i])))
        example_strata.append(tuple(strata.setdefault(k, len(strata)) for k in keys))

    group_counts: dict[str, dict[int, int]] = {}
    group_sizes: dict[str, int] = {}
    for key, ids in zip(groups, example_strata, strict=True):
        counts = group_counts.setdefault(key, {})
        for s in ids:
            counts[s] = counts.get(s, 0) + 1
        group_sizes[key] = group_sizes.get(key, 0) + 1
    if len(group_counts) < num_folds:
        raise ValueError(
            f"only {len(group_counts)} distinct patient/lesion/image groups: cannot make "
            f"{num_folds} folds without putting a group in two folds (use fewer folds)"
        )

    totals = np.zeros(len(strata), np.float64)
    for counts in group_counts.values():
        for s, c in counts.items():
            totals[s] += c

    def priority(key: str) -> tuple[float, int, bytes]:
        share = max(c / totals[s] for s, c in group_counts[key].items())
        return (-share, -group_sizes[key], _salted_hash(seed, key))

    fill = np.zeros((num_folds, len(strata)), np.float64)  # examples per fold and stratum
    sizes = np.zeros(num_folds, np.int64)
    fold_of: dict[str, int] = {}
    for key in sorted(group_counts, key=priority):
        counts = group_counts[key]
        ids = np.fromiter(counts.keys(), np.int64)
        weights = np.fromiter(counts.values(), np.float64)
        score = (fill[:, ids] / totals[ids]) @ weights  # [K]: how full, for this group's strata
        best = min(range(num_folds), key=lambda f: (score[f], sizes[f], f))
        fold_of[key] = best
        fill[best, ids] += weights
        sizes[best] += group_sizes[key]
    return np.array([fold_of[g] for g in groups], np.int32)


def fold_names(num_folds: int) -> list[str]:
    """["fold0", ..., "fold{K-1}"]: the split names of a prepared dataset."""
    return [f"fold{k}" for k in range(num_folds)]


def train_val_splits(num_folds: int, val_fold: int) -> tuple[str, str]:
    """TFDS split strings (train, validation) for `config.data.val_fold`.

    Example: train_val_splits(5, 1) == ("fold0+fold2+fold3+fold4", "fold1").
    """
    if not 0 <= val_fold < num_folds:
        raise ValueError(f"val_fold must be in [0, {num_folds}), got {val_fold}")
    names = fold_names(num_folds)
    return "+".join(n for k, n in enumerate(names) if k != val_fold), names[val_fold]
