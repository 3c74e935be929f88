"""The on-device ops beyond flips/rotation/colour (affine, elastic, gamma, blur, noise, cutout):
identity when off, a change when on, ranges, per-key determinism, independence of the batch
split; and the augmentation table against configs/default.py and docs/augmentation.md."""

from __future__ import annotations

import functools
import pathlib

import jax
import numpy as np
import pytest

from isic_jax.data import augment_ops, augment_table, image_ops
from isic_jax.data import device_augment as da

REPO = pathlib.Path(__file__).resolve().parents[1]
MEAN255 = image_ops.IMAGENET_MEAN * 255
STD255 = image_ops.IMAGENET_STD * 255
RNG = jax.random.PRNGKey(0)
IDS = np.arange(6)

# Each op at p = 1 with a visible strength, and the same op with strength 0 (where 0 exists).
OPS = {
    "affine": ({"affine_p": 1.0, "affine_scale": 0.2, "affine_shear": 10.0,
                "affine_translate": 0.1},
               {"affine_p": 1.0, "affine_scale": 0.0, "affine_shear": 0.0,
                "affine_translate": 0.0}),
    "elastic": ({"elastic_p": 1.0, "elastic_magnitude": 0.1, "elastic_grid": 3},
                {"elastic_p": 1.0, "elastic_magnitude": 0.0, "elastic_grid": 3}),
    "gamma": ({"gamma_p": 1.0, "gamma": 0.5}, {"gamma_p": 1.0, "gamma": 0.0}),
    "blur": ({"blur_p": 1.0, "blur_sigma": 1.5}, {"blur_p": 1.0, "blur_sigma": 0.0}),
    "noise": ({"noise_p": 1.0, "noise_std": 0.1}, {"noise_p": 1.0, "noise_std": 0.0}),
    "cutout": ({"cutout_p": 1.0, "cutout_size": 0.5, "cutout_holes": 2}, None),
}


