"""The metadata half of the model: the fused branch, training and evaluation with it, export and
predict with a metadata input, ensembles of fold models, per-source metrics and the stacking
features file."""

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
FEATURES = "age,sex,site,images_per_patient,tbp_lv_*"

pytestmark = pytest.mark.usefixtures("compile_cache")


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**cache_env(os.environ), "CI": "true", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "isic_jax", *args], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def tabular(tmp_path_factory) -> pathlib.Path:
    """A synthetic ISIC 2024-style release (tabular columns with a signal), prepared."""
    from isic_jax.data import prepare, synth

    root = tmp_path_factory.mktemp("meta")
    synth.write_synthetic(root / "src", "isic2024", 160, 0)
    prepare.prepare(root / "src", root / "tfds", image_size=40, num_folds=3)
    return root


def _config(root: pathlib.Path, **overrides):
    config = tiny_config(**{"train.num_steps": 4, "train.eval_every": 4,
                            "train.checkpoint_every": 2, **overrides})
    config.data.release = "isic2024"
    config.data.data_dir = str(root / "tfds")
    config.data.num_folds = 3
    config.model.metadata = FEATURES
    return config


def _encoder(root: pathlib.Path):
    from isic_jax.data.dataset import InputData

    return InputData(_config(root)).metadata


def test_branch_fuses_metadata_and_feature_dropout_replaces_features(tabular) -> None:
    import jax
    import jax.numpy as jnp

    from isic_jax.models import create_model, init_variables

    encoder = _encoder(tabular)
    config = _config(tabular)
    model = create_model(config.model, 2, metadata=encoder)
    assert model.metadata_width == encoder.width == len(encoder.columns())
    variables = init_variables(model, jax.random.PRNGKey(0), 32)
    head_in = variables["params"]["head"]["kernel"].shape[0]
    plain = init_variables(create_model(config.model, 2), jax.random.PRNGKey(0), 32)
    assert head_in == plain["params"]["head"]["kernel"].shape[0] + 128  # + metadata_hidden
    x = jnp.zeros((5, 32, 32, 3))
    m = jnp.asarray(np.random.default_rng(0).standard_normal((5, encoder.width)), jnp.float32)
    with pytest.raises(ValueError, match="takes metadata"):
        model.apply(variables, x, train=False)
    logits, emb = model.apply(variables, x, train=False, metadata=m, return_embedding=True)
    assert logits.shape == (5, 2) and emb.shape == (5, head_in)
    missing = jnp.broadcast_to(jnp.asarray(encoder.missing_row()), m.shape)
    # Metadata changes the logits; in eval mode no feature is dropped (deterministic).
    assert not np.allclose(logits, model.apply(variables, x, train=False, metadata=missing))
    np.testing.assert_array_equal(logits, model.apply(variables, x, train=False, metadata=m))
    # Dropout probability 1: every feature of every example reads as missing.
    config.model.metadata_dropout = 0.999999
    dropping = create_model(config.model, 2, metadata=encoder)
    train_out, _ = dropping.apply(variables, x, train=True, metadata=m, mutable=["batch_stats"],
                                  rngs={"dropout": jax.random.PRNGKey(1)})
    ref, _ = dropping.apply(variables, x, train=True, metadata=missing, mutable=["batch_stats"],
                            rngs={"dropout": jax.random.PRNGKey(1)})
    np.testing.assert_allclose(train_out, ref, atol=1e-6)
    assert encoder.groups()[:2] == [0, 0]  # age: value and missing indicator


