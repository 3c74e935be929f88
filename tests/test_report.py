"""Evaluation report: the figures exist and are non-trivial PNGs; the subgroup AUCs are right."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from isic_jax import metrics
from isic_jax.evaluation import report

SITES = np.array(["torso", "lower extremity", "head/neck", "oral/genital", "unknown"])


def _data(n: int = 400, seed: int = 0):
    """Binary predictions with some skill, and metadata with every kind of group."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.25).astype(np.int32)
    logit = rng.normal(0.0, 1.0, n) + 2.0 * labels - 1.5
    p1 = 1.0 / (1.0 + np.exp(-logit))
    probs = np.stack([1 - p1, p1], axis=1).astype(np.float32)
    site = rng.choice(SITES[[0, 1, 2, 4]], n)
    benign = np.flatnonzero(labels == 0)
    site[benign[:7]] = "oral/genital"  # a group with one class only: AUC undefined
    meta = {
        "sex": rng.choice([0, 1, 2], n).astype(np.int32),
        "age": np.where(rng.random(n) < 0.1, -1, rng.integers(18, 90, n)).astype(np.int32),
        "anatom_site": site.astype(bytes),  # as the input pipeline gives it
        "patient_id": np.array([f"IP_{i}" for i in rng.integers(0, 120, n)]),
    }
    return probs, labels, meta


def _check_png(path, min_size=(500, 350)) -> np.ndarray:
    """Asserts a real, non-blank, coloured PNG; returns its RGB pixels f32[H, W, 3]."""
    assert path.exists(), path
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width >= min_size[0] and im.height >= min_size[1], (path, im.size)
        pix = np.asarray(im.convert("RGB"), np.float32)
    assert pix.std() > 15, path  # not a blank canvas
    colours = np.unique(pix.reshape(-1, 3)[::7].astype(np.uint8), axis=0)
    assert len(colours) >= 30, (path, len(colours))
    # Data drawn in colour (curves, bars, cells), not just black axes and text on white.
    chroma = pix.max(axis=-1) - pix.min(axis=-1)
    assert np.mean(chroma > 40) > 0.001, path
    return pix


@pytest.fixture(scope="module")
def binary_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("binary")
    probs, labels, meta = _data()
    result = report.write_report(
        out,
        probs=probs,
        labels=labels,
        class_names=["benign", "malignant"],
        malignant_classes=[1],
        threshold=0.4,
        metadata=meta,
    )
    return out, result, (probs, labels, meta)


def test_binary_figures(binary_report):
    out, result, _ = binary_report
    assert result["figures"] == list(report.FIGURES)
    pixels = {name: _check_png(out / name) for name in report.FIGURES}
    # The ROC shades the TPR >= 80 % region in translucent tab:orange over white.
    shade = np.array([255, 210, 171], np.float32)
    shaded = np.all(np.abs(pixels["roc.png"] - shade) < 8, axis=-1)
    assert shaded.mean() > 0.01
    assert json.dumps(result, allow_nan=False)


def test_subgroup_auc_matches_metrics(binary_report):
    _, result, (probs, labels, meta) = binary_report
    breakdown = result["subgroup_auc"]
    assert list(breakdown) == ["anatom_site", "sex", "age_band"]
    score = probs[:, 1]
    site = meta["anatom_site"].astype(str)
    age = meta["age"]
    groups = {
        "anatom_site": {s: site == s for s in SITES},
        "sex": {"unknown": meta["sex"] == 0, "female": meta["sex"] == 1, "male": meta["sex"] == 2},
        "age_band": {
            "<30": (age >= 0) & (age < 30),
            "30-44": (age >= 30) & (age < 45),
            "45-59": (age >= 45) & (age < 60),
            "60-74": (age >= 60) & (age < 75),
            "75+": age >= 75,
            "unknown": age < 0,
        },
    }
    for variable, masks in groups.items():
        assert set(breakdown[variable]) == set(masks)
        assert sum(g["n"] for g in breakdown[variable].values()) == len(labels)
        for name, sel in masks.items():
            entry = breakdown[variable][name]
            assert entry["n"] == int(sel.sum())
            assert entry["num_malignant"] == int(labels[sel].sum())
            assert entry["num_patients"] == len(set(meta["patient_id"][sel]))
            expected = metrics.roc_auc(labels[sel], score[sel])
            if np.isnan(expected):
                assert entry["auc"] is None and entry["auc_se"] is None
            else:
                assert entry["auc"] == pytest.approx(expected, abs=1e-12)
                assert 0 < entry["auc_se"] < 0.5
    assert breakdown["anatom_site"]["oral/genital"]["auc"] is None
    # Order: largest sites first and unknown last; age bands in age order.
    assert list(breakdown["anatom_site"])[-1] == "unknown"
    assert list(breakdown["age_band"]) == list(report.AGE_BANDS)


