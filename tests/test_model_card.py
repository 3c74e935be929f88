"""The model card: counts per class and split from the prepare report, attribution and licences
where the source had them, validation metrics with intervals, the CV summary only when a
cv_metrics.json exists, and a Markdown rendering of all of it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_analysis import NAMES, _preds

from isic_jax.evaluation import analysis
from isic_jax.inference import model_card

REPORT = {
    "dataset": "isic/archive_128/1.0.0",
    "num_examples": 100,
    "options": {"num_folds": 5, "fold_seed": 0},
    "label_counts": {f"fold{k}": {"benign": 14 + k, "malignant": 6 - k} for k in range(5)},
    "num_skipped": 2,
    "source": "/data/archive",
    "attributions": {"Hospital Clínic de Barcelona": 60, "Anonymous": 40},
    "licenses": {"CC-BY": 60, "CC-0": 40},
}


def _meta() -> dict:
    return {
        "model": {"name": "resnet18", "width": 32, "dtype": "float32", "dropout": 0.2,
                  "num_classes": 2},
        "class_names": NAMES, "malignant_classes": [1],
        "input": {"image_size": 112},
        "export": {"bytes": 12345, "platforms": ["cpu"]},
        "checkpoint": {"step": 400}, "variables": {"ema": False},
        "preprocessing": {"steps": ["decode", "resize"]},
        "threshold": 0.31,
        "operating_point": {"threshold": 0.31, "threshold_uncalibrated": 0.25,
                            "description": "chosen on val for sensitivity >= 0.90",
                            "sensitivity": 0.91, "specificity": 0.6, "ppv": 0.4, "npv": 0.95},
        "calibration": {"temperature": 1.7, "fitted": True},
    }


@pytest.fixture()
def config():
    from isic_jax.configs import cpu_sample

    return cpu_sample.get_config()


@pytest.fixture()
def validation():
    preds = _preds(fitzpatrick=True)
    settings = analysis.EvalSettings(bootstrap_samples=100)
    fitted = analysis.fit(preds.probs, preds.labels, [1], settings, split="val", step=400)
    summary, _ = analysis.analyse(preds, NAMES, [1], settings, fitted)
    return dict(summary, split="val", step=400)


def _variables():
    return {"params": {"w": np.zeros((3, 4)), "b": np.zeros(4)},
            "batch_stats": {"mean": np.zeros(4)}}


def test_card_from_the_prepare_report_and_validation(monkeypatch, config, validation,
                                                     tmp_path) -> None:
    monkeypatch.setattr(model_card, "prepare_report", lambda c: (REPORT, "Some et al. 2020"))
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    card = model_card.build_card(_meta(), config, _variables(), validation=validation,
                                 validation_source="eval/val/metrics.json", workdir=run)
    json.dumps(card, allow_nan=False)
    assert card["model"]["parameters"] == 16 and card["model"]["batch_stats"] == 4
    data = card["training_data"]
    # val_fold 0: fold0 held out, folds 1-4 trained on.
    assert data["splits"]["validation"] == {"folds": "fold0",
                                            "counts": {"benign": 14, "malignant": 6}}
    assert data["splits"]["train"]["counts"] == {"benign": 15 + 16 + 17 + 18,
                                                 "malignant": 5 + 4 + 3 + 2}
    assert data["attributions"] == REPORT["attributions"] and data["citation"]
    assert card["cross_validation"] is None
    assert card["subgroups"]["fitzpatrick"]["I"]["n"] > 0
    assert card["calibration"]["ece_after"] == validation["calibration"]["ece_after"]
    auc = next(m for m in card["validation"]["metrics"] if m["name"].startswith("ROC AUC"))
    assert auc["value"] == validation["auc"] and auc["ci"] == validation["auc_ci"]

    model_card.write_card(tmp_path, card)
    text = (tmp_path / model_card.MARKDOWN_FILE).read_text()
    assert json.loads((tmp_path / model_card.JSON_FILE).read_text()) == card
    assert "| validation | fold0 | 14 | 6 | 20 |" in text
    assert "Hospital Clínic de Barcelona" in text and "CC-BY" in text
    assert f"{validation['auc']:.3f} | {validation['auc_ci'][0]:.3f}-" in text
    assert "Fitzpatrick skin type | I |" in text
    assert "**0.31**" in text and "T = 1.7" in text
    assert "not a medical device" in text and "Cross-validation" not in text


def test_cv_summary_from_the_run_or_its_parent(monkeypatch, config, tmp_path) -> None:
    monkeypatch.setattr(model_card, "prepare_report", lambda c: (None, None))
    run = tmp_path / "cv" / "fold0"
    run.mkdir(parents=True)
    cv = {"summary": {"auc": {"mean": 0.81, "std": 0.03}, "pauc_80": {"mean": 0.1}},
          "folds": [{"auc": 0.8}, {"auc": 0.83}]}
    (tmp_path / "cv" / "cv_metrics.json").write_text(json.dumps(cv))
    card = model_card.build_card(_meta(), config, _variables(), validation=None,
                                 validation_source="not evaluated: no dataset", workdir=run)
    assert card["cross_validation"]["summary"] == cv
    assert card["cross_validation"]["file"].endswith("cv/cv_metrics.json")
    assert card["validation"] is None and "note" in card["training_data"]
    text = model_card.render_markdown(card)
    assert "## Cross-validation" in text and "| auc | 0.810 | 0.030 |" in text
    assert "No validation metrics: not evaluated: no dataset." in text
