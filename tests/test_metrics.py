"""isic_jax.metrics against scikit-learn and against worked examples computed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from isic_jax import metrics
from isic_jax.utils import to_json_compatible


def _random_binary(seed: int, n: int = 300, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = rng.normal(0, 1, n) + 1.2 * y
    if ties:  # coarse scores: many ties across the classes
        s = np.round(s, 1)
    return y, s


# ------------------------------------------------------------------------------- ROC AUC


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_matches_sklearn(seed):
    y, s = _random_binary(seed, ties=seed == 2)
    assert metrics.roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)


def test_roc_auc_one_class_is_nan():
    assert math.isnan(metrics.roc_auc([1, 1, 1], [0.1, 0.5, 0.9]))
    assert math.isnan(metrics.roc_auc([], []))


# -------------------------------------------------------------------- ISIC 2024 partial AUC

# Hand-worked examples. Positives (malignant) and negatives with their scores; the pAUC is the
# area of the ROC region with TPR >= min_tpr, i.e. the integral over TPR in [min_tpr, 1] of
# (1 - FPR(TPR)).
# Example A: ROC passes (0.2, 0.8) ... (0.8, 0.8) then rises vertically at FPR 0.8 to TPR 1:
#   integral over [0.8, 1] of (1 - 0.8) = 0.2 * 0.2 = 0.04.
_EX_A = ([0.9, 0.8, 0.7, 0.6, 0.2], [0.65, 0.5, 0.4, 0.3, 0.1])
# Example B: a positive and a negative tie at 0.3, so the ROC runs diagonally from (0.4, 0.8) to
# (0.6, 1.0): FPR(TPR) = 0.4 + (TPR - 0.8).
#   min_tpr 0.8: integral over x in [0, 0.2] of (0.6 - x) = 0.12 - 0.02 = 0.10
#   min_tpr 0.9: integral over x in [0.1, 0.2] of (0.6 - x) = 0.06 - 0.015 = 0.045 (the
#   interpolated point falls inside a segment of the flipped curve)
_EX_B = ([0.9, 0.8, 0.7, 0.6, 0.3], [0.65, 0.5, 0.3, 0.2, 0.1])


def _xy(example):
    pos, neg = example
    return [1] * len(pos) + [0] * len(neg), pos + neg


@pytest.mark.parametrize(
    "example, min_tpr, expected",
    [(_EX_A, 0.8, 0.04), (_EX_B, 0.8, 0.10), (_EX_B, 0.9, 0.045)],
)
def test_pauc_hand_worked_examples(example, min_tpr, expected):
    y, s = _xy(example)
    assert metrics.partial_auc_above_tpr(y, s, min_tpr=min_tpr) == pytest.approx(
        expected, abs=1e-12
    )


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_pauc_matches_the_mcclish_inverse_of_sklearn_max_fpr(seed):
    # The commented-out "equivalent code" of the Kaggle metric: sklearn's standardised partial
    # AUC of the flipped problem, mapped back from [0.5, 1] to [0.5 * max_fpr^2, max_fpr].
    y, s = _random_binary(seed, ties=seed % 2 == 1)
    max_fpr = 0.2
    scaled = skm.roc_auc_score(np.abs(y - 1), 1.0 - s, max_fpr=max_fpr)
    expected = 0.5 * max_fpr**2 + (max_fpr - 0.5 * max_fpr**2) / (1.0 - 0.5) * (scaled - 0.5)
    assert metrics.partial_auc_above_tpr(y, s) == pytest.approx(expected, abs=1e-12)


def test_pauc_bounds():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 20_000)
    assert metrics.partial_auc_above_tpr(y, y.astype(float)) == pytest.approx(0.2, abs=1e-12)
    assert metrics.partial_auc_above_tpr(y, -y.astype(float)) == pytest.approx(0.0, abs=1e-12)
    # A random ranking: the area under the diagonal above TPR 0.8 is 0.2^2 / 2 = 0.02.
    assert metrics.partial_auc_above_tpr(y, rng.random(y.size)) == pytest.approx(0.02, abs=0.004)
    for seed in range(5):
        value = metrics.partial_auc_above_tpr(*_random_binary(seed, ties=True))
        assert 0.0 <= value <= 0.2
    # min_tpr = 0 is the whole ROC AUC, as in the Kaggle code.
    ys, ss = _random_binary(7)
    assert metrics.partial_auc_above_tpr(ys, ss, min_tpr=0.0) == pytest.approx(
        skm.roc_auc_score(ys, ss), abs=1e-12
    )


def test_pauc_degenerate_and_invalid():
    assert math.isnan(metrics.partial_auc_above_tpr([0, 0, 0], [0.1, 0.2, 0.3]))
    with pytest.raises(ValueError):
        metrics.partial_auc_above_tpr([0, 1], [0.1, 0.2], min_tpr=1.0)


# ------------------------------------------------------------------ multiclass (2018/2019)


def test_argmax_ties_are_wrong():
    probs = np.array(
        [
            [0.5, 0.5, 0.0],  # tie between 0 and 1: wrong whatever the label
            [0.2, 0.7, 0.1],
            [0.3, 0.3, 0.4],  # tie below the maximum: not a tie
            [0.4, 0.2, 0.4],  # tie between 0 and 2
        ]
    )
    np.testing.assert_array_equal(metrics.argmax_ties_wrong(probs), [-1, 1, 2, -1])
    labels = np.array([0, 1, 2, 2])
    # class 0: 0/1 right, class 1: 1/1, class 2: 1/2 -> (0 + 1 + 0.5) / 3
    assert metrics.balanced_multiclass_accuracy(labels, probs) == pytest.approx(0.5)
    # np.argmax would have called rows 0 and 3 class 0 and scored (1 + 1 + 0.5) / 3.
    assert metrics.balanced_multiclass_accuracy(labels, probs) < skm.balanced_accuracy_score(
        labels, probs.argmax(1)
    )


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("seed", [0, 1])
def test_balanced_accuracy_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.choice(5, size=400, p=[0.5, 0.2, 0.15, 0.15, 0.0])  # class 4 absent
    logits = rng.normal(size=(400, 5)) + 1.5 * np.eye(5)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ours = metrics.balanced_multiclass_accuracy(labels, probs)
    # Mean recall over the classes present in the labels.
    assert ours == pytest.approx(skm.balanced_accuracy_score(labels, probs.argmax(1)))
    present = np.unique(labels)
    assert ours == pytest.approx(
        skm.recall_score(labels, probs.argmax(1), labels=present, average="macro")
    )
    # Quantised probabilities produce ties; sklearn's recall on the tie-aware predictions agrees.
    coarse = np.round(probs, 1)
    pred = metrics.argmax_ties_wrong(coarse)
    assert (pred < 0).any()
    assert metrics.balanced_multiclass_accuracy(labels, coarse) == pytest.approx(
        skm.recall_score(labels, pred, labels=present, average="macro", zero_division=0)
    )


def test_per_class_recall_auc_and_confusion_match_sklearn():
    rng = np.random.default_rng(3)
    labels = rng.choice(4, size=300, p=[0.4, 0.3, 0.3, 0.0])
    logits = rng.normal(size=(300, 4)) + np.eye(4)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    recall = metrics.per_class_recall(labels, probs)
    expected = skm.recall_score(labels, probs.argmax(1), labels=[0, 1, 2], average=None)
    np.testing.assert_allclose(recall[:3], expected)
    assert math.isnan(recall[3])
    auc = metrics.one_vs_rest_auc(labels, probs)
    for c in range(3):
        assert auc[c] == pytest.approx(skm.roc_auc_score(labels == c, probs[:, c]))
    assert math.isnan(auc[3])
    np.testing.assert_array_equal(
        metrics.confusion_matrix(labels, probs),
        skm.confusion_matrix(labels, probs.argmax(1), labels=[0, 1, 2, 3]),
    )
    tied = np.array([[0.5, 0.5, 0, 0], [0.1, 0.8, 0.1, 0]])
    cm = metrics.confusion_matrix([0, 1], tied)
    assert cm.sum() == 1 and cm[1, 1] == 1  # the tie is in no cell


def test_sensitivity_specificity_matches_confusion_matrix():
    y, s = _random_binary(4)
    for threshold in (-0.5, 0.3, 1.0):
        tn, fp, fn, tp = skm.confusion_matrix(y, s >= threshold, labels=[0, 1]).ravel()
        sens, spec = metrics.sensitivity_specificity(y, s, threshold)
        assert sens == pytest.approx(tp / (tp + fn))
        assert spec == pytest.approx(tn / (tn + fp))
    # A score equal to the threshold counts as malignant.
    assert metrics.sensitivity_specificity([1, 0], [0.5, 0.5], 0.5) == (1.0, 0.0)
    sens, spec = metrics.sensitivity_specificity([0, 0], [0.1, 0.9], 0.5)
    assert math.isnan(sens) and spec == 0.5


# ------------------------------------------------------------------------ patient level


def test_patient_auc_worked_example():
    # patient a: benign 0.2 + malignant 0.9 -> malignant, 0.9
    # patient b: benign 0.3 + benign 0.95   -> benign, 0.95
    # patient c: malignant 0.5              -> malignant, 0.5
    # patient d: benign 0.1                 -> benign, 0.1
    # one image without a patient id: left out.
    labels = [0, 1, 0, 0, 1, 0, 1]
    scores = [0.2, 0.9, 0.3, 0.95, 0.5, 0.1, 0.99]
    ids = [b"a", b"a", b"b", b"b", b"c", b"d", b""]
    p_labels, p_scores = metrics.patient_level(labels, scores, ids)
    np.testing.assert_array_equal(p_labels, [1, 0, 1, 0])
    np.testing.assert_allclose(p_scores, [0.9, 0.95, 0.5, 0.1])
    # Malignant patients {0.9, 0.5} vs benign {0.95, 0.1}: 2 of 4 pairs ordered right.
    assert metrics.patient_auc(labels, scores, ids) == pytest.approx(0.5)
    assert metrics.patient_auc(labels, scores, [i.decode() for i in ids]) == pytest.approx(0.5)


# --------------------------------------------------------------- classification_metrics


def test_classification_metrics_binary_json_round_trip():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 200)
    p1 = 1 / (1 + np.exp(-(rng.normal(size=200) + 2 * labels - 1)))
    probs = np.stack([1 - p1, p1], 1).astype(np.float32)
    patients = np.array([f"IP_{i // 3:03d}".encode() for i in range(200)], dtype="S")
    result = metrics.classification_metrics(
        probs, labels, ["benign", "malignant"], malignant_classes=[1], patient_ids=patients
    )
    text = json.dumps(result, allow_nan=False)
    assert json.loads(text) == result
    assert result["auc"] == pytest.approx(skm.roc_auc_score(labels, probs[:, 1]), abs=1e-6)
    assert result["pauc_80"] == pytest.approx(
        metrics.partial_auc_above_tpr(labels, probs[:, 1]), abs=1e-9
    )
    assert 0 <= result["pauc_80"] <= 0.2
    sens, spec = metrics.sensitivity_specificity(labels, probs[:, 1], 0.5)
    assert (result["sensitivity"], result["specificity"]) == pytest.approx((sens, spec))
    counts = result["binary_counts"]
    assert counts["tp"] + counts["fn"] == result["num_malignant"] == int(labels.sum())
    assert sum(counts.values()) == result["num_examples"] == 200
    assert result["num_patients"] == 67
    assert isinstance(result["patient_auc"], float)
    assert np.sum(result["confusion_matrix"]) == 200 - result["num_argmax_ties"]
    assert result["per_class"]["malignant"]["support"] == int(labels.sum())


def test_classification_metrics_multiclass_malignant_score_is_a_sum():
    rng = np.random.default_rng(6)
    names = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    labels = rng.integers(0, 7, 300)
    logits = rng.normal(size=(300, 7)) + 2 * np.eye(7)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    malignant = [0, 2, 3]
    result = metrics.classification_metrics(probs, labels, names, malignant_classes=malignant)
    y_bin = np.isin(labels, malignant)
    score = probs[:, malignant].sum(1)
    assert result["auc"] == pytest.approx(skm.roc_auc_score(y_bin, score))
    assert result["balanced_accuracy"] == pytest.approx(
        skm.balanced_accuracy_score(labels, probs.argmax(1))
    )
    assert set(result["per_class"]) == set(names)
    assert result["patient_auc"] is None and result["num_patients"] is None
    json.dumps(result, allow_nan=False)


def test_classification_metrics_degenerate_inputs_serialise_nan_as_null():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3]], np.float32)
    result = metrics.classification_metrics(
        probs, [0, 0, 0], ["benign", "malignant"], malignant_classes=[1], patient_ids=["a", "", "b"]
    )
    for key in ("auc", "pauc_80", "average_precision", "sensitivity", "patient_auc"):
        assert result[key] is None, key
    assert result["specificity"] == 1.0
    assert result["per_class"]["malignant"]["recall"] is None
    json.dumps(result, allow_nan=False)
    empty = metrics.classification_metrics(
        np.zeros((0, 2)), [], ["benign", "malignant"], malignant_classes=[1]
    )
    assert empty["num_examples"] == 0 and empty["auc"] is None
    json.dumps(empty, allow_nan=False)


def test_classification_metrics_rejects_bad_shapes():
    with pytest.raises(ValueError):
        metrics.classification_metrics(
            np.zeros((3, 3)), [0, 1, 2], ["a", "b"], malignant_classes=[1]
        )
    with pytest.raises(ValueError):
        metrics.classification_metrics(np.zeros((2, 2)), [0, 1], ["a", "b"], malignant_classes=[2])
    with pytest.raises(ValueError):
        metrics.classification_metrics(np.zeros((2, 2)), [0, 5], ["a", "b"], malignant_classes=[1])


def test_to_json_compatible_converts_numpy():
    value = {"a": np.float32(0.5), "b": np.int64(3), "c": np.array([1.0, np.nan]), "d": np.True_}
    assert to_json_compatible(value) == {"a": 0.5, "b": 3, "c": [1.0, None], "d": True}