def test_age_bands():
    ages = np.array([0, 29, 30, 44, 45, 59, 60, 74, 75, 99, -1])
    expected = [
        "<30",
        "<30",
        "30-44",
        "30-44",
        "45-59",
        "45-59",
        "60-74",
        "60-74",
        "75+",
        "75+",
        "unknown",
    ]
    assert report.age_bands(ages).tolist() == expected


def test_missing_metadata(tmp_path):
    probs, labels, meta = _data(120, seed=1)
    # A release without sex (all unknown) and without sites: only the age bands are reported.
    partial = {"sex": np.zeros(120, np.int32), "age": meta["age"]}
    result = report.write_report(
        tmp_path / "partial",
        probs=probs,
        labels=labels,
        class_names=["benign", "malignant"],
        malignant_classes=[1],
        metadata=partial,
    )
    assert list(result["subgroup_auc"]) == ["age_band"]
    assert result["subgroup_auc"]["age_band"]["<30"]["num_patients"] is None
    _check_png(tmp_path / "partial" / "auc_by_subgroup.png", min_size=(500, 250))
    # No metadata at all: no subgroup figure, an empty breakdown.
    result = report.write_report(
        tmp_path / "none",
        probs=probs,
        labels=labels,
        class_names=["benign", "malignant"],
        malignant_classes=[1],
        metadata=None,
    )
    assert result == {"subgroup_auc": {}, "figures": list(report.FIGURES[:-1])}
    assert not (tmp_path / "none" / "auc_by_subgroup.png").exists()


def test_multiclass_and_one_class(tmp_path):
    rng = np.random.default_rng(2)
    names = ["MEL", "NV", "BCC", "BKL"]
    n = 300
    labels = rng.choice(4, n, p=[0.2, 0.5, 0.15, 0.15]).astype(np.int32)
    z = rng.normal(0, 1, (n, 4))
    z[np.arange(n), labels] += 2.0
    probs = (np.exp(z) / np.exp(z).sum(1, keepdims=True)).astype(np.float32)
    result = report.write_report(
        tmp_path / "multi",
        probs=probs,
        labels=labels,
        class_names=names,
        malignant_classes=[0, 2],
        threshold=0.5,
        metadata=None,
    )
    for name in result["figures"]:
        _check_png(tmp_path / "multi" / name)
    # Two panels (malignant vs benign, and one-vs-rest per class): a wide figure.
    with Image.open(tmp_path / "multi" / "roc.png") as im:
        assert im.width > 1.6 * im.height
    # A split with benign images only: no ROC to draw, but no crash and no NaN in the JSON.
    only_benign = np.ones(50, np.int32)  # NV
    result = report.write_report(
        tmp_path / "benign",
        probs=probs[:50],
        labels=only_benign,
        class_names=names,
        malignant_classes=[0, 2],
        metadata={"age": np.full(50, 40, np.int32)},
    )
    assert result["subgroup_auc"]["age_band"]["30-44"]["auc"] is None
    assert json.dumps(result, allow_nan=False)
    for name in result["figures"]:
        assert (tmp_path / "benign" / name).stat().st_size > 5000
