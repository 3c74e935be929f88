"""Tests of the host image ops: position hashing, crop sampling, crop + resize, draft decoding."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from isic_jax.data import image_ops


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


ALL_AUGMENT = image_ops.AugmentConfig(crop_scale=(0.4, 1.0), crop_ratio=(3 / 4, 4 / 3))
NO_AUGMENT = image_ops.AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))


def test_dihedral_gives_8_distinct_transforms_of_an_asymmetric_image():
    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    variants = [image_ops.dihedral(image, k) for k in range(8)]
    assert len({v.tobytes() for v in variants}) == 8
    # The group is closed: transforming a variant again stays among the 8.
    for v in variants:
        assert {image_ops.dihedral(v, k).tobytes() for k in range(8)} == {
            w.tobytes() for w in variants
        }


def test_position_uniforms_are_a_pure_function_of_seed_and_position():
    u = image_ops.position_uniforms(3, np.arange(1000), 40)
    assert u.shape == (1000, 40) and u.dtype == np.float64
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.std() - 12**-0.5) < 0.01
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.1
    # Any subset, in any order, gives the same rows; another seed different ones.
    np.testing.assert_array_equal(image_ops.position_uniforms(3, [999, 5], 40), u[[999, 5]])
    assert not np.allclose(image_ops.position_uniforms(4, [5], 40), u[5])


def test_sample_crops_respect_scale_ratio_and_bounds():
    u = image_ops.position_uniforms(0, np.arange(500), image_ops.CROP_DRAWS)
    widths, heights = np.full(500, 120.0), np.full(500, 80.0)
    cx, cy, w, h = image_ops.sample_crops(u, widths, heights, (0.3, 0.9), (0.75, 4 / 3))
    assert (w * h >= 0.3 * 120 * 80 * 0.999).all() and (w * h <= 0.9 * 120 * 80 * 1.001).all()
    assert (w / h >= 0.75 * 0.999).all() and (w / h <= 4 / 3 * 1.001).all()
    assert (cx - w / 2 >= 0).all() and (cx + w / 2 <= 120 + 1e-6).all()
    assert (cy - h / 2 >= 0).all() and (cy + h / 2 <= 80 + 1e-6).all()
    assert np.ptp(w * h) > 0.3 * 120 * 80 and np.ptp(cx) > 20  # they do vary


def test_sample_crops_fall_back_to_a_centred_box():
    # A 100x10 strip cannot hold a crop with ratio <= 4/3 and >= 90 % of the area.
    u = image_ops.position_uniforms(0, [0, 1], image_ops.CROP_DRAWS)
    cx, cy, w, h = image_ops.sample_crops(u, [100, 10], [10, 100], (0.9, 1.0), (0.75, 4 / 3))
    np.testing.assert_allclose(np.stack([cx, cy]), [[50, 5], [5, 50]])
    np.testing.assert_allclose(np.stack([w, h]), [[10 * 4 / 3, 10], [10, 10 / 0.75]])


def test_crop_box_maps_stored_pixels_to_the_decoded_image_and_clips():
    box = image_ops.crop_box((160, 128), (320, 256), (100.0, 50.0), (40.0, 20.0))
    assert box == pytest.approx((40.0, 20.0, 60.0, 30.0))
    # A box reaching past the border by a rounding error is clipped (PIL would raise).
    box = image_ops.crop_box((320, 256), (320, 256), (160.0, 128.0), (320.0 + 1e-9, 256.0))
    assert box == (0.0, 0.0, 320, 256)


@pytest.mark.parametrize("size", [32, 57])
def test_train_batch_shape_dtype_and_determinism(size):
    datas = [_jpeg(_smooth_image(48, 64, seed)) for seed in range(3)]
    a = image_ops.train_batch(datas, [0, 1, 2], 7, size, ALL_AUGMENT)
    assert a.shape == (3, size, size, 3) and a.dtype == np.uint8 and a.flags.writeable
    np.testing.assert_array_equal(a, image_ops.train_batch(datas, [0, 1, 2], 7, size, ALL_AUGMENT))
    assert not np.array_equal(a, image_ops.train_batch(datas, [0, 1, 2], 8, size, ALL_AUGMENT))
    # An example's crop depends on its position only, not on the rest of the batch.
    single = _train_image(datas[2], 2, 7, size, ALL_AUGMENT)
    np.testing.assert_array_equal(single, a[2])
    assert not np.array_equal(_train_image(datas[2], 3, 7, size, ALL_AUGMENT), a[2])


@pytest.mark.parametrize("interpolation", ["nearest", "box", "bilinear", "opencv_bilinear"])
def test_train_image_without_augmentation_is_a_resize(interpolation):
    image = _smooth_image(64, 64)
    config = dataclasses.replace(NO_AUGMENT, interpolation=interpolation)
    out = _train_image(_jpeg(image), 0, 0, 32, config)
    expected = np.asarray(Image.fromarray(image).resize((32, 32), Image.Resampling.BILINEAR))
    assert np.abs(out.astype(int) - expected).mean() < 4


def test_train_image_is_the_sampled_crop():
    image = _smooth_image(40, 60)
    config = image_ops.AugmentConfig(crop_scale=(0.3, 0.3), crop_ratio=(1.0, 1.0))
    for position in range(4):
        out = _train_image(_jpeg(image, 98), position, 5, 24, config)
        u = image_ops.position_uniforms(5, [position], image_ops.CROP_DRAWS)
        cx, cy, w, h = (v[0] for v in image_ops.sample_crops(u, [60], [40], (0.3, 0.3), (1, 1)))
        box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        crop = Image.fromarray(image).resize((24, 24), Image.Resampling.NEAREST, box=box)
        assert np.abs(out.astype(int) - np.asarray(crop)).mean() < 3, position


@pytest.mark.parametrize("size", [24, 40])
def test_opencv_bilinear_crop_matches_pil_bilinear(size):
    # The same float box, PIL's pixel-centre convention: up- (40) and down-scaled (24) crops.
    image = _smooth_image(40, 60)
    config = image_ops.AugmentConfig(crop_scale=(0.5, 0.5), crop_ratio=(1.0, 1.0),
                                     interpolation="opencv_bilinear")
    datas = [_jpeg(image, 98)] * 4
    out = image_ops.train_batch(datas, range(4), 5, size, config)
    pil = image_ops.train_batch(datas, range(4), 5, size,
                                dataclasses.replace(config, interpolation="bilinear"))
    assert out.shape == pil.shape == (4, size, size, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - pil).mean() < 1.5
    assert not np.array_equal(out[0], out[1])  # different crops per position


def test_opencv_bilinear_without_opencv_names_the_key_and_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cv2", None)
    image_ops._opencv.cache_clear()  # an earlier test may have found OpenCV
    try:
        with pytest.raises(ValueError, match="opencv_bilinear.*fast-resize"):
            image_ops.AugmentConfig(interpolation="opencv_bilinear")
    finally:
        image_ops._opencv.cache_clear()


def test_draft_decode_gives_the_same_size_and_close_content():
    image = _smooth_image(256, 320)
    data = _jpeg(image)
    config = image_ops.AugmentConfig(crop_scale=(0.8, 1.0), interpolation="bilinear")
    decoded, factor = image_ops.decode(data, (64, 64))
    assert factor < 1 and decoded.size == (320 * factor, 256 * factor)
    drafted = image_ops.train_batch([data] * 3, [0, 1, 2], 0, 32, config)
    full = image_ops.train_batch([data] * 3, [0, 1, 2], 0, 32, config, draft=False)
    assert drafted.shape == full.shape == (3, 32, 32, 3)
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
    batch = image_ops.eval_batch([_jpeg(image), None], 20)
    assert batch.shape == (2, 20, 20, 3) and batch.flags.writeable
    np.testing.assert_array_equal(batch[0], out)
    assert (batch[1] == 0).all()  # padding


def test_normalize_statistics():
    mean255 = image_ops.IMAGENET_MEAN * 255
    std255 = image_ops.IMAGENET_STD * 255
    image = np.random.default_rng(0).integers(0, 256, (31, 17, 3), dtype=np.uint8)
    out = image_ops.normalize(image)
    assert out.dtype == np.float32 and out.shape == image.shape
    np.testing.assert_allclose(out, (image - mean255) / std255, rtol=1e-5, atol=1e-5)


def test_augment_config_from_default_config():
    from isic_jax.configs import default

    config = image_ops.AugmentConfig.from_config(default.get_config().data.augment)
    assert config.crop_scale == (0.4, 1.0) and config.crop_ratio == pytest.approx((0.75, 4 / 3))
    assert config.interpolation == image_ops.DEFAULT_INTERPOLATION  # absent from the config
    assert image_ops.AugmentConfig.from_config({"interpolation": "box"}).interpolation == "box"
    with pytest.raises(ValueError, match="interpolation"):
        image_ops.AugmentConfig.from_config({"interpolation": "lanczos"})


@pytest.mark.shared_data
def test_real_sample_images_augment_and_draft(uda1_images):
    paths = sorted(uda1_images.glob("*.jpg"))[:4]
    datas = [path.read_bytes() for path in paths]
    out = image_ops.train_batch(datas, range(4), 0, 64, ALL_AUGMENT)
    assert out.shape == (4, 64, 64, 3) and out.dtype == np.uint8
    assert all(image.std() > 1 for image in out)
    for data in datas:
        drafted = image_ops.eval_image(data, 64)
        full = image_ops.eval_image(data, 64, draft=False)
        assert drafted.shape == (64, 64, 3)
        assert np.abs(drafted.astype(int) - full).mean() < 4


def _train_image(data, position, seed, size, config):
    """`train_batch` of one image: the same pixels as within a batch."""
    return image_ops.train_batch([data], [position], seed, size, config)[0]
