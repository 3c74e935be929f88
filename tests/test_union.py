"""Several releases in one run: `config.data.release = "isic2019+isic2020"`."""

from __future__ import annotations

import numpy as np
import pytest
from isic_jax.configs import default

from isic_jax import config_utils
from isic_jax.data import dataset, union
from isic_jax.data import prepare as prepare_lib
from isic_jax.data.isic import labels as L
from isic_jax.inference import export
from isic_jax.testing import layouts
from isic_jax.training.predictions import Predictions

SIZE = 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """isic2019 (lesion ids only) and isic2020 (patients) prepared at 32 px, 2 folds each.

    Shared between them: ISIC_0000001 (2019 names it ISIC_0000001_downsampled) and the lesion
    IL_003 (2020: patient IP_001 with ISIC_0000002/3; 2019: ISIC_1000003).
    """
    root = tmp_path_factory.mktemp("union")
    e2019 = layouts.balanced_examples("isic2019", 8, patients=False)
    for i, e in enumerate(e2019):
        e.image_id, e.lesion_id = f"ISIC_{1_000_000 + i:07d}", f"BCN_{i:03d}"
    e2019[3].lesion_id = "IL_003"
    e2019[5].dx = "BCC"
    e2019.append(layouts.Example("ISIC_0000001_downsampled", "NV", image=layouts.jpeg()))
    layouts.write_layout(root / "src2019", "isic2019", e2019)
    layouts.write_layout(root / "src2020", "isic2020", layouts.balanced_examples("isic2020", 12))
    for release in ("isic2019", "isic2020"):
        prepare_lib.prepare(root / f"src{release[-4:]}", root / "tfds", fmt=release,
                            image_size=SIZE, num_folds=2, num_workers=1)  # fmt: skip
    return root / "tfds"


def _config(data_dir, **overrides):
    config = default.get_config()
    config.data.release, config.data.stored_size = "isic2019+isic2020", SIZE
    config.data.data_dir, config.data.image_size = str(data_dir), SIZE
    config.data.num_workers, config.data.val_fold = 0, 0
    config.train.batch_size = config.eval.batch_size = 4
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    config_utils.validate_config(config)
    return config


def _all(source) -> list[dict]:
    return [source[i] for i in range(len(source))]


def test_union_records_labels_duplicates_and_folds(data_dir):
    train, val, info = dataset.load_sources(_config(data_dir).data)
    records = _all(train) + _all(val)
    assert len(records) == 9 + 12 - 1 == info.num_train + info.num_val
    summary = info.union.summary
    assert summary["num_duplicates_removed"] == 1
    assert summary["duplicates"] == [
        {"kept_in": "isic2019", "removed_from": "isic2020", "count": 1}
    ]
    assert summary["examples_per_source"] == {"isic2019": 9, "isic2020": 11}
    assert info.sources == ["isic2019", "isic2020"] and info.class_names == L.LABEL_NAMES
    by_id = {r["image_id"].decode(): r for r in records}
    assert "ISIC_0000001_downsampled" in by_id and "ISIC_0000001" not in by_id
    assert {r["source"] for r in records} == {b"isic2019", b"isic2020"}
    assert by_id["ISIC_1000000"]["source"] == b"isic2019"
    # One diagnosis taxonomy: 2019's classes as they are, 2020's diagnoses mapped onto them.
    common = L.COMMON_CLASSES
    assert common[by_id["ISIC_1000000"]["diagnosis"]] == "NV"
    assert common[by_id["ISIC_1000005"]["diagnosis"]] == "BCC"
    assert common[by_id["ISIC_0000003"]["diagnosis"]] == "MEL"  # 2020 "melanoma"
    assert common[by_id["ISIC_0000002"]["diagnosis"]] == "unknown"
    assert by_id["ISIC_0000003"]["label"] == 1 and by_id["ISIC_1000005"]["label"] == 1
    # Grouped across releases: IP_001 (2020) and lesion IL_003 (shared with 2019) share a fold.
    fold = {i: r["fold"] for i, r in by_id.items()}
    assert fold["ISIC_0000002"] == fold["ISIC_0000003"] == fold["ISIC_1000003"]
    for a, b in (("ISIC_0000004", "ISIC_0000005"), ("ISIC_0000008", "ISIC_0000009")):
        assert fold[a] == fold[b]
    assert {r["fold"] for r in _all(val)} == {0} and 0 not in {r["fold"] for r in _all(train)}
    # Stratified by source and label: each fold holds positives of both releases.
    for k in (0, 1):
        in_fold = [r for r in records if r["fold"] == k]
        assert {(r["source"], r["label"]) for r in in_fold} == {
            (s, y) for s in (b"isic2019", b"isic2020") for y in (0, 1)
        }


