"""isic_jax.data.metadata: features as arrays, fitted statistics, CSV rows, the catalog; and the
learnable metadata of synth's ISIC 2024 layout."""

from __future__ import annotations

import csv
import json
import math
import pickle

import numpy as np
import pytest

from isic_jax.data import metadata as M
from isic_jax.data import synth
from isic_jax.data.isic.layouts.isic2024 import TABULAR, TABULAR_TEXT

COLS = ("tbp_lv_areaMM2", "clin_size_long_diam_mm")


def _dataset(release: str = "toy", version: str = "1.1.0", features=None) -> dict:
    keys = ["image", "age", "sex", "anatom_site", "images_per_patient", "tabular", "tabular_text"]
    return {
        "release": release, "version": version, "features": features or keys,
        "tabular_columns": list(COLS), "tabular_text_columns": ["tbp_lv_location_simple"],
        "prepare": f"isic-jax prepare --source X --data-dir D --image-size 64 ({release})",
    }  # fmt: skip


def _record(age, sex, site, ipp, area, diam, loc) -> dict:
    return {"age": age, "sex": sex, "anatom_site": site, "images_per_patient": ipp,
            "tabular": [area, diam], "tabular_text": [loc]}  # fmt: skip


TRAIN = [
    _record(40, 1, b"torso", 2, 10.0, 3.0, b"Torso Back"),
    _record(60, 2, b"head/neck", 2, 20.0, float("nan"), b"Left Leg"),
    _record(-1, 0, b"unknown", -1, 30.0, 5.0, b""),
    _record(50, 2, b"torso", 1, float("nan"), 4.0, b"Torso Back"),
]


def _encoder(spec: str = "age,sex,site,images_per_patient,tbp_lv_*,clin_size_long_diam_mm"):
    catalog = M.Catalog.from_datasets([_dataset()])
    return M.fit_records(catalog.resolve(M.parse_feature_list(spec)), TRAIN, catalog.datasets)


def test_columns_statistics_and_encoding():
    enc = _encoder()
    assert enc.names == ["age", "sex", "site", "images_per_patient", "tbp_lv_areaMM2",
                         "tbp_lv_location_simple", "clin_size_long_diam_mm"]  # fmt: skip
    names = [c["name"] for c in enc.columns()]
    assert names == [
        "age", "age_missing", "sex=female", "sex=male", "sex=missing", "site=head/neck",
        "site=torso", "site=missing", "images_per_patient", "images_per_patient_missing",
        "tbp_lv_areaMM2", "tbp_lv_areaMM2_missing", "tbp_lv_location_simple=Left Leg",
        "tbp_lv_location_simple=Torso Back", "tbp_lv_location_simple=missing",
        "clin_size_long_diam_mm", "clin_size_long_diam_mm_missing",
    ]
    assert enc.width == len(names) == 17
    age = enc.columns()[0]
    assert age["isic_column"] == "age_approx" and age["normalisation"]["mean"] == 50.0
    assert math.isclose(age["normalisation"]["std"], np.std([40, 60, 50]))
    x = enc.encode_records(TRAIN + [None])
    assert x.dtype == np.float32 and x.shape == (5, 17)
    std = np.std([40, 60, 50])
    np.testing.assert_allclose(x[:, 0], [-10 / std, 10 / std, 0, 0, 0], rtol=1e-6)
    np.testing.assert_array_equal(x[:, 1], [0, 0, 1, 0, 1])  # age missing: -1, padding
    np.testing.assert_array_equal(x[:, 2:5], [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 0],
                                               [0, 0, 1]])  # fmt: skip
    np.testing.assert_array_equal(x[:, 5:8], [[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0],
                                               [0, 0, 1]])  # fmt: skip
    np.testing.assert_array_equal(x[:, 11], [0, 0, 0, 1, 1])  # areaMM2 NaN -> missing
    np.testing.assert_array_equal(x[:, 14], [0, 0, 1, 0, 1])  # location "" -> missing
    # Every row: exactly one hot column per categorical feature.
    for lo, hi in ((2, 5), (5, 8), (12, 15)):
        np.testing.assert_array_equal(x[:, lo:hi].sum(1), 1)


