"""`isic-jax predict`: folder/CSV inputs, the round trip to evaluation's numbers, TTA, errors,
submission files."""

from __future__ import annotations

import csv
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from test_export import BEST_STEP, eval_probs, make_workdir

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(export dir, config, TrainState the export holds)."""
    from isic_jax.inference import export

    workdir = tmp_path_factory.mktemp("predict_run")
    config, states = make_workdir(workdir)
    out = tmp_path_factory.mktemp("predict_export") / "model"
    export.export_checkpoint(workdir, out, "best")
    return out, config, states[BEST_STEP]


def _smooth(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth RGB picture uint8 [H, W, 3] (JPEG-friendly, not symmetric)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    a, b, c = np.random.default_rng(seed).uniform(0.02, 0.2, 3)
    rgb = np.stack([128 + 100 * np.sin(a * yy + 0.3 * xx * b),
                    128 + 90 * np.cos(b * xx + c * yy),
                    60 + 0.4 * xx + 0.8 * yy], -1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> pathlib.Path:
    """Images of several formats and sizes (one in a subfolder), a corrupt JPEG, a non-image."""
    root = tmp_path_factory.mktemp("images")
    Image.fromarray(_smooth(64, 96, 1)).save(root / "ISIC_0000001.jpg", quality=90)
    Image.fromarray(_smooth(120, 80, 2)).save(root / "ISIC_0000002.png")
    Image.fromarray(_smooth(50, 50, 3)).convert("L").save(root / "ISIC_0000003.bmp")
    Image.fromarray(_smooth(70, 60, 4)).convert("RGBA").save(root / "ISIC_0000004.tif")
    (root / "sub").mkdir()
    Image.fromarray(_smooth(48, 48, 5)).save(root / "sub" / "ISIC_0000005.JPEG")
    (root / "ISIC_0000006.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "notes.txt").write_text("not an image, not listed")
    return root


def _read(path: pathlib.Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _expected(config, state, paths: list[pathlib.Path]) -> np.ndarray:
    """Evaluation's numbers: prepare's resize + eval_image, then `train.eval_step`."""
    from isic_jax.data import image_ops
    from isic_jax.data.isic import images

    stored = [images.process_image(p, int(config.data.stored_size)) for p in paths]
    batch = np.stack([image_ops.eval_image(s, int(config.data.image_size)) for s in stored])
    return eval_probs(config, state, batch)


@pytest.mark.parametrize("backend", ["export", "checkpoint"])
def test_cli_round_trip_on_two_devices_matches_evaluation(
    model, folder, tmp_path, backend: str
) -> None:
    """Both the StableHLO artefact and the Orbax variables (restored onto 2 devices)."""
    export_dir, config, state = model
    out = tmp_path / "preds.csv"
    env = dict(os.environ, JAX_PLATFORMS="cpu", CI="true",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    result = subprocess.run(
        [sys.executable, "-m", "isic_jax", "predict", "--model", str(export_dir), "--input",
         str(folder), "--output", str(out), "--batch_size", "4", "--backend", backend],
        cwd=str(REPO), env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Predicted 5/6 images" in result.stdout and "on 2 device(s)" in result.stdout
    assert f"backend {backend}" in result.stdout
    assert "predict: 6/6 images" in result.stderr  # plain progress lines under CI
    assert "1 image(s) could not be read" in result.stderr

    header, rows = _read(out)
    assert header == ["image_id", "path", "prob_benign", "prob_malignant", "prediction",
                      "malignant_probability", "malignant_at_threshold", "error"]
    # No validation evaluation in this run folder: T = 1 and config.eval.threshold.
    assert "malignant iff malignant_probability >= 0.5 " in result.stdout
    assert "probabilities not calibrated" in result.stdout
    by_id = {r["image_id"]: r for r in rows}
    assert sorted(by_id) == [f"ISIC_000000{i}" for i in range(1, 7)]
    assert by_id["ISIC_0000005"]["path"] == "sub/ISIC_0000005.JPEG"
    bad = by_id["ISIC_0000006"]
    assert bad["error"] and bad["prob_benign"] == "" and bad["prediction"] == ""
    good = [f"ISIC_000000{i}" for i in range(1, 6)]
    assert all(by_id[i]["error"] == "" for i in good)

    got = np.array([[float(by_id[i]["prob_benign"]), float(by_id[i]["prob_malignant"])]
                    for i in good])
    want = _expected(config, state, [folder / by_id[i]["path"] for i in good])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    for i, row in zip(good, want, strict=True):
        assert by_id[i]["prediction"] == ("malignant" if row[1] >= 0.5 else "benign")
        assert by_id[i]["malignant_at_threshold"] == str(int(row[1] >= 0.5))
        assert float(by_id[i]["malignant_probability"]) == pytest.approx(row[1], abs=1e-5)


def test_checkpoint_backend_gives_the_export_numbers(model, folder, tmp_path) -> None:
    from isic_jax.inference import predict

    export_dir, _, _ = model
    a = predict.predict_to_csv(export_dir, folder, tmp_path / "a.csv", progress=False)
    b = predict.predict_to_csv(export_dir, folder, tmp_path / "b.csv", backend="checkpoint",
                               progress=False)
    assert a.backend == "export" and b.backend == "checkpoint"
    assert a.errors == b.errors and a.num_failed == 1
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-5, rtol=0)


def test_tta_is_invariant_to_flipping_the_input(model, tmp_path) -> None:
    from isic_jax.data import image_ops
    from isic_jax.inference import export, predict

    export_dir, _, _ = model
    # Square, at the stored size and a multiple of 16 px: prepare does not resize it and the
    # JPEG blocks line up, so a flipped file is (up to JPEG rounding) the flipped image.
    picture = _smooth(48, 48, 7)
    flips = {"original": picture, "mirrored": picture[:, ::-1], "transposed":
             image_ops.dihedral(picture, 4), "rotated": image_ops.dihedral(picture, 3)}
    for name, array in flips.items():
        Image.fromarray(np.ascontiguousarray(array)).save(tmp_path / f"{name}.png")
    plain = predict.predict_to_csv(export_dir, tmp_path, tmp_path / "p.csv", progress=False)
    tta = predict.predict_to_csv(export_dir, tmp_path, tmp_path / "t.csv", tta_flips=True,
                                 progress=False)
    assert [i.image_id for i in tta.items] == ["mirrored", "original", "rotated", "transposed"]
    spread = lambda p: float(np.max(np.abs(p - p[1])))  # noqa: E731
    assert spread(tta.probs) < 1e-3
    assert spread(plain.probs) > 3e-3  # without TTA the flips do change the output

    # On the device arrays themselves (no JPEG on the way): equal to float rounding.
    loaded = predict.load_model(export_dir)
    f = predict.Runner(export.with_tta(loaded.forward), batch_size=8)
    x = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    base = f(x)
    for k in range(1, 8):
        flipped = np.stack([image_ops.dihedral(im, k) for im in x])
        np.testing.assert_allclose(f(flipped), base, atol=1e-6, rtol=0)


def test_submission_files_have_the_exact_columns(model, folder, tmp_path) -> None:
    from isic_jax.inference import predict, submission

    export_dir, _, _ = model
    ref = predict.predict_to_csv(export_dir, folder, tmp_path / "ref.csv", progress=False)
    malignant = {it.image_id: p[1] for it, p, e in zip(ref.items, ref.probs, ref.errors,
                                                        strict=True) if e is None}
    for name, id_col in (("isic2020", "image_name"), ("isic2024", "isic_id")):
        out = tmp_path / f"{name}.csv"
        summary = predict.predict_to_csv(export_dir, folder, out, submission=name,
                                         progress=False)
        header, rows = _read(out)
        assert header == [id_col, "target"]
        assert {r[id_col]: pytest.approx(float(r["target"]), abs=1e-6) for r in rows} \
            == malignant  # the failed image is left out ...
        _, errors = _read(summary.errors_file)  # ... and listed next to it
        assert summary.errors_file == tmp_path / f"{name}.errors.csv"
        assert [e["image_id"] for e in errors] == ["ISIC_0000006"] and errors[0]["error"]

    with pytest.raises(submission.SubmissionError, match="binary"):
        predict.predict_to_csv(export_dir, folder, tmp_path / "x.csv", submission="isic2019",
                               progress=False)
    assert not (tmp_path / "x.csv").exists()


def test_isic2019_submission_of_a_diagnosis_model(tmp_path, folder) -> None:
    from isic_jax.inference import export, predict

    make_workdir(tmp_path / "run", task="diagnosis", release="isic2019")
    export.export_checkpoint(tmp_path / "run", tmp_path / "model", verify=False)
    out = tmp_path / "sub.csv"
    summary = predict.predict_to_csv(tmp_path / "model", folder, out, submission="isic2019",
                                     progress=False)
    header, rows = _read(out)
    assert header == ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    assert len(rows) == 5 and all(r["UNK"] == "0" for r in rows)
    ok = [p for p, e in zip(summary.probs, summary.errors, strict=True) if e is None]
    got = np.array([[float(r[c]) for c in header[1:9]] for r in rows])
    np.testing.assert_allclose(got, np.array(ok), atol=1e-6)  # same classes, same order


def test_isic2019_columns_from_other_releases_classes() -> None:
    from isic_jax.data.isic import labels
    from isic_jax.inference import submission

    probs = np.eye(len(labels.ARCHIVE_CLASSES), dtype=np.float32)
    header, rows = submission.submission_table("isic2019", labels.ARCHIVE_CLASSES, probs,
                                            labels.ARCHIVE_CLASSES, [1])
    table = {r[0]: [float(v) for v in r[1:]] for r in rows}
    assert table["MEL"] == [1, 0, 0, 0, 0, 0, 0, 0, 0]
    assert table["other"] == table["unknown"] == [0, 0, 0, 0, 0, 0, 0, 0, 1]
    m2018 = submission.isic2019_matrix(labels.DIAGNOSIS_CLASSES["isic2018"])
    assert m2018[3].tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0]  # AKIEC -> AK
    assert m2018[:, 7].sum() == 0  # no SCC class: its column stays 0
    with pytest.raises(submission.SubmissionError, match=r"\['weird'\]"):
        submission.isic2019_matrix(["MEL", "weird"])


def test_csv_input_refuses_paths_outside_its_folder(model, folder, tmp_path) -> None:
    from isic_jax.inference import inputs, predict

    export_dir, _, _ = model
    images = tmp_path / "set"
    images.mkdir()
    Image.fromarray(_smooth(60, 60, 8)).save(images / "ISIC_1.jpg")
    Image.fromarray(_smooth(60, 60, 9)).save(tmp_path / "secret.jpg")  # exists, outside
    os.symlink(tmp_path / "secret.jpg", images / "link.jpg")
    (images / "list.csv").write_text(
        "image_name,age\nISIC_1,40\n../secret.jpg,50\n"
        f"{tmp_path / 'secret.jpg'},1\nlink.jpg,2\nISIC_404,3\n"
    )
    summary = predict.predict_to_csv(export_dir, images / "list.csv", tmp_path / "o.csv",
                                     progress=False)
    _, rows = _read(tmp_path / "o.csv")
    assert [r["image_id"] for r in rows] == [
        "ISIC_1", "../secret.jpg", str(tmp_path / "secret.jpg"), "link.jpg", "ISIC_404"]
    assert rows[0]["error"] == "" and float(rows[0]["prob_malignant"]) > 0
    for row in rows[1:4]:
        assert "resolves outside the CSV's folder" in row["error"] and row["prob_benign"] == ""
    assert "no such image file" in rows[4]["error"]
    assert summary.num_failed == 4

    # A `path` column (ids from its file names), relative to the CSV's folder.
    (tmp_path / "paths.csv").write_text("path\nset/ISIC_1.jpg\nset/../../x.jpg\n")
    items = inputs.list_inputs(tmp_path / "paths.csv")
    assert [(i.image_id, i.error is None) for i in items] == [("ISIC_1", True), ("x", False)]
    assert "resolves outside" in items[1].error


def test_folder_input_refuses_links_that_leave_it(tmp_path) -> None:
    from isic_jax.inference import inputs

    (tmp_path / "in").mkdir()
    Image.fromarray(_smooth(40, 40, 1)).save(tmp_path / "out.png")
    Image.fromarray(_smooth(40, 40, 2)).save(tmp_path / "in" / "a.png")
    os.symlink(tmp_path / "out.png", tmp_path / "in" / "b.png")
    items = inputs.list_inputs(tmp_path / "in")
    assert [(i.image_id, i.path is not None) for i in items] == [("a", True), ("b", False)]
    assert "outside the input folder" in items[1].error


def test_bad_inputs_fail_clearly(model, tmp_path) -> None:
    from isic_jax.inference import inputs, predict

    export_dir, _, _ = model
    with pytest.raises(inputs.InputError, match="neither a folder nor a CSV"):
        inputs.list_inputs(tmp_path / "missing")
    (tmp_path / "x.csv").write_text("name,age\na,1\n")
    with pytest.raises(inputs.InputError, match="needs a column `path`"):
        inputs.list_inputs(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match="isic-jax export"):
        predict.predict_to_csv(tmp_path, tmp_path, tmp_path / "o.csv")


def _with_meta(export_dir: pathlib.Path, target: pathlib.Path, edit) -> pathlib.Path:
    """A copy of an export whose model.json went through `edit(meta)`."""
    import json
    import shutil

    shutil.copytree(export_dir, target)
    meta = json.loads((target / "model.json").read_text())
    edit(meta)
    (target / "model.json").write_text(json.dumps(meta))
    return target


def test_predict_applies_the_stored_temperature_and_threshold(model, folder, tmp_path) -> None:
    from isic_jax.evaluation import calibration
    from isic_jax.inference import predict

    export_dir, _, _ = model
    raw = predict.predict_to_csv(export_dir, folder, tmp_path / "raw.csv", progress=False)
    ok = [i for i, e in enumerate(raw.errors) if e is None]
    p_raw = raw.probs[ok]
    def between(values: np.ndarray) -> float:
        """Halfway between the two middle values: both decisions occur, none at the edge."""
        v = np.sort(values)
        return float((v[len(v) // 2 - 1] + v[len(v) // 2]) / 2)

    t_cal = between(calibration.apply_temperature(p_raw, 0.25)[:, 1])
    t_raw = between(p_raw[:, 1])

    def calibrated(meta):
        meta["calibration"] = {"temperature": 0.25, "fitted": True}
        meta["threshold"] = t_cal
        meta["operating_point"] = {"threshold": t_cal, "threshold_uncalibrated": t_raw,
                                   "description": "chosen on val for sensitivity >= 0.90"}

    cal_dir = _with_meta(export_dir, tmp_path / "cal", calibrated)
    got = predict.predict_to_csv(cal_dir, folder, tmp_path / "cal.csv", progress=False)
    want = calibration.apply_temperature(p_raw, 0.25)
    np.testing.assert_allclose(got.probs[ok], want, atol=1e-5, rtol=0)
    assert np.max(np.abs(want - p_raw)) > 1e-3  # the temperature did something
    assert got.decision.temperature == 0.25 and got.decision.threshold == t_cal
    assert "chosen on val for sensitivity >= 0.90" in got.decision.describe()
    _, rows = _read(tmp_path / "cal.csv")
    rows = [r for r in rows if not r["error"]]
    flags = [r["malignant_at_threshold"] == "1" for r in rows]
    assert flags == [float(r["malignant_probability"]) >= t_cal for r in rows]
    assert 0 < sum(flags) < len(flags)
    assert [r["prediction"] for r in rows] == ["malignant" if f else "benign" for f in flags]

    # --no-calibration: raw probabilities and the threshold chosen for them.
    off = predict.predict_to_csv(cal_dir, folder, tmp_path / "off.csv", progress=False,
                                 calibrate=False)
    np.testing.assert_allclose(off.probs[ok], p_raw, atol=1e-6, rtol=0)
    assert off.decision.threshold == t_raw and off.decision.temperature == 1.0
    assert "--no-calibration" in off.decision.describe()


def test_exports_without_calibration_fields_still_predict(model, folder, tmp_path) -> None:
    """An export written before calibration existed: T = 1 and its own "threshold"."""
    from isic_jax.inference import predict

    export_dir, _, _ = model

    def old(meta):
        for key in ("calibration", "operating_point", "validation_source", "model_card"):
            meta.pop(key, None)
        meta["threshold"] = 0.7

    old_dir = _with_meta(export_dir, tmp_path / "old", old)
    summary = predict.predict_to_csv(old_dir, folder, tmp_path / "old.csv", progress=False)
    assert summary.decision.temperature == 1.0 and summary.decision.threshold == 0.7
    _, rows = _read(tmp_path / "old.csv")
    for r in rows:
        if not r["error"]:
            assert r["malignant_at_threshold"] == str(int(float(r["malignant_probability"]) >= 0.7))


def test_multiclass_prediction_follows_the_threshold() -> None:
    from isic_jax.inference import predict

    names = ["MEL", "NV", "BCC", "BKL"]
    p = np.array([0.2, 0.5, 0.25, 0.05], np.float32)  # NV most probable; MEL+BCC = 0.45
    assert predict.prediction_label(p, True, names, [0, 2]) == "BCC"  # malignant side
    assert predict.prediction_label(p, False, names, [0, 2]) == "NV"