def test_union_is_deterministic_and_val_fold_picks_a_fold(data_dir):
    a = dataset.load_sources(_config(data_dir).data)
    b = dataset.load_sources(_config(data_dir).data)
    assert [r["image_id"] for r in _all(a[0])] == [r["image_id"] for r in _all(b[0])]
    np.testing.assert_array_equal(a[2].union.fold, b[2].union.fold)
    other = dataset.load_sources(_config(data_dir, **{"data.val_fold": 1}).data)
    ids = lambda s: {r["image_id"] for r in _all(s)}
    assert ids(other[1]) == ids(a[0]) and ids(other[0]) == ids(a[1])
    everything = dataset.load_sources(_config(data_dir, **{"data.val_fold": -1}).data)
    assert everything[1] is None and len(everything[0]) == 20
    assert dataset.prepared_num_folds(_config(data_dir).data) == 2


def test_union_diagnosis_task_batches_and_class_names(data_dir):
    config = _config(data_dir, **{"data.task": "diagnosis", "model.metadata": "age,sex,site"})
    data = dataset.InputData(config)
    assert data.class_names == L.COMMON_CLASSES and data.num_classes == 9
    assert export.class_names_for(config) == L.COMMON_CLASSES
    assert [L.COMMON_CLASSES[i] for i in data.malignant_classes] == ["MEL", "BCC", "AK", "SCC"]
    assert export.malignant_classes_for(config, data.class_names) == data.malignant_classes
    assert data.train_class_counts.sum() == data.num_train
    batch = next(data.train_iterator())
    assert set(batch) == {*dataset.pipeline.BATCH_KEYS, "metadata"}
    assert set(batch["source"].tolist()) <= {b"isic2019", b"isic2020"}
    assert batch["metadata"].shape == (4, data.metadata.width)
    for i, index in enumerate(batch["index"]):
        assert batch["label"][i] == data.train_source[int(index)]["diagnosis"]
    seen = []
    for b in data.eval_batches("val"):
        seen += b["source"][b["mask"]].tolist()
        assert b["source"][~b["mask"]].tolist() == [b""] * int((~b["mask"]).sum())
    assert sorted(seen) == sorted(r["source"] for r in _all(data.val_source))
    assert len(data.source("fold1")) == data.num_train
    with pytest.raises(dataset.UnknownSplitError, match="fold0, fold1"):
        data.source("fold7")


def test_single_release_batches_name_their_source(data_dir):
    config = _config(data_dir, **{"data.release": "isic2020"})
    batch = next(dataset.InputData(config).train_iterator())
    assert batch["source"].tolist() == [b"isic2020"] * 4
    preds = Predictions(np.zeros((2, 2)), np.zeros(2, int), np.arange(2), np.array(["a", "b"]),
                        np.array(["", ""]), np.zeros(2), np.full(2, -1), np.array(["x", "y"]))
    assert preds.source.tolist() == ["", ""]  # the field exists, empty when not given


def test_union_config_and_missing_releases(data_dir):
    with pytest.raises(config_utils.ConfigError, match="unknown release.*'isic2099'"):
        _config(data_dir, **{"data.release": "isic2019+isic2099"})
    with pytest.raises(config_utils.ConfigError, match="twice"):
        _config(data_dir, **{"data.release": "isic2020+isic2020"})
    with pytest.raises(dataset.DataNotFoundError, match="not prepared: isic/isic2017_32"):
        dataset.check_prepared_dataset(_config(data_dir, **{"data.release": "isic2017+isic2020"})
                                       .data)  # fmt: skip
    assert union.canonical_id("ISIC_0000001_downsampled") == "ISIC_0000001"
    assert union.group_keys(["P", "", ""], ["L1", "L1", ""], ["a", "b", "c"]) == [
        "lesion:L1", "lesion:L1", "image:c",
    ]  # fmt: skip