def test_json_round_trip_and_pickle():
    enc = _encoder()
    saved = json.loads(json.dumps(enc.to_json()))
    assert saved["columns"] == enc.columns() and saved["width"] == enc.width
    again = M.MetadataEncoder.from_json(saved).bind([_dataset()])
    np.testing.assert_array_equal(again.encode_records(TRAIN), enc.encode_records(TRAIN))
    copy = pickle.loads(pickle.dumps(enc))
    np.testing.assert_array_equal(copy.encode_records(TRAIN), enc.encode_records(TRAIN))
    with pytest.raises(ValueError, match="not a metadata encoder"):
        M.MetadataEncoder.from_json({"format": "other"})


def test_unseen_category_and_other_release_records_are_missing():
    enc = _encoder("site,tbp_lv_areaMM2")
    x = enc.encode_records([
        {"anatom_site": b"palms/soles", "source": b"toy", "tabular": [1.0, 2.0]},
        {"anatom_site": b"torso", "source": b"isic2020"},  # a release without tabular columns
    ])  # fmt: skip
    site, area = x[:, :3], x[:, 3:]
    np.testing.assert_array_equal(site, [[0, 0, 1], [0, 1, 0]])
    assert area[0, 1] == 0 and area[1].tolist() == [0.0, 1.0]


