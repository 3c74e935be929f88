"""DICOM: the Kaggle copy of ISIC 2020 (train.csv + train/*.dcm), reading, synth, predict."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import pathlib
import shutil

import numpy as np
import pydicom
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from isic_jax.data import prepare as prepare_lib
from isic_jax.data import synth
from isic_jax.data.isic import builder as isic
from isic_jax.data.isic import dicom, images, releases
from isic_jax.inference import inputs
from isic_jax.testing import layouts

SIZE = 48


def _records(data_dir: pathlib.Path, release: str = "isic2020", size: int = 32) -> list[dict]:
    builder = isic.make_builder(release, size, data_dir)
    split = "+".join(builder.info.splits)
    source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return sorted((source[i] for i in range(len(source))), key=lambda r: r["image_id"])


def _jpeg_copy(dicom_root: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """The same download with every DICOM replaced by the JPEG it holds (jpeg/train/<id>.jpg)."""
    shutil.copytree(dicom_root, out, ignore=shutil.ignore_patterns("*.dcm"))
    (out / "jpeg" / "train").mkdir(parents=True)
    for path in sorted((dicom_root / "train").glob("*.dcm")):
        frame = dicom.read_image(str(path), images.DEFAULT_MAX_PIXELS)
        assert isinstance(frame, bytes)
        (out / "jpeg" / "train" / f"{path.stem}.jpg").write_bytes(frame)
    return out


def test_synth_writes_the_kaggle_dicom_layout(tmp_path):
    summary = synth.write_synthetic(tmp_path / "d", "isic2020_dicom", 24, 3, image_size=SIZE)
    root = tmp_path / "d"
    assert summary["metadata_files"] == [
        "train.csv", "ISIC_2020_Training_Duplicates.csv", "sample_submission.csv",
    ]  # fmt: skip
    with open(root / "train.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == ["image_name", "patient_id", "sex", "age_approx",
                      "anatom_site_general_challenge", "diagnosis", "benign_malignant", "target"]
    files = sorted((root / "train").iterdir())
    assert len(files) == 24 and all(p.suffix == ".dcm" for p in files)
    assert not list(root.rglob("*.jpg"))
    ds = pydicom.dcmread(files[0])
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    assert ds.SamplesPerPixel == 3 and ds.BitsStored == 8
    # The same seed gives the same pictures as the challenge layout: each DICOM holds exactly
    # the JPEG that `--format isic2020` writes.
    synth.write_synthetic(tmp_path / "j", "isic2020", 24, 3, image_size=SIZE)
    for path in files:
        frame = dicom.read_image(str(path), 10**8)
        assert frame == (tmp_path / "j" / "train" / f"{path.stem}.jpg").read_bytes()
    again = synth.write_synthetic(tmp_path / "d2", "isic2020_dicom", 24, 3, image_size=SIZE)
    assert again["num_images"] == 24
    digest = lambda r: {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted(r.rglob("*")) if p.is_file()}  # fmt: skip
    assert digest(root) == digest(tmp_path / "d2")


def test_kaggle_layouts_are_recognised_as_isic2020(tmp_path):
    """sample_submission.csv (image_name,target; ISIC_...,0) is no ISIC 2016 ground truth."""
    root = tmp_path / "kaggle"
    synth.write_synthetic(root, "isic2020_dicom", 12, 0, image_size=SIZE)
    (root / "test.csv").write_text(
        "image_name,patient_id,sex,age_approx,anatom_site_general_challenge\n"
        "ISIC_9990000,IP_0000001,male,45.0,torso\n"
    )
    assert releases.detect(root) == "isic2020"
    scan = releases.scan("isic2020", root)
    assert scan.files["ground_truth"] == "train.csv"
    assert all(c.path.endswith(".dcm") for c in scan.candidates)
    # The full Kaggle copy also has jpeg/train/*.jpg: JPEGs are read when both are there.
    full = _jpeg_copy(root, tmp_path / "full")
    shutil.copytree(root / "train", full / "train", dirs_exist_ok=True)
    assert releases.detect(full) == "isic2020"
    scan = releases.scan("isic2020", full)
    assert scan.candidates and all(c.path.endswith(".jpg") for c in scan.candidates)
    assert not [s for s in scan.skipped if "missing" in s.reason]


def test_dicom_and_jpeg_prepare_to_identical_records(tmp_path):
    root = tmp_path / "dicom"
    synth.write_synthetic(root, "isic2020_dicom", 30, 1, image_size=64)
    jpeg_root = _jpeg_copy(root, tmp_path / "jpeg")
    a = prepare_lib.prepare(root, tmp_path / "data_d", image_size=32, num_folds=2, num_workers=2)
    b = prepare_lib.prepare(jpeg_root, tmp_path / "data_j", image_size=32, num_folds=2,
                            num_workers=2)  # fmt: skip
    assert a["release"] == b["release"] == "isic2020"
    assert a["source_files"] == b["source_files"]
    assert a["splits"] == b["splits"] and a["num_examples"] == 29  # one listed duplicate
    assert [s["item"] for s in a["skipped"]] == [s["item"] for s in b["skipped"]]
    ra, rb = _records(tmp_path / "data_d"), _records(tmp_path / "data_j")
    assert len(ra) == 29
    assert ra == rb  # every feature, the stored JPEG bytes included


def _rgb(h: int = 30, w: int = 40) -> np.ndarray:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    arr[: h // 3, : w // 3] = (200, 30, 40)
    return arr


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("photometric, tolerance", [("RGB", 0), ("YBR_FULL", 2)])
def test_uncompressed_dicom(tmp_path, photometric, tolerance):
    arr = _rgb()
    path = tmp_path / "x.dcm"
    dicom.write_dicom(path, pixels=arr, photometric=photometric, image_id="ISIC_0000001")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    decoded = dicom.read_image(str(path), 10**8)
    assert isinstance(decoded, Image.Image) and decoded.mode == "RGB"
    diff = np.abs(np.asarray(decoded, np.int16) - arr)
    assert diff.max() <= tolerance
    stored = images.process_image(str(path), 32)
    if photometric == "RGB":  # lossless: the same stored JPEG as the PNG of the same pixels
        assert stored == images.process_image(_png(arr), 32)
    out = np.asarray(Image.open(io.BytesIO(stored)))
    assert out.shape == (32, 43, 3)
    assert out[:8, :10].mean(axis=(0, 1))[0] > 150  # the red corner is still red, not swapped


def _strip_colour_space(data: bytes) -> bytes:
    """A JPEG of RGB samples (Pillow's keep_rgb) that no longer says so: without its Adobe
    segment and with components numbered 1, 2, 3 (what libjpeg then takes for YCbCr)."""
    out, i = bytearray(data[:2]), 2
    while True:
        marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
        segment = bytearray(data[i : i + 2 + length])
        if marker in (0xC0, 0xDA):  # frame / scan header: rename the components R,G,B -> 1,2,3
            first, step = (10, 3) if marker == 0xC0 else (5, 2)
            for k in range(3):
                assert segment[first + k * step] == b"RGB"[k]
                segment[first + k * step] = k + 1
        if marker != 0xEE:
            out += segment
        i += 2 + length
        if marker == 0xDA:
            return bytes(out + data[i:])


def test_rgb_jpeg_that_does_not_say_so_is_not_colour_converted(tmp_path):
    """PhotometricInterpretation RGB + a JPEG that does not name its colour space: the samples
    are RGB, which libjpeg alone reads as YCbCr (wrong colours)."""
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[:] = (220, 40, 30)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95, keep_rgb=True)
    data = buf.getvalue()
    bare = _strip_colour_space(data)
    assert dicom._says_colour_space(data) and not dicom._says_colour_space(bare)
    naive = np.asarray(Image.open(io.BytesIO(bare)).convert("RGB"), np.int16).mean((0, 1))
    assert np.abs(naive - (220, 40, 30)).max() > 50  # what a plain JPEG decode gives
    path = tmp_path / "rgb.dcm"
    dicom.write_dicom(path, jpeg=data, photometric="RGB")  # header from `data`
    ds = pydicom.dcmread(path)
    ds.PixelData = pydicom.encaps.encapsulate([bare])
    ds.save_as(path)
    decoded = dicom.read_image(str(path), 10**8)
    assert isinstance(decoded, Image.Image)
    assert np.abs(np.asarray(decoded, np.int16).mean((0, 1)) - (220, 40, 30)).max() < 6
    # With YBR_FULL_422 (the Kaggle files) the JPEG bytes go to the plain decode as they are.
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.save_as(path)
    assert dicom.read_image(str(path), 10**8) == bare


def test_bad_dicom_files_are_refused_with_a_reason(tmp_path):
    (tmp_path / "text.dcm").write_text("not a dicom file")
    with pytest.raises(images.BadImage, match="not a DICOM file"):
        images.process_image(str(tmp_path / "text.dcm"), 32)
    dicom.write_dicom(tmp_path / "big.dcm", jpeg=layouts.jpeg(40, 30))
    with pytest.raises(images.BadImage, match="decompression bomb: 40x30"):
        images.process_image(str(tmp_path / "big.dcm"), 32, max_pixels=1000)
    ds = pydicom.dcmread(tmp_path / "big.dcm")
    ds.NumberOfFrames = 2
    ds.save_as(tmp_path / "frames.dcm")
    with pytest.raises(images.BadImage, match="multi-frame DICOM"):
        images.process_image(str(tmp_path / "frames.dcm"), 32)
    del ds.PixelData
    del ds.NumberOfFrames
    ds.save_as(tmp_path / "empty.dcm")
    with pytest.raises(images.BadImage, match="no pixel data"):
        images.process_image(str(tmp_path / "empty.dcm"), 32)


def test_prepare_reports_a_bad_dicom_and_keeps_the_others(tmp_path):
    examples = layouts.balanced_examples("isic2020_dicom", 8)
    layouts.write_layout(tmp_path / "src", "isic2020_dicom", examples)
    (tmp_path / "src" / "train" / "ISIC_0000003.dcm").write_bytes(b"\0" * 128 + b"DICM")
    report = prepare_lib.prepare(tmp_path / "src", tmp_path / "data", image_size=32, num_folds=2)
    assert report["release"] == "isic2020" and report["num_examples"] == 7
    (skip,) = report["skipped"]
    assert skip["item"] == "ISIC_0000003" and skip["stage"] == "decode"
    assert "DICOM" in skip["reason"]
    missing = tmp_path / "src" / "train" / "ISIC_0000005.dcm"
    os.remove(missing)
    scan = releases.scan("isic2020", tmp_path / "src")
    (why,) = [s.reason for s in scan.skipped if s.item == "ISIC_0000005"]
    assert "image file missing" in why and "ISIC_0000005.dcm" in why


def test_predict_lists_and_reads_dicom_inputs(tmp_path):
    jpeg = layouts.jpeg(60, 40, color=(150, 90, 70))
    (tmp_path / "a.jpg").write_bytes(jpeg)
    dicom.write_dicom(tmp_path / "b.dcm", jpeg=jpeg, image_id="b")
    items = inputs.list_folder(tmp_path)
    assert [i.shown for i in items] == ["a.jpg", "b.dcm"]
    (tmp_path / "in.csv").write_text("image_name\nb\n")
    (item,) = inputs.list_csv(tmp_path / "in.csv")
    assert item.error is None and item.path.endswith("b.dcm")
    a = inputs.load_image(str(tmp_path / "a.jpg"), 40, 32, images.DEFAULT_MAX_PIXELS)
    b = inputs.load_image(str(tmp_path / "b.dcm"), 40, 32, images.DEFAULT_MAX_PIXELS)
    assert a.shape == (32, 32, 3) and np.array_equal(a, b)


@pytest.mark.shared_data
def test_real_images_wrapped_in_dicom_store_identically(uda1_images, tmp_path):
    for jpg in sorted(uda1_images.glob("*.jpg"))[:5]:
        data = jpg.read_bytes()
        path = tmp_path / f"{jpg.stem}.dcm"
        dicom.write_dicom(path, jpeg=data, image_id=jpg.stem)
        assert dicom.read_image(str(path), 10**8) == data
        assert images.process_image(str(path), 64) == images.process_image(data, 64)
