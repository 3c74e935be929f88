"""Bootstrap intervals: the vectorised weighted metrics equal metrics.py on the data (weights 1)
and on repeated data (integer weights); resampling is seeded, patient-grouped and independent of
the chunk size; and the intervals cover a known AUC about 95 % of the time."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from isic_jax import metrics
from isic_jax.evaluation import bootstrap, calibration, operating_points


def _data(seed: int, n: int, tied: bool, prevalence: float = 0.3):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(np.int64)
    s = rng.normal(0, 1, n) + 1.2 * y
    if tied:
        s = np.round(s, 1)
    return y, 1 / (1 + np.exp(-s))


def _reference(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, float]:
    """metrics.py / operating_points.py values of every metric binary_metrics_fn computes."""
    probs = np.stack([1 - s, s], axis=1)
    rates = metrics.binary_rates(y, s >= threshold)
    out = {
        "auc": metrics.roc_auc(y, s),
        "pauc_80": metrics.partial_auc_above_tpr(y, s, 0.8),
        "pauc": metrics.partial_auc_above_tpr(y, s, 0.9),
        "average_precision": metrics.average_precision(y, s),
        "balanced_accuracy": metrics.balanced_multiclass_accuracy(y, probs),
        **{k: rates[k] for k in ("sensitivity", "specificity", "ppv", "npv")},
    }
    for v in (0.9, 0.95):
        out[f"sens_at_spec_{bootstrap.level_name(v)}"] = (
            operating_points.sensitivity_at_specificity(y, s, v))
        out[f"spec_at_sens_{bootstrap.level_name(v)}"] = (
            operating_points.specificity_at_sensitivity(y, s, v))
    return out


def _fn(y, s, threshold, **kw):
    probs = np.stack([1 - s, s], axis=1)
    return bootstrap.binary_metrics_fn(
        y, s, threshold=threshold, labels=y, predicted=metrics.argmax_ties_wrong(probs),
        num_classes=2, pauc_min_tpr=0.9, **kw)


@pytest.mark.parametrize("seed, n, tied", [(0, 300, False), (1, 300, True), (2, 25, True),
                                           (3, 1000, True)])
def test_weighted_metrics_equal_metrics_py(seed, n, tied) -> None:
    y, s = _data(seed, n, tied)
    fn = _fn(y, s, 0.55)
    rng = np.random.default_rng(seed + 10)
    for weights in (np.ones(n, np.int64), rng.integers(0, 4, n)):
        yy, ss = np.repeat(y, weights), np.repeat(s, weights)  # the data the weights stand for
        got = {k: float(v[0]) for k, v in fn(weights[None].astype(np.float64)).items()}
        for key, want in _reference(yy, ss, 0.55).items():
            assert got[key] == pytest.approx(want, abs=1e-12), key


def test_patient_auc_and_subgroups_and_ece_equal_the_point_versions() -> None:
    y, s = _data(4, 400, tied=True)
    pids = np.asarray([f"IP_{i // 4:03d}" if i % 7 else "" for i in range(400)], dtype=object)
    units = bootstrap.resampling_units(pids)
    fn = _fn(y, s, 0.5, patient_unit=units.index, num_patients=units.num_patients)
    assert bootstrap.point_estimates(fn, 400)["patient_auc"] == pytest.approx(
        metrics.patient_auc(y, s, pids), abs=1e-12)
    sel = np.arange(400) % 3 == 0
    groups = bootstrap.group_auc_fn(y, s, {"site": {"a": sel, "b": ~sel}})
    point = bootstrap.point_estimates(groups, 400)
    assert point["site/a"] == pytest.approx(metrics.roc_auc(y[sel], s[sel]), abs=1e-12)
    assert point["site/b"] == pytest.approx(metrics.roc_auc(y[~sel], s[~sel]), abs=1e-12)
    ece = bootstrap.point_estimates(bootstrap.calibration_error_fn(s, y, 15), 400)
    want = calibration.binary_calibration(s, y, 15)
    assert ece["ece"] == pytest.approx(want["ece"], abs=1e-12)
    assert ece["mce"] == pytest.approx(want["mce"], abs=1e-12)


def test_units_group_patients_and_keep_images_without_id_apart() -> None:
    units = bootstrap.resampling_units(["b", "a", "", "b", b"a", None, "c"])
    assert units.kind == "patient" and units.num_patients == 3 and units.count == 5
    idx = units.index
    assert idx[0] == idx[3] and idx[1] == idx[4] and len({idx[2], idx[5]}) == 2
    assert idx[2] >= 3 and idx[5] >= 3  # images without id: units after the patients
    assert bootstrap.resampling_units(["", ""]).kind == "image"
    assert bootstrap.resampling_units(None, 4).count == 4


def test_resampling_is_seeded_chunk_independent_and_patient_level() -> None:
    units = bootstrap.resampling_units([f"P{i // 3}" for i in range(30)])
    full = np.concatenate(list(bootstrap.resample_weights(units, 50, seed=3, chunk=50)))
    chunked = np.concatenate(list(bootstrap.resample_weights(units, 50, seed=3, chunk=7)))
    np.testing.assert_array_equal(full, chunked)
    other = np.concatenate(list(bootstrap.resample_weights(units, 50, seed=4)))
    assert not np.array_equal(full, other)
    assert full.shape == (50, 30) and np.all(full.sum(axis=1) == 30)  # 10 patients x 3 images
    # The 3 images of a patient are always drawn together.
    groups = full.reshape(50, 10, 3)
    assert np.all(groups == groups[:, :, :1])


def test_intervals_contain_the_estimate_and_skip_undefined_resamples() -> None:
    y, s = _data(1, 40, tied=False, prevalence=0.05)  # 2 malignant: ~13 % of resamples have none
    units = bootstrap.resampling_units(None, y.size)
    found, draws = bootstrap.intervals([_fn(y, s, 0.5)], units, bootstrap.Settings(400, 0, 0.95))
    assert 0 < found["_num_valid"]["auc"] < 400  # undefined resamples are left out
    low, high = found["auc"]
    assert low <= metrics.roc_auc(y, s) <= high
    assert draws["auc"].shape == (400,)
    assert all(math.isnan(v) for v in bootstrap.percentile_interval(np.full(3, np.nan)))


def _binormal(rng, n_pos: int, n_neg: int, d: float):
    s = np.concatenate([rng.normal(d, 1, n_pos), rng.normal(0, 1, n_neg)])
    return np.r_[np.ones(n_pos, np.int64), np.zeros(n_neg, np.int64)], s


def test_interval_covers_the_true_auc_about_95_percent_of_the_time() -> None:
    """Binormal scores (d = 1): true AUC = Phi(d / sqrt 2) = 0.760. 200 data sets x 400
    resamples; the percentile interval should cover ~95 % (binomial sd 1.5 % at 200)."""
    d = 1.0
    true_auc = float(stats.norm.cdf(d / math.sqrt(2)))
    rng = np.random.default_rng(0)
    hits = 0
    for seed in range(200):
        y, s = _binormal(rng, 60, 140, d)
        fn = lambda w, y=y, s=s: {"auc": bootstrap.auc(bootstrap.SortedScores(y, s).roc(w))}  # noqa: E731
        draws = bootstrap.bootstrap(fn, bootstrap.resampling_units(None, y.size), 400, seed)
        low, high = bootstrap.percentile_interval(draws["auc"], 0.95)
        hits += low <= true_auc <= high
    assert 0.90 <= hits / 200 <= 0.99, hits


def test_patient_resampling_covers_clustered_data_where_image_resampling_does_not() -> None:
    """8 images per patient (e.g. one lesion imaged 8 times: one label) sharing a random effect:
    resampling images gives intervals that are too narrow; resampling patients does not. Every
    malignant-benign pair is of two patients: the true AUC is that of the binormal model."""
    rng = np.random.default_rng(1)
    d, sd_patient, sd_image = 1.0, 1.0, 0.5
    true_auc = float(stats.norm.cdf(d / math.sqrt(2 * (sd_patient**2 + sd_image**2))))
    cover = {"patient": 0, "image": 0}
    trials = 120
    for seed in range(trials):
        patients = np.repeat(np.arange(60), 8)
        y = (rng.random(60) < 0.3).astype(np.int64)[patients]
        s = d * y + rng.normal(0, sd_patient, 60)[patients] + rng.normal(0, sd_image, y.size)
        fn = lambda w, y=y, s=s: {"auc": bootstrap.auc(bootstrap.SortedScores(y, s).roc(w))}  # noqa: E731
        for kind, ids in (("patient", patients.astype(str)), ("image", None)):
            units = bootstrap.resampling_units(ids, y.size)
            low, high = bootstrap.percentile_interval(
                bootstrap.bootstrap(fn, units, 300, seed)["auc"])
            cover[kind] += low <= true_auc <= high
    assert cover["patient"] / trials >= 0.88, cover
    assert cover["image"] / trials < cover["patient"] / trials - 0.1, cover


def test_fast_auc_equals_the_roc_area_with_ties_subsets_and_empty_draws() -> None:
    rng = np.random.default_rng(6)
    for _ in range(100):
        n = int(rng.integers(1, 120))
        y = (rng.random(n) < 0.3).astype(np.int64)
        s = np.round(rng.normal(y, 1), int(rng.integers(0, 3)))
        rows = np.sort(rng.choice(n + 5, n, replace=False))  # a subset of wider weights
        weights = rng.integers(0, 3, (4, n + 5)).astype(np.float64)
        sorted_scores = bootstrap.SortedScores(y, s, rows=rows)
        fast = sorted_scores.auc(weights)
        slow = bootstrap.auc(sorted_scores.roc(weights))
        np.testing.assert_array_equal(np.isfinite(fast), np.isfinite(slow))
        np.testing.assert_allclose(fast[np.isfinite(fast)], slow[np.isfinite(slow)], atol=1e-12)