def test_csv_rows_by_isic_column_names():
    enc = _encoder("age,sex,site,images_per_patient,tbp_lv_areaMM2")
    rows = [
        {"image_name": "a", "Age_Approx": "40", "sex": "female",
         "anatom_site_general_challenge": "torso", "patient_id": "P1"},
        {"image_name": "b", "Age_Approx": "", "sex": "m",
         "anatom_site_general_challenge": "oral/genital", "patient_id": "P1"},
        {"image_name": "c", "Age_Approx": "old", "sex": "", "anatom_site_general_challenge": "",
         "patient_id": ""},
    ]  # fmt: skip
    x, warnings = enc.encode_rows(rows)
    assert x.shape == (3, enc.width) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:, 1], [0, 1, 1])  # age: "" and "old" are missing
    np.testing.assert_array_equal(x[:, 2:5], [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(x[:, 5:8], [[0, 1, 0], [0, 0, 1], [0, 0, 1]])  # unseen site
    ipp_mean, ipp_std = np.mean([2, 2, 1]), np.std([2, 2, 1])
    np.testing.assert_allclose(x[:2, 8], (2 - ipp_mean) / ipp_std, rtol=1e-6)  # counted P1
    assert x[2, 9] == 1
    assert x[:, 10].tolist() == [0, 0, 0] and x[:, 11].tolist() == [1, 1, 1]  # no column
    assert any("images_per_patient" in w and "patient_id" in w for w in warnings)
    assert any("tbp_lv_areaMM2" in w and "missing" in w for w in warnings)
    assert len(warnings) == 2


def test_unknown_and_lacking_features_fail_with_what_to_do():
    catalog = M.Catalog.from_datasets([_dataset()])
    with pytest.raises(M.MetadataFeatureError, match=r"unknown metadata feature 'bmi'.*"
                       r"available: age, sex, site, images_per_patient, tbp_lv_areaMM2"):
        catalog.resolve(["age", "bmi"])
    with pytest.raises(M.MetadataFeatureError, match="'xyz_\\*'"):
        catalog.resolve(["xyz_*"])
    # A 1.0.0 ISIC 2024 dataset: no images_per_patient, no tabular columns (1.1.0 has them).
    old = M.Catalog.from_datasets([{**_dataset("isic2024", "1.0.0", ["image", "age", "sex",
                                                                     "anatom_site"]),
                                    "tabular_columns": [], "tabular_text_columns": []}])
    assert [f.name for f in old.resolve(["age", "sex", "site"])] == ["age", "sex", "site"]
    for name in ("images_per_patient", "tbp_lv_*", "tbp_lv_areaMM2"):
        with pytest.raises(M.MetadataFeatureError) as info:
            old.resolve([name])
        message = str(info.value)
        assert "version 1.0.0" in message and "re-run `isic-jax prepare" in message
    with pytest.raises(ValueError, match="empty feature name"):
        M.parse_feature_list("age,,sex")
    assert M.parse_feature_list(" age , sex ") == ["age", "sex"] and M.parse_feature_list("") == []


def test_synth_2024_tabular_columns_carry_a_learnable_signal(tmp_path):
    """On held-out patients: the tabular columns separate malignant from benign; the lesion
    colour alone does not, but relative to the same patient's other lesions it does (the ugly
    duckling); age carries a mild signal. Same seed, same bytes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold, cross_val_predict

    synth.write_synthetic(tmp_path / "a", "isic2024", 600, 0, 0.1, 24)
    synth.write_synthetic(tmp_path / "b", "isic2024", 600, 0, 0.1, 24)
    raw = (tmp_path / "a" / "train-metadata.csv").read_bytes()
    assert raw == (tmp_path / "b" / "train-metadata.csv").read_bytes()
    with open(tmp_path / "a" / "train-metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    y = np.array([r["target"] == "1" for r in rows])
    groups = np.array([r["patient_id"] for r in rows])
    # Through the encoder, as the model will see them (statistics fitted on all rows here).
    features = [M.tabular_feature(c, True) for c in TABULAR]
    features += [M.tabular_feature(c, False) for c in TABULAR_TEXT]
    records = [{"tabular": [float(r[c]) for c in TABULAR], "tabular_columns": TABULAR,
                "tabular_text": [r[c] for c in TABULAR_TEXT], "tabular_text_columns": TABULAR_TEXT}
               for r in rows]  # fmt: skip
    x = M.fit_records(features, records).encode_records(records)

    def auc(features: np.ndarray) -> float:
        clf = LogisticRegression(max_iter=3000)
        scores = cross_val_predict(clf, features, y, groups=groups, cv=GroupKFold(5),
                                   method="predict_proba")[:, 1]  # fmt: skip
        return roc_auc_score(y, scores)

    colour = np.array([[float(r[c]) for c in ("tbp_lv_L", "tbp_lv_A", "tbp_lv_B")] for r in rows])
    relative = colour.copy()
    for p in set(groups):
        relative[groups == p] -= colour[groups == p].mean(0)
    relative = np.abs(relative)
    age = np.array([[float(r["age_approx"] or 50)] for r in rows])
    results = {"tabular": auc(x), "colour": auc(colour), "colour_vs_patient": auc(relative),
               "age": auc(age)}  # fmt: skip
    print("synth 2024 metadata AUCs:", {k: round(v, 3) for k, v in results.items()})
    assert results["tabular"] > 0.85
    assert results["colour"] < 0.6 and results["colour_vs_patient"] > results["colour"] + 0.2
    assert 0.52 < results["age"] < 0.75


@pytest.mark.shared_data
def test_real_sample_age_sex_site(uda1_images, tmp_path):
    """The real archive sample: age and sex from its JSON records, no site and no patient ids
    (all missing, not an error)."""
    import json as json_lib

    from isic_jax.configs import default

    from isic_jax.data import dataset
    from isic_jax.data import prepare as prepare_lib

    prepare_lib.prepare(uda1_images, tmp_path / "d", image_size=32, num_folds=5)
    config = default.get_config()
    config.data.release, config.data.stored_size, config.data.data_dir = "archive", 32, str(
        tmp_path / "d"
    )
    config.data.image_size, config.data.num_workers = 32, 0
    config.train.batch_size = config.eval.batch_size = 8
    config.model.metadata = "age,sex,site,images_per_patient"
    data = dataset.InputData(config)
    enc = data.metadata
    ages = []
    for path in sorted(uda1_images.glob("*.json")):
        clinical = json_lib.loads(path.read_text())["meta"]["clinical"]
        ages.append(clinical.get("age_approx"))
    assert enc.fitted[0].num_values + enc.fitted[0].num_missing == 320
    assert 30 < enc.fitted[0].mean < 70 and enc.fitted[0].std > 5
    assert enc.fitted[1].categories == ("female", "male") and enc.fitted[2].categories == ()
    assert enc.fitted[3].num_values == 0  # the sample has no patient ids
    x = enc.encode_records([data.val_source[i] for i in range(len(data.val_source))])
    assert x.shape == (80, enc.width) and np.isfinite(x).all()
    np.testing.assert_array_equal(x[:, 2:5].sum(1), 1)
    assert (x[:, 5] == 1).all() and (x[:, 7] == 1).all()  # site and images_per_patient missing
    assert any(a is None for a in ages) == bool(enc.fitted[0].num_missing or x[:, 1].any())
