"""`prepare` on the real ISIC sample (../shared/data/isic-uda1): legacy archive JSON records."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from isic_jax.data import isic
from isic_jax.data import prepare as prepare_lib

pytestmark = pytest.mark.shared_data


def test_uda1_images(uda1_images, tmp_path):
    report = prepare_lib.prepare(uda1_images, tmp_path / "data", image_size=32, num_folds=5)

    assert report["dataset"] == f"isic/archive_32/{isic.VERSION}"
    assert report["num_examples"] == 400
    assert report["skipped"] == []
    totals = {name: sum(c[name] for c in report["label_counts"].values())
              for name in ("benign", "malignant")}  # fmt: skip
    assert totals == {"benign": 286, "malignant": 114}
    assert sum(report["splits"].values()) == 400
    # Stratified: 114 malignant over 5 folds of single images -> 22 or 23 each.
    assert {c["malignant"] for c in report["label_counts"].values()} <= {22, 23}

    builder = isic.make_builder("archive", 32, tmp_path / "data")
    assert builder.is_prepared()
    train, val = isic.train_val_splits(5, 0)
    sources = {
        name: builder.as_data_source(split=name, decoders={"image": tfds.decode.SkipDecoding()})
        for name in (train, val)
    }
    assert len(sources[train]) == 320 and len(sources[val]) == 80
    rec = sources[val][0]
    img = Image.open(io.BytesIO(rec["image"]))
    assert img.mode == "RGB" and min(img.size) == 32
    assert rec["image_id"].startswith(b"ISIC_00") and rec["fold"] == 0
    # The one record with no diagnosis is benign (per the sample's README), diagnosis "unknown".
    classes = isic.DIAGNOSIS_CLASSES["archive"]
    unknown = [
        src[i] for src in sources.values() for i in range(len(src))
        if classes[src[i]["diagnosis"]] == "unknown"
    ]  # fmt: skip
    assert len(unknown) == 1 and unknown[0]["label"] == 0


def test_uda1_fullres_originals(uda1_fullres, tmp_path):
    report = prepare_lib.prepare(
        uda1_fullres, tmp_path / "data", image_size=64, num_folds=2, num_workers=2
    )
    assert report["num_examples"] == 4 and report["skipped"] == []
    print(f"fullres prepare: {report['images_per_second']} img/s in {report['seconds']} s")
    builder = isic.make_builder("archive", 64, tmp_path / "data")
    src = builder.as_data_source(
        split="fold0+fold1", decoders={"image": tfds.decode.SkipDecoding()}
    )
    sizes = {}
    for i in range(len(src)):
        img = Image.open(io.BytesIO(src[i]["image"]))
        sizes[src[i]["image_id"].decode()] = img.size
        assert np.asarray(img).std() > 5  # real content, not a flat fill
    # 3872x2592 -> 96x64 and 3008x2000 -> 96x64: shorter side 64, aspect kept.
    assert sizes["ISIC_0000504"] == (96, 64)
    assert sizes["ISIC_0000459"] == (96, 64)
    assert all(min(s) == 64 for s in sizes.values())
