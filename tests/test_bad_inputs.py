"""Bad inputs are skipped with a reason (or converted), never abort the build nor store junk."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from isic_jax.data import isic
from isic_jax.data.isic import images, releases
from isic_jax.testing import layouts

SIZE = 32


def _build(source, data_dir, **options) -> isic.Isic:
    builder = isic.make_builder(
        "isic2019", SIZE, data_dir, options=isic.BuildOptions(num_folds=2, **options)
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(source))
    )
    return builder


def _records(builder) -> dict[str, dict]:
    source = builder.as_data_source(
        split="fold0+fold1", decoders={"image": tfds.decode.SkipDecoding()}
    )
    return {source[i]["image_id"].decode(): source[i] for i in range(len(source))}


def _pixels(record) -> np.ndarray:
    img = Image.open(io.BytesIO(record["image"]))
    assert img.mode == "RGB" and img.format == "JPEG"
    return np.asarray(img)


def _truncated_jpeg() -> bytes:
    data = layouts.jpeg(200, 150, color=(90, 160, 30))
    return data[: len(data) // 2]


def test_truncated_jpeg_opens_but_fails_to_load():
    """Why prepare decodes everything: the header of a truncated JPEG reads fine."""
    img = Image.open(io.BytesIO(_truncated_jpeg()))
    assert img.size == (200, 150)
    with pytest.raises(OSError, match="truncated"):
        img.load()
    with pytest.raises(images.BadImage, match="truncated"):
        images.process_image(_truncated_jpeg(), SIZE)


def test_bad_and_odd_images_in_one_build(tmp_path):
    src = tmp_path / "src"
    good = layouts.balanced_examples("isic2019", 6)
    odd = {  # id -> (bytes, extension): each must be converted, not skipped
        "ISIC_0000010": (layouts.jpeg(mode="L"), ".jpg"),  # grayscale JPEG
        "ISIC_0000011": (layouts.jpeg(mode="CMYK"), ".jpg"),  # CMYK JPEG
        "ISIC_0000012": (layouts.png(mode="RGBA"), ".png"),
        "ISIC_0000013": (layouts.png(mode="LA"), ".png"),
        "ISIC_0000014": (layouts.png(mode="I;16"), ".png"),  # 16-bit grayscale PNG
        "ISIC_0000015": (layouts.png(mode="P"), ".png"),
        "ISIC_0000016": (layouts.jpeg(40, 30, orientation=6), ".jpg"),  # EXIF: rotate 90 CW
    }
    bad = {  # id -> (bytes, reason fragment)
        "ISIC_0000020": (_truncated_jpeg(), "corrupt or truncated"),
        "ISIC_0000021": (b"\xff\xd8\xff\xe0" + os.urandom(300), "corrupt or truncated"),
        "ISIC_0000022": (b"id,label\nthis is a CSV, not an image\n", "not an image"),
        "ISIC_0000023": (b"", "not an image"),
        "ISIC_0000024": (layouts.jpeg(250, 200), "decompression bomb"),  # 50000 px > max_pixels
    }
    extra = [layouts.Example(i, "NV") for i in [*odd, *bad]]
    unsafe = [
        layouts.Example("../outside", "NV"),
        layouts.Example("sub/ISIC_0000030", "MEL"),
        layouts.Example("ISIC_0000031", "NV"),  # its image: a symlink to a file outside
        layouts.Example("ISIC_0000032", "MEL"),  # its image: inside a linked folder outside
    ]
    layouts.write_layout(src, "isic2019", good + extra + unsafe)
    folder = src / layouts.IMAGE_DIRS["isic2019"]
    for image_id, (data, ext) in odd.items():
        (folder / f"{image_id}{ext}").write_bytes(data)
    for image_id, (data, _) in bad.items():
        (folder / f"{image_id}.jpg").write_bytes(data)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "outside.jpg").write_bytes(layouts.jpeg())
    (outside / "ISIC_0000031.jpg").write_bytes(layouts.jpeg())
    (outside / "ISIC_0000032.jpg").write_bytes(layouts.jpeg())
    (tmp_path / "ISIC_0000030.jpg").write_bytes(layouts.jpeg())
    os.symlink(outside / "ISIC_0000031.jpg", folder / "ISIC_0000031.jpg")
    os.symlink(outside, src / "linked_folder")

    builder = _build(src, tmp_path / "data", max_pixels=40_000)

    recs = _records(builder)
    why = {s["item"]: (s["reason"], s["stage"]) for s in builder.report["skipped"]}
    assert set(recs) == {e.image_id for e in good} | set(odd)
    for image_id, (_, fragment) in bad.items():
        assert fragment in why[image_id][0], (image_id, why[image_id])
        assert why[image_id][1] == "decode"
    assert "outside the source folder" in why["../outside"][0]
    assert "not paths" in why["sub/ISIC_0000030"][0]
    assert "outside the source folder" in why["ISIC_0000031"][0]
    assert "missing" in why["ISIC_0000032"][0]  # a linked folder is never entered
    assert "linked_folder" in why and "outside" in why["linked_folder"][0]

    for image_id in odd:
        assert min(Image.open(io.BytesIO(recs[image_id]["image"])).size) == SIZE
    gray = _pixels(recs["ISIC_0000010"])
    assert np.abs(gray[..., 0].astype(int) - gray[..., 2]).max() < 8  # R == G == B
    wide = _pixels(recs["ISIC_0000014"])  # 16-bit values 50000 -> ~195, not clipped to 255
    assert 170 < np.median(wide) < 215
    rgba = _pixels(recs["ISIC_0000012"])
    assert rgba[-1, -1, 0] > 150  # opaque part keeps its colour (200, 100, 50)
    rotated = _pixels(recs["ISIC_0000016"])  # 40x30 landscape, shown rotated: portrait
    assert rotated.shape[:2] == (43, 32)
    # The dark corner (top-left when stored) is top-right once rotated 90 degrees clockwise.
    assert rotated[:5, -5:].mean() < 60 and rotated[:5, :5].mean() > 60


def test_decompression_bomb_over_our_limit():
    with pytest.raises(images.BadImage, match="1200 px is over the limit of 1000 px"):
        images.process_image(layouts.jpeg(40, 30), SIZE, max_pixels=1000)


def test_decompression_bomb_from_pil_itself(monkeypatch):
    """PIL's own bomb error (over twice its limit) becomes a BadImage too."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(images.BadImage, match="decompression bomb"):
        images.process_image(layouts.jpeg(40, 30), SIZE, max_pixels=10**9)


