"""End to end through the CLI: synth -> prepare -> train (2 fake devices) -> evaluate.

Every command runs as `python -m isic_jax ...` in a subprocess, as a user would run it.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from train_helpers import cache_env, compile_cache  # noqa: F401

REPO = pathlib.Path(__file__).resolve().parents[1]
FIGURES = ("roc.png", "pr.png", "operating_point.png", "confusion_matrix.png", "calibration.png",
           "score_distribution.png", "auc_by_subgroup.png", "mistakes.png")

pytestmark = pytest.mark.usefixtures("compile_cache")


def _run(args: list[str], devices: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    env = cache_env(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["CI"] = "true"  # plain progress lines, no bar
    return subprocess.run(
        [sys.executable, "-m", "isic_jax", *args], cwd=str(REPO), env=env,
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("e2e")
    _ok(_run(["synth", "--output", str(root / "src"), "--format", "isic2020",
              "--num-images", "60"]))
    _ok(_run(["prepare", "--source", str(root / "src"), "--data-dir", str(root / "tfds"),
              "--image-size", "96"]))
    return root / "tfds"


@pytest.fixture(scope="module")
def trained(data_dir: pathlib.Path, tmp_path_factory) -> tuple[pathlib.Path, str]:
    workdir = tmp_path_factory.mktemp("run") / "smoke"
    out = _ok(_run(["train", "--config", "configs/smoke.py", "--workdir", str(workdir),
                    f"--config.data.data_dir={data_dir}"]))
    return workdir, out


@pytest.mark.slow
def test_train_writes_checkpoints_logs_and_config(trained) -> None:
    workdir, out = trained
    assert "on 2 cpu device(s) (jit)" in out
    assert "[train step 6/6]" in out and "[val step 6/6]" in out and "img/s" in out
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) \
        == [3, 6]
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["name"] == "resnet_tiny"
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))


def test_second_train_resumes_from_the_workdir(trained, data_dir) -> None:
    workdir, _ = trained
    out = _ok(_run(["train", "--config", "configs/smoke.py", "--workdir", str(workdir),
                    f"--config.data.data_dir={data_dir}"]))
    assert "Resuming from" in out and "checkpoints/6 (6/6)" in out
    assert "Nothing to do" in out


def _check_png(path: pathlib.Path) -> None:
    """A real PNG of a drawn figure: not tiny, not a blank canvas, with colour in it."""
    assert path.exists(), path
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width >= 500 and im.height >= 350, (path.name, im.size)
        pix = np.asarray(im.convert("RGB"), np.float32)
    assert pix.std() > 15, path.name
    chroma = pix.max(axis=-1) - pix.min(axis=-1)
    assert np.mean(chroma > 40) > 0.001, path.name


@pytest.mark.slow
def test_evaluate_writes_metrics_and_predictions(trained) -> None:
    workdir, _ = trained
    out = _ok(_run(["evaluate", "--workdir", str(workdir)]))
    assert "metrics.json" in out
    out_dir = workdir / "eval" / "val"
    assert f"figures in {out_dir}" in out
    metrics = json.loads((workdir / "eval" / "val" / "metrics.json").read_text())
    assert metrics["step"] == 6 and metrics["split"] == "val"
    for key in ("auc", "pauc_80", "balanced_accuracy", "sensitivity", "specificity", "loss"):
        assert key in metrics
    with open(workdir / "eval" / "val" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == metrics["num_examples"] > 0
    assert rows[0]["image_id"].startswith("ISIC_")
    assert len({r["image_id"] for r in rows}) == len(rows)

    # The report: every figure, the AUC by subgroup (synth has site, sex and age), and the
    # mistakes of the Grad-CAM grid, each one a wrong prediction of predictions.csv.
    assert metrics["figures"] == list(FIGURES)
    for name in FIGURES:
        _check_png(out_dir / name)
    assert set(metrics["subgroup_auc"]) == {"anatom_site", "sex", "age_band"}
    assert sum(g["n"] for g in metrics["subgroup_auc"]["sex"].values()) == len(rows)
    by_id = {r["image_id"]: r for r in rows}
    names = metrics["class_names"]
    mistakes = metrics["most_confident_mistakes"]
    assert 0 < len(mistakes) <= 16
    for m in mistakes:
        row = by_id[m["image_id"]]
        assert m["label"] == names[int(row["label"])] != m["predicted"]
        assert m["index"] == int(row["index"])
        assert abs(float(row[f"prob_{m['predicted']}"]) - m["probability"]) < 1e-4
    confidence = [m["probability"] for m in mistakes]
    assert confidence == sorted(confidence, reverse=True)

    # Another split of the prepared dataset, the best checkpoint, one device, no report.
    out = _ok(_run(["evaluate", "--workdir", str(workdir), "--split", "fold1", "--checkpoint",
                    "best", "--noreport"], devices=1))
    other = json.loads((workdir / "eval" / "fold1" / "metrics.json").read_text())
    assert other["split"] == "fold1" and other["step"] in (3, 6)
    assert "figures" not in other and "figures in" not in out
    assert not list((workdir / "eval" / "fold1").glob("*.png"))

    bad = _run(["evaluate", "--workdir", str(workdir), "--split", "nope"], devices=1)
    assert bad.returncode == 2 and "unknown split 'nope'" in bad.stderr


@pytest.mark.slow
def test_nan_loss_exits_nonzero_and_keeps_last_good_checkpoint(data_dir, tmp_path) -> None:
    workdir = tmp_path / "nan"
    result = _run(["train", "--config", "configs/smoke.py", "--workdir", str(workdir),
                   f"--config.data.data_dir={data_dir}", "--config.optim.learning_rate=1e30",
                   "--config.train.checkpoint_every=1", "--config.train.log_every=1"])
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Non-finite" in result.stderr and "is the last good one" in result.stderr
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and f"(step {steps[-1]}) is the last good one" in result.stderr


@pytest.mark.slow
def test_evaluate_export_predict_compare_carry_intervals_calibration_and_threshold(
    trained, data_dir, tmp_path
) -> None:
    """The clinical-report path end to end: metrics with intervals and report.html, an export
    whose model.json and model card carry the validation fold's temperature and threshold,
    predict applying them, and compare on two evaluations of the same split."""
    workdir, _ = trained
    out = _ok(_run(["evaluate", "--workdir", str(workdir), "--checkpoint", "3",
                    "--bootstrap-samples", "200"], devices=1))
    assert "AUC" in out and "report: " in out and "intervals: 200 resamples" in out
    val = workdir / "eval" / "val"
    first = json.loads((val / "metrics.json").read_text())
    assert first["step"] == 3 and first["bootstrap"]["num_resamples"] == 200
    assert first["bootstrap"]["unit"] == "patient"  # synth data has patient ids
    assert len(first["auc_ci"]) == 2 and first["calibration"]["temperature"] > 0
    html = (val / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(first["figures"])
    shutil.copytree(val, tmp_path / "step3")

    out = _ok(_run(["evaluate", "--workdir", str(workdir), "--checkpoint", "6",
                    "--bootstrap-samples", "200", "--threshold-method", "youden"], devices=1))
    metrics = json.loads((val / "metrics.json").read_text())
    assert metrics["operating_point"]["method"] == "youden"
    with open(val / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    flagged = [r["malignant_at_threshold"] == "1" for r in rows]
    t = metrics["threshold"]
    assert flagged == [float(r["malignant_probability"]) >= t for r in rows]

    bad = _run(["evaluate", "--workdir", str(workdir), "--target-sensitivity", "1.5"], devices=1)
    assert bad.returncode == 2 and "config.eval.target_sensitivity" in bad.stderr

    compared = _run(["compare", str(tmp_path / "step3"), str(workdir),
                     "--bootstrap-samples", "100", "--output", str(tmp_path / "cmp.json")],
                    devices=1)
    assert "B - A" in _ok(compared)
    result = json.loads((tmp_path / "cmp.json").read_text())
    assert result["num_examples"] == metrics["num_examples"]
    assert result["auc"]["b"] == pytest.approx(metrics["auc"], abs=1e-4)

    export_dir = tmp_path / "export"
    out = _ok(_run(["export", "--workdir", str(workdir), "--output", str(export_dir)],
                   devices=1))
    assert f"threshold {t:.4g} (Youden's J on val" in out and "model card" in out
    meta = json.loads((export_dir / "model.json").read_text())
    assert meta["threshold"] == pytest.approx(t)
    assert meta["calibration"]["temperature"] == pytest.approx(
        metrics["calibration"]["temperature"])
    assert meta["validation_source"].startswith(str(val))  # reused, not evaluated again
    card = json.loads((export_dir / "model_card.json").read_text())
    data = card["training_data"]
    assert sum(data["splits"]["validation"]["counts"].values()) == metrics["num_examples"]
    assert data["num_folds"] == 5 and card["subgroups"] == metrics["subgroup_auc"]
    assert card["validation"]["metrics"][0]["ci"] == metrics["auc_ci"]
    text = (export_dir / "MODEL_CARD.md").read_text()
    for section in ("## Intended use", "## Training data", "## Validation", "## Calibration",
                    "## Operating threshold", "## Subgroups", "## Limitations", "## Software"):
        assert section in text
    assert "not a medical device" in text and "## Cross-validation" not in text

    images = tmp_path / "images"
    images.mkdir()
    for k, src in enumerate(sorted((data_dir.parent / "src" / "train").glob("*.jpg"))[:4]):
        shutil.copy(src, images / f"img{k}.jpg")
    out = _ok(_run(["predict", "--model", str(export_dir), "--input", str(images), "--output",
                    str(tmp_path / "p.csv")], devices=1))
    assert f"malignant iff malignant_probability >= {t:.4g} (Youden's J on val" in out
