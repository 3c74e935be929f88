"""The `isic` TFDS builder on tiny hand-made fixtures in every official release layout."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from isic_jax.data import isic
from isic_jax.data.isic import dicom
from isic_jax.data.isic.layouts import RELEASE_OF
from isic_jax.testing import layouts

IMAGE_SIZE = 32
# The 7 releases + the archive's legacy JSON records + the Kaggle copy's 2020 DICOM files.
LAYOUTS = list(layouts.IMAGE_DIRS)
RELEASE = {name: RELEASE_OF[name] for name in LAYOUTS}


def build(source, data_dir, release: str, num_folds: int = 2, **options) -> isic.Isic:
    builder = isic.make_builder(
        release,
        IMAGE_SIZE,
        data_dir,
        options=isic.BuildOptions(num_folds=num_folds, num_workers=2, **options),
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(source))
    )
    return builder


def records(builder: isic.Isic) -> list[dict]:
    names = list(builder.info.splits)
    source = builder.as_data_source(
        split="+".join(names), decoders={"image": tfds.decode.SkipDecoding()}
    )
    return [source[i] for i in range(len(source))]


def reasons(builder: isic.Isic) -> dict[str, str]:
    return {s["item"]: s["reason"] for s in builder.report["skipped"]}


def _layout_with_bad_rows(root, layout: str) -> list[str]:
    """8 valid examples + a missing image, an image with no row, a duplicate id, an unknown label.

    Returns the ids of the valid examples.
    """
    good = layouts.balanced_examples(layout, 8)
    unknown = {"isic2018": "XYZ", "isic2019": "XYZ", "isic2017": "2.0"}.get(layout, "maybe")
    bad = [
        layouts.Example("ISIC_0000100", good[0].dx, image=None),  # row, no image
        layouts.Example("ISIC_0000101", unknown, image=layouts.jpeg()),  # unknown label
    ]
    if layout == "archive_json":  # one record file per image: the duplicate is a second record
        layouts.write_layout(root, layout, good + bad)
        with open(os.path.join(root, "ISIC_0000001.json")) as f:
            duplicate = f.read()
        with open(os.path.join(root, "zz_copy.json"), "w") as f:
            f.write(duplicate)
    else:
        dup = layouts.Example("ISIC_0000001", good[0].dx, image=None)  # same id, second row
        layouts.write_layout(root, layout, good + bad + [dup])
    # An image with no row.
    if layout == "isic2024":
        import h5py

        with h5py.File(os.path.join(root, "train-image.hdf5"), "a") as f:
            f.create_dataset("ISIC_0000200", data=np.void(layouts.jpeg()))
    elif layout == "isic2020_dicom":
        folder = os.path.join(root, layouts.IMAGE_DIRS[layout])
        dicom.write_dicom(os.path.join(folder, "ISIC_0000200.dcm"), jpeg=layouts.jpeg())
    else:
        folder = os.path.join(root, layouts.IMAGE_DIRS[layout])
        with open(os.path.join(folder, "ISIC_0000200.jpg"), "wb") as f:
            f.write(layouts.jpeg())
    return [e.image_id for e in good]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_release_layout(tmp_path, layout):
    source = tmp_path / "src"
    good_ids = _layout_with_bad_rows(source, layout)
    release = RELEASE[layout]
    assert isic.detect(source) == release

    builder = build(source, tmp_path / "data", release)

    assert builder.is_prepared()
    assert builder.info.full_name == f"isic/{release}_{IMAGE_SIZE}/{isic.VERSION}"
    assert list(builder.info.splits) == ["fold0", "fold1"]
    recs = records(builder)
    assert sorted(r["image_id"].decode() for r in recs) == good_ids
    assert sum(r["label"] for r in recs) == 4  # 4 benign, 4 malignant in the fixture
    for rec in recs:
        img = Image.open(io.BytesIO(rec["image"]))
        assert img.format == "JPEG" and img.mode == "RGB"
        assert min(img.size) == IMAGE_SIZE
        assert img.size == (43, 32)  # 40x30 -> shorter side 32, aspect kept (42.67 -> 43)
    why = reasons(builder)
    assert "missing" in why["ISIC_0000100"]
    assert "unknown label" in why["ISIC_0000101"]
    assert any("duplicate id" in r for r in why.values()), why
    assert any("no ground-truth/metadata row" in r or "no metadata row" in r for r in why.values())
    assert builder.report["num_examples"] == 8
    assert builder.info.metadata["num_folds"] == 2


def test_record_types_and_missing_values(tmp_path):
    """What as_data_source returns: bytes for Text/image, int for labels/scalars."""
    examples = layouts.balanced_examples("isic2020", 6)
    examples[0].age, examples[0].sex, examples[0].site, examples[0].patient_id = "", "", "", ""
    layouts.write_layout(tmp_path / "src", "isic2020", examples)
    builder = build(tmp_path / "src", tmp_path / "data", "isic2020")

    by_id = {r["image_id"]: r for r in records(builder)}
    rec = by_id[b"ISIC_0000000"]
    assert isinstance(rec["image"], bytes) and rec["image"][:2] == b"\xff\xd8"
    assert isinstance(rec["image_id"], bytes)
    assert isinstance(rec["patient_id"], bytes) and rec["patient_id"] == b""
    assert rec["age"] == -1 and rec["sex"] == 0 and rec["anatom_site"] == b"unknown"
    for key in ("label", "diagnosis", "age", "sex", "fold"):
        assert isinstance(rec[key], int), key
    full = by_id[b"ISIC_0000003"]
    assert full["age"] == 33 and full["sex"] == isic.SEX_NAMES.index("male")
    assert full["patient_id"] == b"IP_001" and full["lesion_id"] == b"IL_003"
    assert full["anatom_site"] == b"torso" and full["label"] == 1
    assert isic.DIAGNOSIS_CLASSES["isic2020"][full["diagnosis"]] == "MEL"
    # Without SkipDecoding the image comes back decoded (by PIL, no TensorFlow).
    decoded = builder.as_data_source(split="fold0")[0]["image"]
    assert decoded.dtype == np.uint8 and decoded.ndim == 3 and decoded.shape[2] == 3


def test_fold_feature_matches_split_and_patients_do_not_leak(tmp_path):
    layouts.write_layout(tmp_path / "src", "isic2024", layouts.balanced_examples("isic2024", 12))
    builder = build(tmp_path / "src", tmp_path / "data", "isic2024", num_folds=3)
    patient_folds: dict[bytes, set[int]] = {}
    for k in range(3):
        source = builder.as_data_source(
            split=f"fold{k}", decoders={"image": tfds.decode.SkipDecoding()}
        )
        assert len(source) > 0
        for i in range(len(source)):
            rec = source[i]
            assert rec["fold"] == k
            patient_folds.setdefault(rec["patient_id"], set()).add(k)
    assert all(len(f) == 1 for f in patient_folds.values())


def test_multiclass_labels_and_malignancy_policy(tmp_path):
    dxs = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
    examples = [
        layouts.Example(f"ISIC_{i:07d}", dx, image=layouts.jpeg()) for i, dx in enumerate(dxs * 2)
    ]
    examples.append(layouts.Example("ISIC_0000099", "UNK", image=layouts.jpeg()))
    layouts.write_layout(tmp_path / "src", "isic2019", examples)
    builder = build(tmp_path / "src", tmp_path / "data", "isic2019")
    classes = isic.DIAGNOSIS_CLASSES["isic2019"]
    for rec in records(builder):
        name = classes[rec["diagnosis"]]
        assert rec["label"] == int(name in ("MEL", "BCC", "AK", "SCC")), name
    assert "UNK" in reasons(builder)["ISIC_0000099"]
    assert sum(builder.report["splits"].values()) == 16


def test_archive_indeterminate_policy(tmp_path):
    examples = layouts.balanced_examples("archive", 6)
    examples.append(layouts.Example("ISIC_0000050", "Indeterminate", image=layouts.jpeg()))
    layouts.write_layout(tmp_path / "src", "archive", examples)
    skipped = build(tmp_path / "src", tmp_path / "a", "archive")
    assert "indeterminate" in reasons(skipped)["ISIC_0000050"]
    assert skipped.report["num_examples"] == 6
    kept = build(tmp_path / "src", tmp_path / "b", "archive", indeterminate="malignant")
    rec = {r["image_id"]: r for r in records(kept)}[b"ISIC_0000050"]
    assert rec["label"] == 1
    assert kept.info.metadata["indeterminate"] == "malignant"


def test_isic2020_duplicates_drop_the_second_of_each_pair(tmp_path):
    examples = layouts.balanced_examples("isic2020", 8)
    layouts.write_layout(
        tmp_path / "src", "isic2020", examples, duplicates=[("ISIC_0000002", "ISIC_0000005")]
    )
    builder = build(tmp_path / "src", tmp_path / "data", "isic2020")
    ids = {r["image_id"] for r in records(builder)}
    assert b"ISIC_0000002" in ids and b"ISIC_0000005" not in ids
    assert "duplicate image of ISIC_0000002" in reasons(builder)["ISIC_0000005"]


def test_naming_variants_kaggle_layouts(tmp_path):
    """HAM10000 metadata as the 2018 ground truth, images split over two folders."""
    src = tmp_path / "ham"
    (src / "HAM10000_images_part_1").mkdir(parents=True)
    (src / "HAM10000_images_part_2").mkdir()
    lines = ["lesion_id,image_id,dx,dx_type,age,sex,localization"]
    for i, dx in enumerate(["nv", "mel", "bcc", "bkl", "akiec", "nv"]):
        lines.append(f"HAM_{i // 2},ISIC_{i:07d},{dx},histo,{40 + i}.0,male,back")
        part = "HAM10000_images_part_1" if i < 3 else "HAM10000_images_part_2"
        (src / part / f"ISIC_{i:07d}.jpg").write_bytes(layouts.jpeg())
    (src / "HAM10000_metadata.csv").write_text("\n".join(lines) + "\n")
    assert isic.detect(src) == "isic2018"
    builder = build(src, tmp_path / "data", "isic2018")
    recs = records(builder)
    assert len(recs) == 6 and sum(r["label"] for r in recs) == 3  # mel, bcc, akiec
    assert {r["lesion_id"] for r in recs} == {b"HAM_0", b"HAM_1", b"HAM_2"}
    assert builder.report["skipped"] == []


def test_isic2024_image_files_without_hdf5(tmp_path):
    """Kaggle's train-image/image/ folder instead of train-image.hdf5 (the second layout)."""
    src = tmp_path / "src"
    examples = layouts.balanced_examples("isic2024", 6)
    layouts.write_layout(src, "isic2024", examples)
    (src / "train-image.hdf5").unlink()
    folder = src / "train-image" / "image"
    folder.mkdir(parents=True)
    for ex in examples[:5]:
        (folder / f"{ex.image_id}.jpg").write_bytes(ex.image)
    assert isic.detect(src) == "isic2024"
    builder = build(src, tmp_path / "data", "isic2024")
    assert builder.report["source_files"] == {"metadata": "train-metadata.csv"}
    assert builder.report["num_examples"] == 5
    assert "missing" in reasons(builder)["ISIC_0000005"]


def test_test_images_next_to_training_images_are_ignored(tmp_path):
    src = tmp_path / "src"
    layouts.write_layout(src, "isic2020", layouts.balanced_examples("isic2020", 6))
    (src / "test").mkdir()
    (src / "test" / "ISIC_9999999.jpg").write_bytes(layouts.jpeg())
    builder = build(src, tmp_path / "data", "isic2020")
    assert builder.report["num_examples"] == 6
    assert builder.report["skipped"] == []


def test_builder_is_a_tfds_generator_builder_with_configs():
    assert issubclass(isic.Isic, tfds.core.GeneratorBasedBuilder)
    assert isic.Isic.MANUAL_DOWNLOAD_INSTRUCTIONS
    names = {c.name for c in isic.Isic.BUILDER_CONFIGS}
    assert {f"{r}_512" for r in isic.RELEASES} <= names
    assert isic.config_for("isic2019", 37).name == "isic2019_37"
    with pytest.raises(ValueError, match="unknown release"):
        isic.config_for("isic2099", 64)
