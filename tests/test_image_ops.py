"""Tests of the host image ops: crop, resize, dihedral flips, draft decoding."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from isic_jax import image_ops


def _jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth, asymmetric colour image (gradients + a blob), uint8 [H, W, 3]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    cx, cy = rng.uniform(0.3, 0.6, 2)
    blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.02)
    image = np.stack([0.2 + 0.6 * x, 0.3 + 0.5 * y, 0.3 + 0.6 * blob], -1)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


ALL_AUGMENT = image_ops.AugmentConfig(
    crop_scale=(0.4, 1.0), crop_ratio=(3 / 4, 4 / 3), dihedral=True, interpolation="nearest"
)
NO_AUGMENT = image_ops.AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), dihedral=False)


def test_dihedral_gives_8_distinct_transforms_of_an_asymmetric_image():
    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    variants = image_ops.dihedral_variants(image)
    assert len({v.tobytes() for v in variants}) == 8
    # The group is closed: transforming a variant again stays among the 8.
    for v in variants:
        assert {image_ops.dihedral(v, k).tobytes() for k in range(8)} == {
            w.tobytes() for w in variants
        }


@pytest.mark.parametrize("k", range(8))
def test_pil_dihedral_matches_array_dihedral(k):
    image = np.random.default_rng(k).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = np.asarray(image_ops.dihedral_pil(Image.fromarray(image), k))
    np.testing.assert_array_equal(out, image_ops.dihedral(image, k))


def test_crop_box_maps_stored_pixels_to_the_decoded_image_and_clips():
    box = image_ops.crop_box((160, 128), (320, 256), (100.0, 50.0), (40.0, 20.0))
    assert box == pytest.approx((40.0, 20.0, 60.0, 30.0))
    # A box reaching past the border by a rounding error is clipped (PIL would raise).
    box = image_ops.crop_box((320, 256), (320, 256), (160.0, 128.0), (320.0 + 1e-9, 256.0))
    assert box == (0.0, 0.0, 320, 256)


def test_sample_crop_respects_scale_ratio_and_bounds():
    rng = np.random.default_rng(0)
    for _ in range(200):
        cx, cy, w, h = image_ops.sample_crop(rng, 120, 80, (0.3, 0.9), (0.75, 4 / 3))
        assert 0.3 * 120 * 80 * 0.999 <= w * h <= 0.9 * 120 * 80 * 1.001
        assert 0.75 * 0.999 <= w / h <= 4 / 3 * 1.001
        assert cx - w / 2 >= 0 and cx + w / 2 <= 120 + 1e-6
        assert cy - h / 2 >= 0 and cy + h / 2 <= 80 + 1e-6


def test_sample_crop_falls_back_to_a_centred_box():
    # A 100x10 strip cannot hold a crop with ratio <= 4/3 and >= 90 % of the area.
    cx, cy, w, h = image_ops.sample_crop(
        np.random.default_rng(0), 100, 10, (0.9, 1.0), (0.75, 4 / 3)
    )
    assert (cx, cy) == (50, 5) and h == 10 and w == pytest.approx(10 * 4 / 3)


@pytest.mark.parametrize("size", [32, 57])
def test_train_image_shape_dtype_and_determinism(size):
    data = _jpeg(_smooth_image(48, 64))
    a = image_ops.train_image(data, np.random.default_rng(1), size, ALL_AUGMENT)
    b = image_ops.train_image(data, np.random.default_rng(1), size, ALL_AUGMENT)
    c = image_ops.train_image(data, np.random.default_rng(2), size, ALL_AUGMENT)
    assert a.shape == (size, size, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("interpolation", ["nearest", "box", "bilinear"])
def test_train_image_without_augmentation_is_a_resize(interpolation):
    image = _smooth_image(64, 64)
    config = dataclasses.replace(NO_AUGMENT, interpolation=interpolation)
    out = image_ops.train_image(_jpeg(image), np.random.default_rng(0), 32, config)
    expected = np.asarray(Image.fromarray(image).resize((32, 32), Image.Resampling.BILINEAR))
    assert np.abs(out.astype(int) - expected).mean() < 4


def test_train_image_crops_the_sampled_box_and_applies_the_drawn_flip():
    image = _smooth_image(40, 60)
    config = image_ops.AugmentConfig(crop_scale=(0.3, 0.3), crop_ratio=(1.0, 1.0))
    for seed in range(4):
        out = image_ops.train_image(_jpeg(image, 98), np.random.default_rng(seed), 24, config)
        # Replay the draws: crop box, then dihedral element.
        rng = np.random.default_rng(seed)
        cx, cy, w, h = image_ops.sample_crop(rng, 60, 40, (0.3, 0.3), (1.0, 1.0))
        k = int(rng.integers(8))
        box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        crop = Image.fromarray(image).resize((24, 24), Image.Resampling.NEAREST, box=box)
        expected = image_ops.dihedral(np.asarray(crop), k)
        assert np.abs(out.astype(int) - expected).mean() < 3, seed
        assert np.abs(out.astype(int) - np.asarray(crop)).mean() > 3 or k == 0


def test_draft_decode_gives_the_same_size_and_close_content():
    image = _smooth_image(256, 320)
    data = _jpeg(image)
    config = image_ops.AugmentConfig(crop_scale=(0.8, 1.0), interpolation="bilinear")
    decoded, factor = image_ops.decode(data, (64, 64))
    assert factor < 1 and decoded.size == (320 * factor, 256 * factor)
    for seed in range(3):
        drafted = image_ops.train_image(data, np.random.default_rng(seed), 32, config)
        full = image_ops.train_image(data, np.random.default_rng(seed), 32, config, draft=False)
        assert drafted.shape == full.shape == (32, 32, 3)
        assert np.abs(drafted.astype(int) - full).mean() < 6
    drafted = image_ops.eval_image(data, 32)
    full = image_ops.eval_image(data, 32, draft=False)
    assert drafted.shape == full.shape == (32, 32, 3)
    assert np.abs(drafted.astype(int) - full).mean() < 4


def test_draft_does_not_reduce_below_twice_the_request():
    data = _jpeg(_smooth_image(100, 150))
    _, factor = image_ops.decode(data, (60, 60))  # 100 < 2 * 60: no reduction possible
    assert factor == 1.0


def test_eval_image_is_a_centre_crop_of_the_shorter_side():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 20:60] = 200  # the centred 40x40 square is bright, the sides dark
    out = image_ops.eval_image(_jpeg(image), 20)
    assert out.shape == (20, 20, 3)
    assert out[2:-2, 2:-2].min() > 180


def test_normalize_statistics():
    mean255 = image_ops.IMAGENET_MEAN * 255
    std255 = image_ops.IMAGENET_STD * 255
    image = np.random.default_rng(0).integers(0, 256, (31, 17, 3), dtype=np.uint8)
    out = image_ops.normalize(image)
    assert out.dtype == np.float32 and out.shape == image.shape
    np.testing.assert_allclose(out, (image - mean255) / std255, rtol=1e-5, atol=1e-5)
    # Per-channel mean/std of the output follow from the input's.
    pixels = image.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(
        out.reshape(-1, 3).mean(0), (pixels.mean(0) - mean255) / std255, atol=1e-4
    )
    np.testing.assert_allclose(out.reshape(-1, 3).std(0), pixels.std(0) / std255, rtol=1e-4)


def test_augment_config_from_default_config():
    from configs import default

    config = image_ops.AugmentConfig.from_config(default.get_config().data.augment)
    assert config.crop_scale == (0.4, 1.0) and config.dihedral
    assert config.interpolation == image_ops.DEFAULT_INTERPOLATION  # absent from the config
    assert image_ops.AugmentConfig.from_config({"interpolation": "box"}).interpolation == "box"
    with pytest.raises(ValueError, match="interpolation"):
        image_ops.AugmentConfig.from_config({"interpolation": "lanczos"})


@pytest.mark.shared_data
def test_real_sample_images_augment_and_draft(uda1_images):
    paths = sorted(uda1_images.glob("*.jpg"))[:4]
    for seed, path in enumerate(paths):
        data = path.read_bytes()
        out = image_ops.train_image(data, np.random.default_rng(seed), 64, ALL_AUGMENT)
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8 and out.std() > 1
        drafted = image_ops.eval_image(data, 64)
        full = image_ops.eval_image(data, 64, draft=False)
        assert drafted.shape == (64, 64, 3)
        assert np.abs(drafted.astype(int) - full).mean() < 4
