"""What metrics.json holds about a split (analysis.py), the HTML report of it, and the model
card, on synthetic predictions (no model, no dataset)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from isic_jax import metrics
from isic_jax.evaluation import analysis, html_report, report
from isic_jax.training import predictions

NAMES = ["benign", "malignant"]


def _preds(seed: int = 0, n: int = 300, scale: float = 3.0, patients: bool = True,
           fitzpatrick: bool = False) -> predictions.Predictions:
    """Over-confident binary predictions (sigmoid(scale z) for labels ~ sigmoid(z))."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-0.8, 1.8, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.int32)
    p = 1 / (1 + np.exp(-scale * z))
    preds = predictions.Predictions(
        probs=np.stack([1 - p, p], axis=1).astype(np.float32),
        labels=y,
        index=np.arange(n),
        image_id=np.asarray([f"ISIC_{i:07d}" for i in range(n)]),
        patient_id=np.asarray([f"IP_{i // 3:04d}" if patients else "" for i in range(n)]),
        sex=rng.integers(0, 3, n).astype(np.int32),
        age=rng.integers(-1, 90, n).astype(np.int32),
        anatom_site=rng.choice(["torso", "head/neck", "unknown"], n),
    )
    if fitzpatrick:
        preds.fitzpatrick = rng.choice(["I", "II", "III", "iv", "5", ""], n)
    return preds


@pytest.fixture(scope="module")
def analysed():
    preds = _preds(fitzpatrick=True)
    settings = analysis.EvalSettings(bootstrap_samples=300)
    fitted = analysis.fit(preds.probs, preds.labels, [1], settings, split="val", step=7)
    summary, calibrated = analysis.analyse(preds, NAMES, [1], settings, fitted)
    return preds, settings, fitted, summary, calibrated


def test_metrics_have_intervals_around_their_estimates(analysed) -> None:
    _, _, _, summary, _ = analysed
    json.dumps(summary, allow_nan=False)  # valid JSON: NaN written as null
    for key in analysis.CI_METRICS:
        low, high = summary[f"{key}_ci"]
        assert low <= summary[key] + 1e-9 and summary[key] - 1e-9 <= high, key
        assert high > low, key
    boot = summary["bootstrap"]
    assert boot["unit"] == "patient" and boot["num_units"] == 100 and boot["num_resamples"] == 300
    band = summary["roc_band"]
    assert len(band["fpr"]) == len(band["low"]) == len(band["high"]) == 101
    assert all(lo <= hi for lo, hi in zip(band["low"], band["high"], strict=True))


def test_operating_point_meets_the_target_on_validation(analysed) -> None:
    preds, settings, fitted, summary, calibrated = analysed
    op = summary["operating_point"]
    assert op["method"] == "sensitivity" and op["target_sensitivity"] == 0.9
    assert summary["threshold"] == op["threshold"] == fitted.threshold
    assert summary["sensitivity"] >= 0.9 and op["sensitivity"] == summary["sensitivity"]
    y = preds.labels == 1
    assert np.mean(calibrated[y, 1] >= fitted.threshold) >= 0.9
    # The uncalibrated threshold selects the same images on the raw scores (2 classes: the
    # temperature is monotone).
    np.testing.assert_array_equal(calibrated[:, 1] >= fitted.threshold,
                                  preds.probs[:, 1] >= fitted.threshold_uncalibrated)
    assert summary["fixed_threshold"]["threshold"] == 0.5
    for key in ("sens_at_spec_90", "sens_at_spec_95", "spec_at_sens_90", "spec_at_sens_95"):
        assert 0 <= summary[key] <= 1


