"""Dataset version 1.1.0 (the metadata features) and prepared 1.0.0 datasets: still read for
image-only runs, a clear message for what they lack, and `prepare` building 1.1.0 beside them."""

from __future__ import annotations

import math
import os
from collections import Counter

import numpy as np
import pytest
import tensorflow_datasets as tfds
from isic_jax.configs import default

from isic_jax.data import dataset, metadata, pipeline, synth
from isic_jax.data import prepare as prepare_lib
from isic_jax.data.isic import builder as isic
from isic_jax.data.isic.layouts.isic2024 import TABULAR, TABULAR_TEXT
from isic_jax.testing import legacy

SIZE = 32


def _config(data_dir, release: str = "isic2024", **overrides):
    config = default.get_config()
    config.data.release, config.data.stored_size = release, SIZE
    config.data.data_dir, config.data.image_size = str(data_dir), SIZE
    config.data.num_workers, config.data.val_fold = 0, 0
    config.train.batch_size = config.eval.batch_size = 4
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


@pytest.fixture(scope="module")
def source_2024(tmp_path_factory):
    root = tmp_path_factory.mktemp("src2024")
    synth.write_synthetic(root, "isic2024", 40, 0, 0.2, 40)
    return root


def _build_v1_0(source, data_dir) -> None:
    builder = legacy.make_builder_v1_0(
        "isic2024", SIZE, data_dir, options=isic.BuildOptions(num_folds=2, num_workers=2)
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(source))
    )


def test_version_1_1_records_hold_the_metadata(source_2024, tmp_path):
    report = prepare_lib.prepare(source_2024, tmp_path / "d", image_size=SIZE, num_folds=2)
    assert report["dataset"] == "isic/isic2024_32/1.1.0" and report["older_versions"] == []
    builder = isic.make_builder("isic2024", SIZE, tmp_path / "d")
    meta = builder.info.metadata
    assert meta["tabular_columns"] == list(TABULAR) and len(TABULAR) == 34
    assert meta["tabular_text_columns"] == list(TABULAR_TEXT)
    assert "tbp_lv_areaMM2" in TABULAR and "mel_thick_mm" not in TABULAR  # no label leak
    assert (
        "1.1.0" in builder.RELEASE_NOTES and "images_per_patient" in builder.RELEASE_NOTES["1.1.0"]
    )
    train, val, info = dataset.load_sources(_config(tmp_path / "d").data)
    records = [train[i] for i in range(len(train))] + [val[i] for i in range(len(val))]
    per_patient = Counter(r["patient_id"] for r in records if r["patient_id"])
    for rec in records:
        assert rec["images_per_patient"] == per_patient.get(rec["patient_id"], -1)
        assert len(rec["tabular"]) == 34 and len(rec["tabular_text"]) == 3
        assert rec["attribution"] and rec["copyright_license"] in (b"CC-BY", b"CC-0", b"CC-BY-NC")
    assert max(per_patient.values()) > 1
    rows = {r["isic_id"]: r for r in _csv(source_2024 / "train-metadata.csv")}
    rec = records[0]
    row = rows[rec["image_id"].decode()]
    got = dict(zip(TABULAR, rec["tabular"], strict=True))
    assert math.isclose(got["tbp_lv_areaMM2"], float(row["tbp_lv_areaMM2"]), rel_tol=1e-6)
    assert rec["tabular_text"][1].decode() == row["tbp_lv_location"]
    assert info.datasets[0]["version"] == "1.1.0"
    assert info.datasets[0]["tabular_columns"] == list(TABULAR)


def _csv(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_1_0_dataset_still_trains_image_only_and_says_what_it_lacks(source_2024, tmp_path):
    data_dir = tmp_path / "d"
    _build_v1_0(source_2024, data_dir)
    assert isic.prepared_versions("isic2024", SIZE, data_dir) == ["1.0.0"]
    config = _config(data_dir)
    dataset.check_prepared_dataset(config.data)
    data = dataset.InputData(config)
    assert data.info.datasets[0]["version"] == "1.0.0"
    assert "images_per_patient" not in data.train_source[0]
    batch = next(data.train_iterator())
    assert batch["image"].shape == (4, SIZE, SIZE, 3) and "metadata" not in batch
    assert batch["source"].tolist() == [b"isic2024"] * 4
    evals = list(data.eval_batches("val"))
    assert sum(int(b["mask"].sum()) for b in evals) == data.info.num_val
    assert len(data.source("fold1")) == data.info.num_val  # a named split, as evaluate asks
    # Metadata that 1.0.0 stores works; what only 1.1.0 has fails, saying what to run.
    with_meta = dataset.InputData(_config(data_dir, **{"model.metadata": "age,sex,site"}))
    assert next(with_meta.train_iterator())["metadata"].shape[0] == 4
    for spec in ("age,images_per_patient", "tbp_lv_*"):
        with pytest.raises(metadata.MetadataFeatureError) as info:
            dataset.InputData(_config(data_dir, **{"model.metadata": spec}))
        message = str(info.value)
        assert "version 1.0.0" in message and "isic-jax prepare" in message
        assert f"--data-dir {data_dir}" in message and f"--image-size {SIZE}" in message
    # Prepare builds 1.1.0 beside it; then the new features are there, the old folder stays.
    report = prepare_lib.prepare(source_2024, data_dir, image_size=SIZE, num_folds=2)
    assert report["dataset"] == "isic/isic2024_32/1.1.0" and report["older_versions"] == ["1.0.0"]
    assert "older dataset versions beside it" in prepare_lib.format_summary(report)
    assert isic.prepared_versions("isic2024", SIZE, data_dir) == ["1.0.0", "1.1.0"]
    data = dataset.InputData(_config(data_dir, **{"model.metadata": "images_per_patient,tbp_lv_*"}))
    assert data.info.datasets[0]["version"] == "1.1.0"
    assert data.metadata.width == 2 + 2 * 33 + sum(
        f.width for f in data.metadata.fitted if f.feature.kind == metadata.CATEGORICAL
    )
    batch = next(data.train_iterator())
    assert batch["metadata"].dtype == np.float32 and batch["metadata"].shape == (
        4,
        data.metadata.width,
    )


def test_pipeline_metadata_matches_the_encoder_on_each_record(source_2024, tmp_path):
    prepare_lib.prepare(source_2024, tmp_path / "d", image_size=SIZE, num_folds=2)
    data = dataset.InputData(
        _config(tmp_path / "d", **{"model.metadata": "age,sex,site,clin_size_long_diam_mm"})
    )
    for batch in data.eval_batches("val"):
        for i, index in enumerate(batch["index"]):
            if index < 0:
                continue
            want = data.metadata.encode_records([data.val_source[int(index)]])[0]
            np.testing.assert_array_equal(batch["metadata"][i], want)
    assert pipeline.METADATA_KEY == "metadata"
