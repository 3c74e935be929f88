"""Cross-validation (`isic-jax cv`), out-of-fold predictions, ensemble export, final models.

A tiny synthetic ISIC 2020 dataset with 3 folds; tiny models, 2 steps per fold.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from train_helpers import cache_env, compile_cache, tiny_config  # noqa: F401

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_FOLDS = 3

pytestmark = pytest.mark.usefixtures("compile_cache")


def _cli(*args: str, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    full = {**cache_env(os.environ), "CI": "true", "JAX_PLATFORMS": "cpu", **env}
    # The CLI with the test kill hooks installed (they act only when ISIC_JAX_TEST_KILL_AT is set).
    return subprocess.run([sys.executable, "-m", "isic_jax.testing.cli", *args], cwd=str(REPO),
                          env=full, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
    from isic_jax.data import prepare, synth

    root = tmp_path_factory.mktemp("cvdata")
    synth.write_synthetic(root / "src", "isic2020", 48, 0, image_size=48)
    prepare.prepare(root / "src", root / "tfds", image_size=40, num_folds=NUM_FOLDS)
    return root / "tfds"


def _config(data_dir: pathlib.Path, **overrides):
    config = tiny_config(**{"train.num_steps": 2, "train.eval_every": 2,
                            "train.checkpoint_every": 1, "train.log_every": 1, **overrides})
    config.data.data_dir = str(data_dir)
    config.data.num_folds = NUM_FOLDS
    return config


def _config_args(data_dir: pathlib.Path) -> list[str]:
    """The same config on the command line: the smoke preset plus the overrides of _config."""
    config = _config(data_dir)
    keys = ["data.stored_size", "data.image_size", "data.device_prefetch", "model.width",
            "optim.name", "optim.learning_rate", "optim.weight_decay", "train.batch_size",
            "eval.batch_size", "train.num_steps", "train.log_every", "train.eval_every",
            "train.checkpoint_every", "data.data_dir"]
    out = ["--config=smoke"]
    for key in keys:
        node = config
        for part in key.split("."):
            node = node[part]
        out.append(f"--config.{key}={node}")
    return out


def _oof_rows(path: pathlib.Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_plan_names_members_and_refuses_bad_folds() -> None:
    from isic_jax.evaluation import cv

    assert [m.name for m in cv.plan(3, None, None, 7)] == ["fold_0", "fold_1", "fold_2"]
    assert all(m.seed == 7 for m in cv.plan(3, None, None, 7))
    members = cv.plan(3, [2], [0, 1], 7)
    assert [(m.name, m.fold, m.seed) for m in members] == [
        ("fold_2_seed_0", 2, 0), ("fold_2_seed_1", 2, 1)]
    with pytest.raises(cv.CVError, match="has 3 folds, 0 to 2"):
        cv.plan(3, [0, 5], None, 0)
    with pytest.raises(cv.CVError, match="distinct"):
        cv.plan(3, [1, 1], None, 0)


def test_foreign_workdirs_are_refused_untouched(data_dir, tmp_path) -> None:
    from isic_jax.evaluation import cv

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    with pytest.raises(cv.CVError, match="run folder of `isic-jax train`"):
        cv.open_workdir(run, _config(data_dir), NUM_FOLDS)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(cv.CVError, match="holds files but no cv.json"):
        cv.open_workdir(other, _config(data_dir), NUM_FOLDS)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["config.json", "notes.txt", "other",
                                                            "run"]


def test_cv_trains_every_fold_writes_oof_and_resumes(data_dir, tmp_path) -> None:
    from isic_jax.evaluation import cv

    workdir = tmp_path / "cv"
    result = cv.run_cv(_config(data_dir), workdir)
    assert result["members"] == ["fold_0", "fold_1", "fold_2"]
    summary = result["summary"]
    assert summary["complete"] and summary["missing"] == []
    assert [m["fold"] for m in summary["members"]] == [0, 1, 2]
    for member in ("fold_0", "fold_1", "fold_2"):
        saved = json.loads((workdir / member / "config.json").read_text())
        assert saved["data"]["val_fold"] == int(member[-1])
        assert (workdir / member / cv.MEMBER_DONE).is_file()

    # Every example of the dataset exactly once, each scored by the model that held it out.
    rows = _oof_rows(workdir / cv.OOF_FILE)
    from isic_jax.data import dataset

    config = _config(data_dir)
    total = sum(len(dataset.load_sources(_config(data_dir, **{"data.val_fold": k}).data)[1])
                for k in range(NUM_FOLDS))
    assert len(rows) == total == summary["oof"]["num_examples"]
    assert len({r["image_id"] for r in rows}) == total
    for k in range(NUM_FOLDS):
        fold_ids = {r["image_id"] for r in rows if r["fold"] == str(k)}
        member = _oof_rows(workdir / f"fold_{k}" / "eval" / "val" / "predictions.csv")
        assert fold_ids == {r["image_id"] for r in member}
    assert {"sex", "age", "anatom_site"} <= set(rows[0])  # subgroup metadata for stackers
    probs = np.array([[float(r["prob_benign"]), float(r["prob_malignant"])] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose([float(r["malignant_probability"]) for r in rows], probs[:, 1],
                               atol=1e-5)
    metrics = json.loads((workdir / cv.METRICS_FILE).read_text())
    aucs = [m["auc"] for m in metrics["members"]]
    assert metrics["mean"]["auc"] == pytest.approx(np.mean(aucs))
    assert metrics["std"]["auc"] == pytest.approx(np.std(aucs))
    assert 0.0 <= metrics["oof"]["auc"] <= 1.0

    # A second run skips the complete folds and rewrites the same summary.
    before = {p: p.stat().st_mtime_ns for p in workdir.glob("fold_*/checkpoints/*/")}
    again = cv.run_cv(config, workdir)
    assert again["summary"]["oof"] == summary["oof"]
    assert before == {p: p.stat().st_mtime_ns for p in workdir.glob("fold_*/checkpoints/*/")}

    # Another config is refused with the differences, and nothing is written.
    with pytest.raises(cv.CVError, match=r"train.num_steps: 2 -> 3"):
        cv.run_cv(_config(data_dir, **{"train.num_steps": 3}), workdir)


@pytest.mark.slow
def test_cli_refusals_keep_the_workdir_as_it_was(data_dir, tmp_path) -> None:
    workdir = tmp_path / "cv"
    args = _config_args(data_dir)
    out_of_range = _cli("cv", *args, f"--workdir={workdir}", "--folds=0,4")
    assert out_of_range.returncode == 2, out_of_range.stderr[-2000:]
    assert "--folds 4: the prepared dataset has 3 folds, 0 to 2" in out_of_range.stderr
    assert not workdir.exists()

    summarize_nothing = _cli("cv", f"--workdir={workdir}", "--summarize")
    assert summarize_nothing.returncode == 2
    assert "is not a cross-validation workdir" in summarize_nothing.stderr

    # One fold, killed after its second step (checkpoint 1 saved): the rerun resumes from it.
    killed = _cli("cv", *args, f"--workdir={workdir}", "--folds=1",
                  ISIC_JAX_TEST_KILL_AT="after_step:2")
    assert killed.returncode != 0
    assert not (workdir / "fold_1" / "cv_member.json").exists()
    resumed = _cli("cv", *args, f"--workdir={workdir}", "--folds=1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {workdir}/fold_1/checkpoints/1" in resumed.stdout
    assert "not complete yet: fold_0, fold_2" in resumed.stdout  # the table says what is missing
    assert not (workdir / "fold_0").exists()

    listed = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    for bad in (["train", *args, f"--workdir={workdir}"],
                ["cv", *args, f"--workdir={workdir}", "--config.train.num_steps=3"]):
        refused = _cli(*bad)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert ("cross-validation workdir" in refused.stderr
                or "train.num_steps: 2 -> 3" in refused.stderr)
    assert listed == sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))


@pytest.mark.slow
def test_ensemble_export_averages_the_folds_and_predict_uses_it(data_dir, tmp_path) -> None:
    from isic_jax.evaluation import cv
    from isic_jax.inference import ensemble, export, predict

    workdir = tmp_path / "cv"
    cv.run_cv(_config(data_dir), workdir, summarize=True)
    meta = ensemble.export_ensemble(ensemble.cv_members(workdir), tmp_path / "ens")
    assert [m["fold"] for m in meta["members"]] == [0, 1, 2]
    assert meta["format_version"] == 2 and meta["ensemble"]["size"] == 3
    assert meta["ensemble"]["cv"]["oof"]["num_examples"] > 0
    assert meta["export"]["verified_max_abs_diff"] <= 1e-5
    # Temperature and threshold fitted on the pooled out-of-fold predictions; a model card.
    assert meta["calibration"]["fitted"] and meta["calibration"]["fitted_on"] == "oof"
    assert 0.0 < meta["threshold"] < 1.0 and "out-of-fold" in meta["validation_source"]
    card = json.loads((tmp_path / "ens" / "model_card.json").read_text())
    assert (tmp_path / "ens" / "MODEL_CARD.md").stat().st_size > 500

    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    singles = []
    for k in range(NUM_FOLDS):
        export.export_checkpoint(workdir / f"fold_{k}", tmp_path / f"single_{k}")
        singles.append(np.asarray(export.load_exported(tmp_path / f"single_{k}").call(images)))
    averaged = np.asarray(export.load_exported(tmp_path / "ens").call(images))
    assert card["model"]["parameters"] == sum(  # every member's parameters counted
        json.loads((tmp_path / f"single_{k}" / "model_card.json").read_text())["model"]
        ["parameters"] for k in range(NUM_FOLDS))
    np.testing.assert_allclose(averaged, np.mean(singles, axis=0), atol=1e-5)
    rebuilt = predict.load_model(tmp_path / "ens", backend="checkpoint")
    np.testing.assert_allclose(np.asarray(rebuilt.forward(images)), averaged, atol=1e-5)

    # TTA inside: invariant to flipping the input; predict --tta on top is refused.
    tta = ensemble.export_ensemble(ensemble.cv_members(workdir), tmp_path / "tta", tta=True)
    assert tta["export"]["tta_inside"]
    with_tta = export.load_exported(tmp_path / "tta").call
    np.testing.assert_allclose(np.asarray(with_tta(images[:, ::-1])),
                               np.asarray(with_tta(images)), atol=1e-5)
    folder = tmp_path / "inputs"
    folder.mkdir()
    from PIL import Image

    Image.fromarray(images[0]).save(folder / "a.png")
    ok = predict.predict_to_csv(tmp_path / "ens", folder, tmp_path / "p.csv", progress=False)
    assert ok.num_failed == 0
    with pytest.raises(ValueError, match="already averages the 8 flips"):
        predict.predict_to_csv(tmp_path / "tta", folder, tmp_path / "q.csv", tta_flips=True,
                               progress=False)

    # Members that do not fit together are refused by name, before anything is written.
    other = tmp_path / "other"
    from isic_jax.testing import runs

    runs.train(_config(data_dir, **{"data.image_size": 36}), other)
    mixed = r"(?s)other cannot join.*\n  image_size: 32 -> 36"
    with pytest.raises(export.ExportError, match=mixed):
        ensemble.export_ensemble([workdir / "fold_0", other], tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()


@pytest.mark.slow
def test_final_model_on_all_folds_has_no_validation(data_dir, tmp_path) -> None:
    from isic_jax.data import dataset
    from isic_jax.testing import runs
    from isic_jax.training import checkpointing

    config = _config(data_dir, **{"data.val_fold": -1})
    data = dataset.InputData(config)
    assert not data.has_val
    folds = [dataset.InputData(_config(data_dir, **{"data.val_fold": k})) for k in range(3)]
    assert data.num_train == sum(len(f.val_source) for f in folds)
    result = runs.train(config, tmp_path / "final")
    assert result["val"] is None and result["step"] == 2
    assert not (tmp_path / "final" / "eval_history.jsonl").exists()
    with checkpointing.open_checkpointer(tmp_path / "final", config, read_only=True) as ckpt:
        assert ckpt.all_steps() == [1, 2] and ckpt.best_step() is None
    refused = _cli("evaluate", f"--workdir={tmp_path / 'final'}", "--noreport")
    assert refused.returncode == 2 and "no validation fold" in refused.stderr
    on_fold = _cli("evaluate", f"--workdir={tmp_path / 'final'}", "--split=fold1", "--noreport")
    assert on_fold.returncode == 0, on_fold.stderr[-3000:]
