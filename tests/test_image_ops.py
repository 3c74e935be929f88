"""Tests of the single-image ops: geometry, colour, normalisation, draft decoding."""

from __future__ import annotations

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
    crop_scale=(0.4, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    dihedral=True,
    rotation=30.0,
    brightness=0.2,
    contrast=0.2,
    saturation=0.2,
    hue=0.02,
    color_constancy=True,
)


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
def test_affine_dihedral_matches_array_dihedral(k):
    image = np.random.default_rng(k).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    coeffs = image_ops.affine_coefficients(8, (4.0, 4.0), (8.0, 8.0), 0.0, k)
    out = Image.fromarray(image).transform(
        (8, 8), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR
    )
    np.testing.assert_array_equal(np.asarray(out), image_ops.dihedral(image, k))


def test_affine_crop_maps_the_box_onto_the_output():
    image = _smooth_image(40, 60)
    # A crop of the box x in [10, 30), y in [5, 25) at the same scale equals array slicing.
    coeffs = image_ops.affine_coefficients(20, (20.0, 15.0), (20.0, 20.0))
    out = Image.fromarray(image).transform((20, 20), Image.Transform.AFFINE, coeffs)
    np.testing.assert_array_equal(np.asarray(out), image[5:25, 10:30])


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


def test_train_image_without_augmentation_is_a_resize():
    image = _smooth_image(64, 64)
    config = image_ops.AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), dihedral=False)
    out = image_ops.train_image(_jpeg(image), np.random.default_rng(0), 32, config)
    expected = np.asarray(Image.fromarray(image).resize((32, 32), Image.Resampling.BILINEAR))
    assert np.abs(out.astype(int) - expected).mean() < 4


def test_draft_decode_gives_the_same_size_and_close_content():
    image = _smooth_image(256, 320)
    data = _jpeg(image)
    config = image_ops.AugmentConfig(crop_scale=(0.8, 1.0), rotation=20.0)
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


def test_shades_of_gray_makes_a_colour_cast_image_grey_on_average():
    # A smooth grey texture (JPEG's chroma subsampling would distort pixel-level noise).
    noise = np.random.default_rng(0).uniform(40, 200, (12, 12)).astype(np.uint8)
    texture = Image.fromarray(noise).resize((48, 48), Image.Resampling.BICUBIC)
    grey = np.asarray(texture, np.float64)[..., None] * np.ones((1, 1, 3))
    cast = np.clip(grey * np.array([1.0, 0.75, 0.5]), 0, 255).astype(np.uint8)
    before = cast.reshape(-1, 3).mean(0)
    assert before[0] / before[2] > 1.8
    out = image_ops.eval_image(_jpeg(cast, quality=98), 48, color_constancy=True)
    after = out.reshape(-1, 3).astype(float).mean(0)
    assert after.max() / after.min() < 1.05
    # A grey image is left alone.
    np.testing.assert_allclose(image_ops.shades_of_gray_gains(grey.reshape(-1, 3)), 1.0, atol=1e-9)


def test_color_matrix_semantics():
    grey = np.array([100.0, 100.0, 100.0])
    colour = np.array([200.0, 100.0, 50.0])
    a, t = image_ops.color_matrix()
    np.testing.assert_allclose(a, np.eye(3), atol=1e-12) and np.testing.assert_allclose(t, 0)
    a, t = image_ops.color_matrix(brightness=1.5)
    np.testing.assert_allclose(a @ colour + t, 1.5 * colour)
    a, t = image_ops.color_matrix(saturation=0.0)
    out = a @ colour + t
    assert np.ptp(out) < 1e-9 and out[0] == pytest.approx(colour @ [0.299, 0.587, 0.114])
    a, t = image_ops.color_matrix(contrast=0.0, mean_gray=80.0)
    np.testing.assert_allclose(a @ colour + t, 80.0)
    a, t = image_ops.color_matrix(hue=0.1)
    np.testing.assert_allclose(a @ grey + t, grey, atol=1e-6)  # hue keeps greys grey
    assert not np.allclose(a @ colour + t, colour)


def test_apply_color_clamps_to_uint8_range():
    image = Image.fromarray(np.full((4, 4, 3), 200, np.uint8))
    out = np.asarray(image_ops.apply_color(image, 2.0 * np.eye(3), np.zeros(3)))
    assert out.max() == 255 and out.dtype == np.uint8


def test_augment_config_from_default_config():
    from configs import default

    config = image_ops.AugmentConfig.from_config(default.get_config().data.augment)
    assert config.rotation == 30.0 and config.crop_scale == (0.4, 1.0)
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


def test_rotation_by_90_degrees_equals_the_dihedral_rotation():
    rotated = image_ops.affine_coefficients(16, (9.0, 7.0), (12.0, 10.0), 90.0, 0, 0.5)
    dihedral = image_ops.affine_coefficients(16, (9.0, 7.0), (10.0, 12.0), 0.0, 1, 0.5)
    assert rotated[2] == pytest.approx(dihedral[2]) and rotated[5] == pytest.approx(dihedral[5])
    # Same linear part up to which crop side is which: both map the output square onto the box.
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    coeffs = image_ops.affine_coefficients(8, (4.0, 4.0), (8.0, 8.0), 90.0)
    out = Image.fromarray(image).transform((8, 8), Image.Transform.AFFINE, coeffs)
    np.testing.assert_array_equal(np.asarray(out), image_ops.dihedral(image, 1))
