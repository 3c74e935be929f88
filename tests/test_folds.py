"""Fold assignment: grouped (no patient in two folds), stratified, deterministic."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from isic_jax.data.isic import folds


def _isic2020_like(seed: int = 0, n: int = 3000, patients: int = 300):
    rng = np.random.default_rng(seed)
    patient = rng.integers(0, patients, n)
    labels = (rng.random(n) < 0.05).astype(int)
    diagnoses = np.where(labels == 1, 1, rng.choice([0, 2, 6], n, p=[0.8, 0.15, 0.05]))
    groups = [f"patient:{p}" for p in patient]
    return groups, labels, diagnoses


def test_no_group_in_two_folds_and_all_folds_used():
    groups, labels, diagnoses = _isic2020_like()
    fold = folds.assign_folds(groups, labels, 5, diagnoses=diagnoses)
    assert fold.dtype == np.int32 and fold.shape == (len(groups),)
    seen = collections.defaultdict(set)
    for g, f in zip(groups, fold, strict=True):
        seen[g].add(int(f))
    assert all(len(s) == 1 for s in seen.values())
    assert set(fold.tolist()) == set(range(5))


def test_stratified_by_label_within_the_largest_group():
    groups, labels, diagnoses = _isic2020_like()
    fold = folds.assign_folds(groups, labels, 5, diagnoses=diagnoses)
    for c in (0, 1):
        per_fold = np.bincount(fold[labels == c], minlength=5)
        biggest = max(collections.Counter(np.array(groups)[labels == c]).values())
        assert per_fold.max() - per_fold.min() <= biggest, (c, per_fold, biggest)
    # Malignant share per fold close to the overall share.
    share = [labels[fold == k].mean() for k in range(5)]
    assert max(share) - min(share) < 0.02


def test_singleton_groups_are_balanced_to_one_example():
    labels = np.array([1] * 114 + [0] * 286)
    fold = folds.assign_folds([f"image:{i}" for i in range(400)], labels, 5)
    for c in (0, 1):
        per_fold = np.bincount(fold[labels == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1


def test_deterministic_and_independent_of_input_order():
    groups, labels, diagnoses = _isic2020_like(seed=3)
    a = folds.assign_folds(groups, labels, 5, diagnoses=diagnoses)
    b = folds.assign_folds(groups, labels, 5, diagnoses=diagnoses)
    assert (a == b).all()
    perm = np.random.default_rng(1).permutation(len(groups))
    c = folds.assign_folds([groups[i] for i in perm], labels[perm], 5, diagnoses=diagnoses[perm])
    assert (c == a[perm]).all()
    other_seed = folds.assign_folds(groups, labels, 5, diagnoses=diagnoses, seed=1)
    assert (other_seed != a).any()


def test_too_few_groups_is_an_error():
    with pytest.raises(ValueError, match="only 3 distinct"):
        folds.assign_folds(["a", "a", "b", "c"], [0, 1, 0, 1], 5)
    with pytest.raises(ValueError, match="num_folds"):
        folds.assign_folds(["a", "b"], [0, 1], 1)


def test_split_names_for_a_validation_fold():
    assert folds.fold_names(3) == ["fold0", "fold1", "fold2"]
    assert folds.train_val_splits(5, 1) == ("fold0+fold2+fold3+fold4", "fold1")
    with pytest.raises(ValueError):
        folds.train_val_splits(5, 5)