def test_recoder_maps_one_fold_encoding_onto_another(tabular) -> None:
    from isic_jax.data import metadata

    base = _encoder(tabular)
    data = base.to_json()
    for f in data["features"]:  # another fold: other statistics, a category fewer
        if f["kind"] == "numeric":
            f["mean"], f["std"] = f["mean"] + 2.0, f["std"] * 3.0
        elif len(f["categories"]) > 1:
            f["categories"] = f["categories"][1:]
    other = metadata.MetadataEncoder.from_json(data)
    with open(tabular / "src" / "train-metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:40]
    mine, _ = base.encode_rows(rows)
    theirs, _ = other.encode_rows(rows)
    np.testing.assert_allclose(np.asarray(other.recoder(base)(mine)), theirs, atol=1e-5)
    np.testing.assert_array_equal(base.recoder(base)(mine), mine)
    data["features"] = data["features"][1:]
    with pytest.raises(ValueError, match="other features"):
        metadata.MetadataEncoder.from_json(data).recoder(base)


@pytest.mark.slow
def test_train_evaluate_export_predict_with_metadata(tabular, tmp_path) -> None:
    from isic_jax.data import metadata
    from isic_jax.inference import export, predict
    from isic_jax.testing import runs

    workdir = tmp_path / "run"
    runs.train(_config(tabular), workdir)
    saved = metadata.load_encoder(workdir)
    assert saved is not None and saved.names[:4] == ["age", "sex", "site", "images_per_patient"]
    features = tmp_path / "features.csv"
    result = runs.evaluate(workdir, "val", "latest", report=True)
    assert 0.0 <= result["auc"] <= 1.0 and "mistakes.png" in result["figures"]
    done = _cli("evaluate", f"--workdir={workdir}", "--noreport", f"--features={features}")
    assert done.returncode == 0, done.stderr[-3000:]
    with open(features, newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == result["num_examples"]
    assert {"emb_0", "malignant_probability", "tbp_lv_areaMM2", "patient_rank",
            "tbp_lv_areaMM2_minus_patient_mean"} <= set(table[0])

    meta = export.export_checkpoint(workdir, tmp_path / "exp")
    width = saved.width
    assert meta["input"]["metadata"]["shape"] == [None, width]
    assert len(meta["metadata"]["columns"]) == width
    assert meta["export"]["verified_max_abs_diff"] <= 1e-5

    # predict: metadata read from the CSV by ISIC column names; a folder has none (missing).
    images = tmp_path / "images"
    images.mkdir()
    import h5py

    with open(tabular / "src" / "train-metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:6]
    with h5py.File(tabular / "src" / "train-image.hdf5") as f:
        for r in rows:
            (images / f"{r['isic_id']}.jpg").write_bytes(f[r["isic_id"]][()])
    with open(images / "inputs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    from_csv = predict.predict_to_csv(tmp_path / "exp", images / "inputs.csv",
                                      tmp_path / "a.csv", progress=False)
    via_checkpoint = predict.predict_to_csv(tmp_path / "exp", images / "inputs.csv",
                                            tmp_path / "b.csv", backend="checkpoint",
                                            progress=False)
    np.testing.assert_allclose(from_csv.probs, via_checkpoint.probs, atol=1e-5)
    folder = _cli("predict", f"--model={tmp_path / 'exp'}", f"--input={images}",
                  f"--output={tmp_path / 'c.csv'}")
    assert folder.returncode == 0, folder.stderr[-3000:]
    assert folder.stderr.count("treated as missing") == 1  # one warning, no skipped image
    with open(tmp_path / "c.csv", newline="") as fh:
        no_meta = {r["image_id"]: float(r["prob_malignant"]) for r in csv.DictReader(fh)}
    with_meta = {i.image_id: p[1] for i, p in zip(from_csv.items, from_csv.probs, strict=True)}
    assert set(no_meta) == set(with_meta) and len(no_meta) == 6
    assert any(abs(no_meta[k] - with_meta[k]) > 1e-6 for k in no_meta)


@pytest.mark.slow
def test_ensemble_of_fold_models_takes_one_metadata_encoding(tabular, tmp_path) -> None:
    from isic_jax.data import metadata
    from isic_jax.evaluation import cv
    from isic_jax.inference import ensemble, export

    workdir = tmp_path / "cv"
    cv.run_cv(_config(tabular, **{"train.num_steps": 2, "train.eval_every": 2}), workdir,
              folds=[0, 1], summarize=False)
    members = [workdir / "fold_0", workdir / "fold_1"]
    encoders = [metadata.load_encoder(m) for m in members]
    assert encoders[0].to_json() != encoders[1].to_json()  # fitted on other training folds
    meta = ensemble.export_ensemble(members, tmp_path / "ens")
    assert meta["input"]["metadata"]["shape"] == [None, encoders[0].width]
    with open(tabular / "src" / "train-metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:4]
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    singles = []
    for k, member in enumerate(members):
        export.export_checkpoint(member, tmp_path / f"single_{k}")
        own, _ = encoders[k].encode_rows(rows)  # each member's own encoding of the same rows
        singles.append(np.asarray(export.load_exported(tmp_path / f"single_{k}").call(
            images, own)))
    shared, _ = encoders[0].encode_rows(rows)
    got = np.asarray(export.load_exported(tmp_path / "ens").call(images, shared))
    np.testing.assert_allclose(got, np.mean(singles, axis=0), atol=1e-5)


def test_several_releases_report_metrics_per_source(tmp_path) -> None:
    from isic_jax.data import prepare, synth
    from isic_jax.testing import runs

    for release, n in (("isic2019", 60), ("isic2020", 60)):
        synth.write_synthetic(tmp_path / release, release, n, 1)
        prepare.prepare(tmp_path / release, tmp_path / "tfds", image_size=40, num_folds=3)
    config = tiny_config(**{"train.num_steps": 2, "train.eval_every": 2})
    config.data.release = "isic2019+isic2020"
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.num_folds = 3
    workdir = tmp_path / "run"
    runs.train(config, workdir)
    result = runs.evaluate(workdir, "val", "latest", report=False)
    by_source = result["by_source"]
    assert set(by_source) == {"isic2019", "isic2020"}
    assert sum(v["num_examples"] for v in by_source.values()) == result["num_examples"]
    assert set(result["subgroup_auc"]["source"]) == {"isic2019", "isic2020"}
    with open(workdir / "eval" / "val" / "predictions.csv", newline="") as fh:
        sources = {r["source"] for r in csv.DictReader(fh)}
    assert sources == {"isic2019", "isic2020"}
    saved = json.loads((workdir / "eval" / "val" / "metrics.json").read_text())
    assert saved["by_source"]["isic2020"]["num_examples"] == by_source["isic2020"]["num_examples"]


def test_patient_context_ranks_and_centres_within_each_patient() -> None:
    from isic_jax.evaluation import features
    from isic_jax.training import predictions

    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.4, 0.6]], np.float32)
    preds = predictions.Predictions(
        probs=probs, labels=np.array([0, 1, 0, 1]), index=np.arange(4),
        image_id=np.array(["a", "b", "c", "d"], object),
        patient_id=np.array(["p", "p", "p", ""], object),
        sex=np.array([1, 1, 1, 2]), age=np.array([40, 40, 40, -1]),
        anatom_site=np.array(["torso"] * 4, object), embedding=np.eye(4, dtype=np.float32),
    )
    source = [{"images_per_patient": 3, "tabular": [1.0]}, {"images_per_patient": 3,
               "tabular": [4.0]}, {"images_per_patient": 3, "tabular": [7.0]},
              {"images_per_patient": -1, "tabular": [2.0]}]
    table = features.feature_table(preds, ["benign", "malignant"], [1], source,
                                   {"": ["tbp_x"]})
    assert table["patient_rank"][:3] == [3.0, 1.0, 2.0] and np.isnan(table["patient_rank"][3])
    np.testing.assert_allclose(table["malignant_probability_minus_patient_mean"][:3],
                               [0.1 - 1.4 / 3, 0.8 - 1.4 / 3, 0.5 - 1.4 / 3], atol=1e-6)
    assert table["tbp_x_minus_patient_mean"][:3] == [-3.0, 0.0, 3.0]
    assert np.isnan(table["images_per_patient"][3]) and table["emb_3"] == [0, 0, 0, 1]
    assert table["sex"] == ["female", "female", "female", "male"]


def test_pretrained_backbone_with_a_fresh_metadata_branch_and_head(tabular) -> None:
    import jax
    import optax

    from isic_jax.models import create_model, init_variables
    from isic_jax.training.state import create_train_state

    config = _config(tabular)
    image_only = init_variables(create_model(config.model, 2), jax.random.PRNGKey(3), 32)
    model = create_model(config.model, 2, metadata=_encoder(tabular))
    state = create_train_state(model, optax.sgd(0.1), jax.random.PRNGKey(0), 32,
                               variables=image_only)
    np.testing.assert_array_equal(state.params["stem_conv"]["kernel"],
                                  image_only["params"]["stem_conv"]["kernel"])
    assert "metadata" in state.params
    assert state.params["head"]["kernel"].shape[0] > image_only["params"]["head"]["kernel"].shape[0]