def test_calibration_before_and_after(analysed) -> None:
    preds, _, fitted, summary, calibrated = analysed
    cal = summary["calibration"]
    assert fitted.temperature == cal["temperature"] > 2.0  # over-confident by 3x
    assert cal["ece_after"] < cal["ece_before"] / 2
    assert cal["before"]["ece_ci"][0] <= cal["ece_before"] <= cal["before"]["ece_ci"][1]
    assert cal["num_bins"] == 15 and sum(b["count"] for b in cal["after"]["bins"]) == 300
    # Same ranking: AUC of the calibrated scores is the raw model's.
    assert summary["auc"] == pytest.approx(metrics.roc_auc(preds.labels, preds.probs[:, 1]))


def test_subgroups_have_intervals_and_fitzpatrick_types(analysed) -> None:
    _, _, _, summary, _ = analysed
    groups = summary["subgroup_auc"]
    assert list(groups) == ["anatom_site", "sex", "age_band", "fitzpatrick"]
    assert list(groups["fitzpatrick"]) == ["I", "II", "III", "IV", "V", "unknown"]
    for variable in groups.values():
        for g in variable.values():
            if g["auc"] is not None:
                assert g["auc_ci"][0] <= g["auc"] <= g["auc_ci"][1]


def test_settings_from_old_configs_overrides_and_bad_values() -> None:
    from isic_jax.configs import smoke

    from isic_jax import config_utils

    config = smoke.get_config()
    old = config_utils.config_from_dict(config_utils.config_to_dict(config))
    del old.eval["bootstrap_samples"], old.eval["threshold_method"]  # a run from before
    settings = analysis.EvalSettings.from_config(old, target_sensitivity=0.95)
    assert settings.bootstrap_samples == 1000 and settings.threshold_method == "sensitivity"
    assert settings.target_sensitivity == 0.95
    with pytest.raises(config_utils.ConfigError, match="config.eval.target_sensitivity"):
        analysis.EvalSettings.from_config(config, target_sensitivity=1.5)
    with pytest.raises(config_utils.ConfigError, match="config.eval.threshold_method"):
        analysis.EvalSettings.from_config(config, threshold_method="f1")


def test_no_bootstrap_no_patients_and_youden() -> None:
    preds = _preds(1, patients=False)
    settings = analysis.EvalSettings(bootstrap_samples=0, threshold_method="youden",
                                     temperature_scaling=False)
    fitted = analysis.fit(preds.probs, preds.labels, [1], settings, split="fold2")
    summary, calibrated = analysis.analyse(preds, NAMES, [1], settings, fitted)
    assert fitted.temperature == 1.0 and "auc_ci" not in summary and "bootstrap" not in summary
    np.testing.assert_allclose(calibrated, preds.probs, atol=1e-7)
    assert summary["operating_point"]["description"] == "Youden's J on fold2"
    assert summary["num_patients"] is None and summary["top_k_retrieval"] is None
    assert analysis.Fitted.from_metrics(summary) == fitted


def test_html_report_is_self_contained_and_shows_the_numbers(analysed, tmp_path) -> None:
    preds, _, fitted, summary, calibrated = analysed
    summary = dict(summary, split="val", step=7, checkpoint="best", class_names=NAMES)
    summary["per_class"]["<b>odd</b>"] = summary["per_class"]["benign"]  # must be escaped
    figures = report.write_report(tmp_path, probs=calibrated, labels=preds.labels,
                                  class_names=NAMES, malignant_classes=[1],
                                  threshold=fitted.threshold, summary=summary,
                                  raw_probs=preds.probs)
    summary.update(figures)
    path = html_report.write_html_report(tmp_path, summary, run="runs/x")
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>")
    # Nothing outside the file: no script, no external resource.
    assert "<script" not in text and not re.search(r'(src|href)="(?!data:)', text)
    assert text.count('src="data:image/png;base64,') == len(figures["figures"]) == 7
    assert f"{summary['auc']:.3f}" in text
    low, high = summary["auc_ci"]
    assert f"{low:.3f} &ndash; {high:.3f}" in text
    assert f"{fitted.threshold:.4f}" in text and "not a diagnostic device" in text
    assert "&lt;b&gt;odd&lt;/b&gt;" in text and "<b>odd</b>" not in text
