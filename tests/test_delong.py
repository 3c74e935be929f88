"""DeLong's covariance against its definition (structural components by brute force), and the
paired comparison of two runs' predictions."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from isic_jax import metrics
from isic_jax.evaluation import compare, delong


def _components(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's V10 (per malignant image) and V01 (per benign image), by definition."""
    pos, neg = s[y == 1], s[y == 0]
    psi = lambda a, b: 1.0 if a > b else (0.5 if a == b else 0.0)  # noqa: E731
    v10 = np.array([np.mean([psi(p, q) for q in neg]) for p in pos])
    v01 = np.array([np.mean([psi(p, q) for p in pos]) for q in neg])
    return v10, v01


@pytest.mark.parametrize("tied", [False, True])
def test_covariance_matches_the_definition(tied) -> None:
    rng = np.random.default_rng(int(tied))
    y = (rng.random(80) < 0.4).astype(np.int64)
    a = rng.normal(0, 1, 80) + y
    b = a + rng.normal(0, 0.7, 80)
    if tied:
        a, b = np.round(a, 1), np.round(b, 1)
    aucs, cov = delong.auc_covariance(y, np.stack([a, b]))
    assert aucs == pytest.approx([metrics.roc_auc(y, a), metrics.roc_auc(y, b)], abs=1e-12)
    (va10, va01), (vb10, vb01) = _components(y, a), _components(y, b)
    m, n = len(va10), len(va01)
    want = np.array([
        [np.var(va10, ddof=1) / m + np.var(va01, ddof=1) / n,
         np.cov(va10, vb10)[0, 1] / m + np.cov(va01, vb01)[0, 1] / n],
        [0.0, np.var(vb10, ddof=1) / m + np.var(vb01, ddof=1) / n],
    ])
    want[1, 0] = want[0, 1]
    np.testing.assert_allclose(cov, want, atol=1e-14)


def test_delong_test_detects_a_better_model_and_not_an_equal_one() -> None:
    rng = np.random.default_rng(3)
    y = (rng.random(600) < 0.3).astype(np.int64)
    weak = rng.normal(0, 1, 600) + 0.5 * y
    strong = rng.normal(0, 1, 600) + 1.5 * y
    better = delong.delong_test(y, weak, strong)
    assert better["difference"] > 0 and better["p_value"] < 1e-6
    assert better["ci"][0] > 0
    same = delong.delong_test(y, weak, weak)
    assert same["difference"] == 0 and math.isnan(same["p_value"])
    noisy = delong.delong_test(y, weak, weak + rng.normal(0, 0.05, 600))
    assert noisy["p_value"] > 0.05
    with pytest.raises(ValueError, match="both"):
        delong.delong_test(np.zeros(5), np.arange(5.0), np.arange(5.0))


def _write_eval(folder, ids, pids, labels, score, malignant_col: bool = True) -> None:
    folder.mkdir(parents=True)
    header = ["image_id", "patient_id", "label", "index", "prob_benign", "prob_malignant"]
    if malignant_col:
        header.append("malignant_probability")
    with open(folder / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for k, (i, p, lab, s) in enumerate(zip(ids, pids, labels, score, strict=True)):
            w.writerow([i, p, lab, k, 1 - s, s] + ([s] if malignant_col else []))
    (folder / "metrics.json").write_text(json.dumps(
        {"class_names": ["benign", "malignant"], "malignant_classes": [1], "split": "val"}))


def test_compare_runs_pairs_images_and_resamples_patients(tmp_path) -> None:
    rng = np.random.default_rng(4)
    n = 400
    ids = [f"ISIC_{i:05d}" for i in range(n)]
    pids = [f"IP_{i // 4:03d}" for i in range(n)]
    y = (rng.random(n) < 0.3).astype(np.int64)
    a = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + 0.6 * y)))
    b = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + 1.6 * y)))
    _write_eval(tmp_path / "a" / "eval" / "val", ids, pids, y, a)
    order = rng.permutation(n)  # another row order: pairing is by image id
    _write_eval(tmp_path / "b" / "eval" / "val", [ids[i] for i in order],
                [pids[i] for i in order], y[order], b[order], malignant_col=False)
    result = compare.compare_runs(tmp_path / "a", tmp_path / "b", num_resamples=300)
    auc = result["auc"]
    assert auc["a"] == pytest.approx(metrics.roc_auc(y, a)) and auc["b"] == pytest.approx(
        metrics.roc_auc(y, b))
    assert auc["difference"] > 0.1 and auc["ci"][0] > 0 and auc["p_value"] < 0.01
    assert auc["delong"]["p_value"] < 1e-6
    assert result["bootstrap"]["unit"] == "patient" and result["bootstrap"]["num_units"] == 100
    assert "B - A" in compare.summary_text(result)
    # A run with itself: no difference.
    self_cmp = compare.compare_runs(tmp_path / "a", tmp_path / "a", num_resamples=50)
    assert self_cmp["auc"]["difference"] == 0 and self_cmp["auc"]["p_value"] == 1.0


def test_compare_refuses_other_images_or_labels(tmp_path) -> None:
    ids = [f"ISIC_{i}" for i in range(20)]
    y = np.arange(20) % 2
    s = np.linspace(0, 1, 20)
    _write_eval(tmp_path / "a", ids, [""] * 20, y, s)
    _write_eval(tmp_path / "b", ids[:-1] + ["ISIC_other"], [""] * 20, y, s)
    _write_eval(tmp_path / "c", ids, [""] * 20, 1 - y, s)
    with pytest.raises(compare.CompareError, match="different images.*ISIC_19"):
        compare.compare_runs(tmp_path / "a", tmp_path / "b")
    with pytest.raises(compare.CompareError, match="image 'ISIC_0' has label 0 .* but 1"):
        compare.compare_runs(tmp_path / "a", tmp_path / "c")
    with pytest.raises(compare.CompareError, match="isic-jax evaluate"):
        compare.compare_runs(tmp_path / "a", tmp_path / "missing")