def _images(batch: int = 6, size: int = 20, seed: int = 0) -> np.ndarray:
    """Textured colour images, uint8 [B, S, S, 3], values inside (0, 255)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(batch):
        a, b, c = rng.uniform(0.5, 1.5, 3)
        image = np.stack([0.5 + 0.3 * np.sin(6 * x * a), 0.5 + 0.3 * np.cos(5 * y * b),
                          0.4 + 0.3 * np.sin(4 * (x + y) * c)], -1)
        out.append(image + rng.normal(0, 0.02, image.shape))
    return np.clip(np.round(np.stack(out) * 255), 1, 254).astype(np.uint8)


def _pixels(out) -> np.ndarray:
    return np.asarray(out, np.float64) * STD255 + MEAN255


@functools.cache
def _jitted(cfg: da.DeviceAugmentConfig):
    return jax.jit(lambda im, r, i: da.augment_batch(im, r, cfg, example_ids=i))


def _run(config: dict, images: np.ndarray, ids=IDS, rng=RNG) -> np.ndarray:
    return np.asarray(_jitted(da.DeviceAugmentConfig.from_config(config))(images, rng, ids))


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_on_off_strength_range_and_determinism(name: str) -> None:
    images = _images()
    plain = np.asarray(da.normalize(images))
    on, zero = OPS[name]
    out = _run(on, images)
    assert out.shape == images.shape and out.dtype == np.float32
    pixels = _pixels(out)
    assert np.isfinite(pixels).all() and pixels.min() > -1e-2 and pixels.max() < 255 + 1e-2
    changed = np.abs(out - plain).reshape(len(images), -1).max(1)
    assert (changed > 1e-3).all(), (name, changed)  # p = 1: every image changes
    # p = 0 with the same strengths: the plain normalisation, exactly (the op is not built).
    off = {k: (0.0 if k.endswith("_p") else v) for k, v in on.items()}
    np.testing.assert_allclose(_run(off, images), plain, atol=1e-6)
    if zero is not None:  # strength 0: the identity up to float rounding
        np.testing.assert_allclose(_run(zero, images), plain, atol=1e-4)
    # Deterministic per key: the same ids give the same images, other ids or keys others.
    np.testing.assert_array_equal(_run(on, images), out)
    assert not np.allclose(_run(on, images, ids=IDS + 100), out, atol=1e-3)
    assert not np.allclose(_run(on, images, rng=jax.random.PRNGKey(1)), out, atol=1e-3)


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_does_not_depend_on_the_batch_split(name: str) -> None:
    # As over devices or processes: each example depends only on the key and its id.
    images = _images()
    config = {**OPS[name][0], "rotation": 10.0, "brightness": 0.2}
    whole = _run(config, images)
    halves = np.concatenate([_run(config, images[:3], ids=IDS[:3]),
                             _run(config, images[3:], ids=IDS[3:])])
    np.testing.assert_allclose(halves, whole, atol=1e-4)
    order = np.array([3, 0, 5, 1, 4, 2])
    np.testing.assert_allclose(_run(config, images[order], ids=IDS[order]), whole[order],
                               atol=1e-4)


def test_probability_is_per_image() -> None:
    images = np.repeat(_images(1), 64, 0)
    plain = np.asarray(da.normalize(images))
    out = _run({"blur_p": 0.5, "blur_sigma": 1.5}, images, ids=np.arange(64))
    changed = np.abs(out - plain).reshape(64, -1).max(1) > 1e-4
    assert 16 < changed.sum() < 48, changed.sum()


def test_blur_keeps_a_flat_image_and_smooths_texture() -> None:
    keys = jax.random.split(RNG, 4)
    flat = np.full((4, 12, 12, 3), 100.0, np.float32)
    np.testing.assert_allclose(augment_ops.gaussian_blur(flat, keys, 1.0, 2.0), 100.0, atol=1e-3)
    noisy = np.random.default_rng(0).uniform(0, 255, (4, 24, 24, 3)).astype(np.float32)
    blurred = np.asarray(augment_ops.gaussian_blur(noisy, keys, 1.0, 2.0))
    assert (blurred.std(axis=(1, 2, 3)) < noisy.std(axis=(1, 2, 3))).all()
    np.testing.assert_allclose(blurred.mean(), noisy.mean(), rtol=0.02)  # mass kept
    assert augment_ops.blur_radius(1.0) == 3 and augment_ops.blur_radius(0.0) == 1


def test_noise_gamma_and_cutout_follow_their_definitions() -> None:
    keys = jax.random.split(RNG, 8)
    grey = np.full((8, 32, 32, 3), 128.0, np.float32)
    noisy = np.asarray(augment_ops.gaussian_noise(grey, keys, 1.0, 0.1))
    assert abs(noisy.mean() - 128.0) < 1.0
    std = noisy.std(axis=(1, 2, 3))
    assert (std <= 0.1 * 255 * 1.1).all() and std.max() > 2.0  # per-image std in [0, 25.5]
    ramp = np.broadcast_to(np.linspace(0, 255, 32, dtype=np.float32)[None, None, :, None],
                           (8, 32, 32, 3))
    curved = np.asarray(augment_ops.gamma(ramp, keys, 1.0, 0.5))
    assert (np.diff(curved, axis=2) >= -1e-3).all()  # monotone, ends fixed
    np.testing.assert_allclose(curved[:, :, [0, -1]], ramp[:, :, [0, -1]], atol=1e-2)
    mask = np.asarray(augment_ops.cutout_mask(keys, 1.0, 0.25, 1, (32, 32)))
    area = mask.reshape(8, -1).mean(1)
    assert (area > 0).all() and (area <= 0.0625 + 1e-6).all()  # clipped at the border only
    assert not np.asarray(augment_ops.cutout_mask(keys, 0.0, 0.25, 1, (32, 32))).any()


def test_affine_and_elastic_are_identity_at_strength_zero_and_compose_with_flips() -> None:
    keys = jax.random.split(RNG, 3)
    mats, offsets = augment_ops.affine(keys, 1.0, 0.0, 0.0, 0.0, (8, 8))
    np.testing.assert_allclose(np.asarray(mats), np.broadcast_to(np.eye(2), (3, 2, 2)),
                               atol=1e-7)
    np.testing.assert_array_equal(np.asarray(offsets), 0.0)
    field = augment_ops.elastic(keys, 1.0, 0.0, 4, (8, 8))
    assert field.shape == (3, 8, 8, 2) and not np.asarray(field).any()
    # A shift by whole pixels moves the content by exactly that much.
    image = _images(1, 9)
    shift = np.asarray(da.warp(image, np.eye(2, dtype=np.float32)[None],
                               offsets=np.array([[0.0, 2.0]], np.float32)))
    np.testing.assert_allclose(shift[0, :, :-2], image[0, :, 2:].astype(np.float32), atol=1e-4)


def test_the_table_default_preset_and_doc_list_the_same_keys() -> None:
    from isic_jax.configs import default

    from isic_jax import config_utils

    table = set(augment_table.by_key())
    assert table == set(default.get_config().data.augment)
    checks = config_utils.schema._CHECKS
    assert {f"data.augment.{k}" for k in table} <= set(checks)
    for key, (_, param) in augment_table.by_key().items():
        assert checks[f"data.augment.{key}"] is param.check  # validation reads the table
    doc = (REPO / "docs" / "augmentation.md").read_text()
    missing = [k for k in table if f"`{k}`" not in doc]
    assert not missing, f"docs/augmentation.md does not describe {missing}"
    # Every device key is a DeviceAugmentConfig field (what the step reads).
    fields = set(da.DeviceAugmentConfig.__dataclass_fields__)
    device = {p.key for a in augment_table.AUGMENTATIONS if a.where != "host" for p in a.params}
    assert device <= fields
