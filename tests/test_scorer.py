"""isic_jax.metrics against the official scorers.

- `isic-challenge-scoring` (the ISIC challenge platform's scorer; in the test extra): per-class
  sensitivity, specificity, accuracy, PPV, NPV, AUC, its raw `auc_sens_80` and average precision,
  and balanced multiclass accuracy with argmax ties counted wrong, on random and tied inputs.
- ISIC 2024: the Kaggle pAUC at other minimum TPRs, and the top-15 retrieval sensitivity per
  patient against a pandas transcription of the challenge's secondary-prize script.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore

from isic_jax import metrics

# The scorer's own deprecated pandas calls (Series.rename(inplace=...)) under pandas 3.
pytestmark = pytest.mark.filterwarnings("ignore:The inplace keyword:DeprecationWarning",
                                        "ignore::FutureWarning")

# The scorer's per-category columns that isic_jax also reports (under these names).
_COLUMNS = {"sensitivity": "sensitivity", "specificity": "specificity", "accuracy": "accuracy",
            "ppv": "ppv", "npv": "npv", "auc": "auc", "auc_sens_80": "auc_sens_80",
            "ap": "average_precision"}


def _official(labels: np.ndarray, probs: np.ndarray) -> ClassificationScore:
    """The scorer on one-hot ground truth and the probabilities, unit weights."""
    cats = [f"c{i}" for i in range(probs.shape[1])]
    truth = pd.DataFrame(np.eye(probs.shape[1])[labels], columns=cats)
    pred = pd.DataFrame(probs, columns=cats)
    weights = pd.DataFrame({"score_weight": np.ones(len(labels)),
                            "validation_weight": np.ones(len(labels))})
    return ClassificationScore(truth, pred, weights, ClassificationMetric.BALANCED_ACCURACY)


def _inputs(seed: int, n: int, num_classes: int, tied: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    logits = rng.normal(0, 1, (n, num_classes)) + 1.5 * np.eye(num_classes)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    if tied:
        # Coarse probabilities: ties within classes (ROC steps) and argmax ties across them,
        # and some rows at exactly 0.5 (the scorer's decision is "> 0.5").
        probs = np.round(probs * 4) / 4
        probs[: n // 10] = 1.0 / num_classes
        if num_classes == 2:
            probs[n // 10 : n // 5] = 0.5
    return labels, probs


@pytest.mark.parametrize(
    "seed, n, num_classes, tied",
    [(0, 200, 2, False), (1, 150, 2, True), (2, 300, 3, False), (3, 300, 3, True),
     (4, 400, 7, False), (5, 400, 7, True), (6, 60, 8, True)],
)
def test_per_class_metrics_match_isic_challenge_scoring(seed, n, num_classes, tied) -> None:
    labels, probs = _inputs(seed, n, num_classes, tied)
    official = _official(labels, probs).per_category
    ours = metrics.per_class_scores(labels, probs)
    checked = 0
    for c, row in enumerate(ours):
        theirs = official.loc[f"c{c}"]
        for col, key in _COLUMNS.items():
            mine = row[key]
            if isinstance(mine, float) and math.isnan(mine):
                # Undefined here (0/0, or one class): the scorer gives its 1.0 "freebie" for
                # ratios; its AUCs raise or are NaN in that case.
                if key in ("sensitivity", "specificity", "ppv", "npv"):
                    assert theirs[col] == 1.0, (c, col)
                continue
            assert mine == pytest.approx(float(theirs[col]), abs=1e-12), (c, col)
            checked += 1
    assert checked >= len(ours) * 6  # most values are defined: the comparison is not vacuous


@pytest.mark.parametrize("seed, num_classes", [(0, 2), (1, 3), (2, 7), (3, 8)])
def test_balanced_accuracy_with_ties_matches_isic_challenge_scoring(seed, num_classes) -> None:
    labels, probs = _inputs(seed, 240, num_classes, tied=True)
    ties = np.sum((probs == probs.max(axis=1, keepdims=True)).sum(axis=1) > 1)
    assert ties > 20  # the rule "a tie is wrong" is exercised
    theirs = float(_official(labels, probs).aggregate["balanced_accuracy"])
    assert metrics.balanced_multiclass_accuracy(labels, probs) == pytest.approx(theirs, abs=1e-12)
    # Counting ties as the first maximum (plain argmax) would give another number here.
    plain = np.mean([np.mean(probs[labels == c].argmax(axis=1) == c)
                     for c in np.unique(labels)])
    assert abs(plain - theirs) > 1e-3


def test_auc_sens_80_is_not_the_kaggle_pauc() -> None:
    labels, probs = _inputs(0, 400, 2, tied=False)
    score = probs[:, 1]
    raw = metrics.auc_above_sensitivity(labels, score, 0.8)
    kaggle = metrics.partial_auc_above_tpr(labels, score, 0.8)
    assert raw == pytest.approx(float(_official(labels, probs).per_category.loc["c1",
                                                                              "auc_sens_80"]))
    # The scorer's is the whole area under the curve right of where TPR reaches 0.8; the Kaggle
    # metric subtracts the 0.8-high band under it: both bounds hold and they differ.
    assert 0.0 <= kaggle <= 0.2 and kaggle < raw <= 1.0
    # Chance: (1 - 0.8^2) / 2 = 0.18 raw, 0.02 Kaggle.
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 50_000)
    s = rng.random(y.size)
    assert metrics.auc_above_sensitivity(y, s) == pytest.approx(0.18, abs=0.005)
    assert metrics.partial_auc_above_tpr(y, s) == pytest.approx(0.02, abs=0.003)


def _kaggle_pauc(y: np.ndarray, s: np.ndarray, min_tpr: float) -> float:
    """The ISIC 2024 Kaggle metric, transcribed step by step (flip, roc_curve, interpolate)."""
    from sklearn.metrics import auc, roc_curve

    max_fpr = abs(1 - min_tpr)
    fpr, tpr, _ = roc_curve(np.abs(np.asarray(y) - 1), -1.0 * np.asarray(s))
    stop = np.searchsorted(fpr, max_fpr, "right")
    x_interp, y_interp = [fpr[stop - 1], fpr[stop]], [tpr[stop - 1], tpr[stop]]
    tpr = np.append(tpr[:stop], np.interp(max_fpr, x_interp, y_interp))
    fpr = np.append(fpr[:stop], max_fpr)
    return float(auc(fpr, tpr))


@pytest.mark.parametrize("min_tpr", [0.5, 0.8, 0.88, 0.95])
@pytest.mark.parametrize("tied", [False, True])
def test_kaggle_pauc_with_configurable_min_tpr(min_tpr, tied) -> None:
    labels, probs = _inputs(int(min_tpr * 100), 500, 2, tied)
    score = probs[:, 1]
    want = _kaggle_pauc(labels, score, min_tpr)
    assert metrics.partial_auc_above_tpr(labels, score, min_tpr) == pytest.approx(want, abs=1e-12)
    result = metrics.classification_metrics(probs, labels, ["benign", "malignant"],
                                            malignant_classes=[1], pauc_min_tpr=min_tpr)
    assert result["pauc"] == pytest.approx(want, abs=1e-12) and result["pauc_min_tpr"] == min_tpr
    assert result["pauc_80"] == pytest.approx(_kaggle_pauc(labels, score, 0.8), abs=1e-12)


def _official_top_n(y: np.ndarray, s: np.ndarray, pids: np.ndarray, top_n: int) -> float:
    """ISIC 2024 secondary prize (SecondaryMetric-TopNSensitivity.py), transcribed: patients
    with a malignancy, each patient's top-n scores, found / all malignancies."""
    data = pd.DataFrame({"patient_id": pids, "target": y, "score": s})
    per_patient = data.groupby("patient_id")["target"].sum()
    data = data[data.patient_id.isin(set(per_patient[per_patient > 0].index))]
    top = data.groupby("patient_id", group_keys=False).apply(
        lambda x: x.nlargest(top_n, "score"))
    return float(top["target"].sum() / data["target"].sum())


@pytest.mark.parametrize("seed, k", [(0, 15), (1, 15), (2, 3), (3, 1)])
def test_top_k_retrieval_sensitivity_matches_the_challenge_script(seed, k) -> None:
    rng = np.random.default_rng(seed)
    pids = np.asarray([f"IP_{i:03d}" for i in rng.integers(0, 40, 900)])
    y = (rng.random(900) < 0.05).astype(int)
    s = np.round(rng.normal(0, 1, 900) + 1.5 * y, 1)  # ties inside patients
    ours = metrics.top_k_retrieval_sensitivity(y, s, pids, k)
    assert ours["sensitivity"] == pytest.approx(_official_top_n(y, s, pids, k), abs=1e-12)
    assert ours["num_malignant"] == int(y.sum()) and ours["k"] == k
    assert 0 < ours["num_found"] <= ours["num_malignant"]
    if k == 1:  # patients have several malignancies: one pick per patient cannot find all
        assert ours["sensitivity"] < 1.0
    # A patient's images without an id are left out; all missing -> no patient, NaN.
    none = metrics.top_k_retrieval_sensitivity(y, s, [""] * 900, k)
    assert none["num_patients"] == 0 and math.isnan(none["sensitivity"])