def test_pil_limits_context_restores_global_state():
    before = Image.MAX_IMAGE_PIXELS
    with images.pil_limits(1234):
        assert Image.MAX_IMAGE_PIXELS == 1234
        with pytest.raises(images.BadImage, match="decompression bomb"):
            images.process_image(layouts.jpeg(40, 40), SIZE, max_pixels=10**9)  # PIL's warning
    assert before == Image.MAX_IMAGE_PIXELS


def test_big_jpeg_is_drafted_and_resized_exactly():
    data = layouts.jpeg(1600, 1200)
    out = Image.open(io.BytesIO(images.process_image(data, 100)))
    assert out.size == (133, 100)
    small = Image.open(io.BytesIO(images.process_image(layouts.jpeg(30, 40), 64)))
    assert small.size == (64, 85)  # smaller images are upscaled: the shorter side is exact


def test_unsafe_ids():
    assert "outside" in releases.unsafe_id_reason("../x")
    assert "outside" in releases.unsafe_id_reason("a/../../x")
    assert "not paths" in releases.unsafe_id_reason("a/b")
    assert releases.unsafe_id_reason("..") is not None
    assert releases.unsafe_id_reason("") is not None
    assert releases.unsafe_id_reason("ISIC_0000000_downsampled") is None


def test_source_with_no_usable_example(tmp_path):
    examples = [layouts.Example(f"ISIC_{i:07d}", "NV", image=None) for i in range(4)]
    layouts.write_layout(tmp_path / "src", "isic2019", examples)
    with pytest.raises(isic.NoUsableExamplesError, match="image file missing"):
        _build(tmp_path / "src", tmp_path / "data")
    assert not isic.make_builder("isic2019", SIZE, tmp_path / "data").is_prepared()


def test_fold_whose_images_all_fail_is_a_clear_error(tmp_path):
    examples = layouts.balanced_examples("isic2019", 4)
    for e in examples:
        e.image = b"not a jpeg"
    layouts.write_layout(tmp_path / "src", "isic2019", examples)
    with pytest.raises(isic.NoUsableExamplesError, match="none of its .* images could be decoded"):
        _build(tmp_path / "src", tmp_path / "data")
