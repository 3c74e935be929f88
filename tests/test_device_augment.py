"""Tests of the on-device augmentation: geometry, colour, constancy, keys, jit/vmap."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isic_jax.data import device_augment as da
from isic_jax.data import image_ops

MEAN255 = image_ops.IMAGENET_MEAN * 255
STD255 = image_ops.IMAGENET_STD * 255
LUMA = np.array([0.299, 0.587, 0.114])
RNG = jax.random.PRNGKey(0)
ALL = da.DeviceAugmentConfig(
    dihedral=True, rotation=(-30.0, 30.0), brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02
)


def _images(batch: int = 4, height: int = 16, width: int = 16, seed: int = 0) -> np.ndarray:
    """Smooth asymmetric colour images, uint8 [B, H, W, 3] (values away from 0 and 255)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    out = []
    for _ in range(batch):
        a, b, c = rng.uniform(0.2, 0.8, 3)
        image = np.stack([0.2 + 0.6 * x * a, 0.3 + 0.5 * y * b, 0.25 + 0.5 * (x * y) * c], -1)
        out.append(image)
    return np.round(np.stack(out) * 255).astype(np.uint8)


def _pixels(out: jax.Array) -> np.ndarray:
    """Undo the normalisation: float64 on [0, 255]."""
    return np.asarray(out, np.float64) * STD255 + MEAN255


def test_output_shape_dtype_and_range():
    images = _images(3, 12, 20)
    no_flips = dataclasses.replace(ALL, dihedral=False)  # flips need square images
    out = jax.jit(lambda im, r: da.augment_batch(im, r, no_flips))(images, RNG)
    assert out.shape == (3, 12, 20, 3) and out.dtype == jnp.float32
    pixels = _pixels(out)
    assert np.isfinite(pixels).all() and pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3


def test_no_rotation_no_jitter_is_normalisation_only():
    images = _images()
    out = da.augment_batch(images, RNG, da.DeviceAugmentConfig())
    expected = (images - MEAN255) / STD255
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out), image_ops.normalize(images), atol=1e-6)
    np.testing.assert_allclose(np.asarray(da.normalize(images)), expected, atol=1e-5)


@pytest.mark.parametrize("angle,k", [(90.0, 1), (-90.0, 3), (180.0, 2)])
def test_rotation_by_right_angles_equals_rot90(angle, k):
    images = _images(2, 9, 9)
    config = da.DeviceAugmentConfig(rotation=(angle, angle))
    out = _pixels(da.augment_batch(images, RNG, config))
    expected = np.rot90(images, k, axes=(1, 2)).astype(np.float64)
    # Sample points land on pixel centres up to float32 rounding of cos/sin.
    np.testing.assert_allclose(out[:, 1:-1, 1:-1], expected[:, 1:-1, 1:-1], atol=2e-3)
    assert not np.allclose(out, images, atol=1)  # the images are not symmetric


@pytest.mark.parametrize("k", range(8))
def test_geometry_matrix_of_each_dihedral_element_equals_the_array_dihedral(k):
    images = _images(1, 7, 7)
    mats = da.geometry_matrices(jnp.zeros(1), jnp.array([k]))
    out = np.asarray(da.warp(images, mats))
    np.testing.assert_array_equal(out[0], image_ops.dihedral(images[0], k).astype(np.float32))


def test_random_dihedral_elements_are_exact_and_uniform():
    images = np.repeat(_images(1, 6, 6), 64, 0)
    config = da.DeviceAugmentConfig(dihedral=True)  # no rotation: exact pixel permutations
    out = _pixels(da.augment_batch(images, RNG, config, example_ids=np.arange(64)))
    variants = [v.astype(np.float64) for v in [image_ops.dihedral(images[0], k) for k in range(8)]]
    seen = []
    for image in out:
        matches = [k for k, v in enumerate(variants) if np.allclose(image, v, atol=1e-3)]
        assert len(matches) == 1
        seen.append(matches[0])
    assert set(seen) == set(range(8))  # 64 draws: every element shows up
    with pytest.raises(ValueError, match="square"):
        da.augment_batch(_images(2, 6, 8), RNG, config)


def test_rotation_sense_and_fill():
    # A bright column right of the centre ends up above it after +90 degrees (counter-clockwise).
    image = np.full((1, 11, 11, 3), 50, np.uint8)
    image[0, :, 8] = 200
    out = np.asarray(da.rotate(image, jnp.array([90.0])))  # [0, 255], not normalised
    assert out[0, 2, 5, 0] == pytest.approx(200, abs=1e-2)
    assert out[0, 5, 8, 0] == pytest.approx(50, abs=1e-2)
    # Corners are filled from the image (reflect / edge), never black: a flat image stays flat.
    flat = np.full((2, 10, 14, 3), 120, np.uint8)
    for fill in ("reflect", "edge"):
        rotated = da.rotate(flat, jnp.array([30.0, -17.0]), fill)
        np.testing.assert_allclose(np.asarray(rotated), 120, atol=1e-3)


def test_zero_strength_colour_matrix_is_the_identity():
    mean = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (3, 3)), jnp.float32)
    ones = jnp.ones(3)
    affine = da.color_matrices(mean, None, ones, ones, ones, jnp.zeros(3))
    identity = np.concatenate([np.eye(3), np.zeros((3, 1))], 1)
    np.testing.assert_allclose(np.asarray(affine), np.broadcast_to(identity, (3, 3, 4)), atol=1e-6)
    images = _images()
    out = da.apply_color(images, jnp.broadcast_to(jnp.asarray(identity, jnp.float32), (4, 3, 4)))
    np.testing.assert_allclose(np.asarray(out), images, atol=1e-4)
    # And augment_batch with every strength 0 (but the keys still drawn) is the normalisation.
    zero = da.DeviceAugmentConfig(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    np.testing.assert_allclose(
        np.asarray(da.augment_batch(images, RNG, zero)), image_ops.normalize(images), atol=1e-5
    )


def test_colour_ops_follow_their_definitions():
    colour = np.array([[200.0, 100.0, 50.0]], np.float32)
    grey = np.full((1, 3), 100.0, np.float32)
    mean = jnp.asarray([[90.0, 120.0, 60.0]])
    one = jnp.ones(1)

    def apply(affine, x):
        return np.asarray(affine[0, :, :3] @ x[0] + affine[0, :, 3])

    brightness = da.color_matrices(mean, brightness=jnp.array([1.5]))
    np.testing.assert_allclose(apply(brightness, colour), 1.5 * colour[0], rtol=1e-6)
    saturation = da.color_matrices(mean, saturation=jnp.array([0.0]))
    out = apply(saturation, colour)
    assert np.ptp(out) < 1e-3 and out[0] == pytest.approx(colour[0] @ LUMA, rel=1e-5)
    contrast = da.color_matrices(mean, contrast=jnp.array([0.0]))
    np.testing.assert_allclose(apply(contrast, colour), float(mean[0] @ LUMA), rtol=1e-5)
    hue = da.color_matrices(mean, hue=jnp.array([0.1]))
    np.testing.assert_allclose(apply(hue, grey), grey[0], atol=1e-3)  # greys stay grey
    assert not np.allclose(apply(hue, colour), colour[0], atol=1)
    assert apply(hue, colour) @ LUMA == pytest.approx(colour[0] @ LUMA, rel=1e-3)  # keeps luma
    gains = da.color_matrices(mean, gains=jnp.array([[2.0, 1.0, 0.5]]), contrast=one)
    np.testing.assert_allclose(apply(gains, colour), [400.0, 100.0, 25.0], rtol=1e-6)


def test_saturation_zero_gives_grey_images_and_brightness_scales():
    images = _images()
    affine = da.color_matrices(jnp.zeros((4, 3)), saturation=jnp.zeros(4))
    out = np.asarray(da.apply_color(images, affine))
    np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-3)
    np.testing.assert_allclose(out[..., 0], out[..., 2], atol=1e-3)
    np.testing.assert_allclose(out[..., 0], images @ LUMA, atol=1e-3)
    # Saturation jitter only: every output pixel lies on the line through its input and its grey.
    out = _pixels(da.augment_batch(images, RNG, {"saturation": 0.5}))
    grey = (images @ LUMA)[..., None]
    t = ((out - grey) * (images - grey)).sum(-1) / np.maximum(((images - grey) ** 2).sum(-1), 1e-9)
    np.testing.assert_allclose(out, grey + t[..., None] * (images - grey), atol=1e-2)
    factors = t.reshape(4, -1).mean(1)  # the saturation factor of each image, in [0.5, 1.5]
    assert ((factors >= 0.5) & (factors <= 1.5)).all() and np.ptp(factors) > 1e-3
    # Brightness only: each output image is its input times one factor in [0.8, 1.2].
    out = _pixels(da.augment_batch(images, RNG, {"brightness": 0.2}))
    ratios = out / images
    factors = ratios.reshape(4, -1).mean(1)
    np.testing.assert_allclose(
        ratios, factors[:, None, None, None] * np.ones_like(ratios), rtol=1e-4
    )
    assert ((factors >= 0.8) & (factors <= 1.2)).all() and np.ptp(factors) > 1e-3


def test_contrast_keeps_the_mean_grey():
    images = _images()
    out = _pixels(da.augment_batch(images, RNG, {"contrast": 0.5}))
    # Unclipped contrast about the image's mean luma keeps that mean; the spread changes.
    np.testing.assert_allclose((out @ LUMA).mean((1, 2)), (images @ LUMA).mean((1, 2)), atol=1e-2)
    assert not np.allclose(out.std((1, 2)), images.std((1, 2)), rtol=1e-3)


def test_colour_constancy_neutralises_a_colour_cast():
    rng = np.random.default_rng(0)
    texture = rng.uniform(60, 200, (2, 16, 16, 1))
    cast = np.clip(texture * np.array([1.0, 0.75, 0.5]), 0, 255).astype(np.uint8)
    before = cast.reshape(2, -1, 3).mean(1)
    assert (before[:, 0] / before[:, 2] > 1.8).all()
    for out in (
        da.preprocess_eval(cast, {"color_constancy": True}),
        da.augment_batch(cast, RNG, {"color_constancy": True}),
    ):
        after = _pixels(out).reshape(2, -1, 3).mean(1)
        assert (after.max(1) / after.min(1) < 1.05).all()
    # A grey image gets gains 1; an all-black one (eval padding) stays finite.
    grey = np.repeat(texture.astype(np.uint8), 3, -1)
    np.testing.assert_allclose(np.asarray(da.shades_of_gray_gains(grey)), 1.0, atol=1e-5)
    black = np.zeros((1, 8, 8, 3), np.uint8)
    assert np.isfinite(np.asarray(da.preprocess_eval(black, {"color_constancy": True}))).all()
    # Without colour constancy evaluation is the plain normalisation.
    np.testing.assert_allclose(
        np.asarray(da.preprocess_eval(cast, {"color_constancy": False})),
        image_ops.normalize(cast),
        atol=1e-5,
    )


def test_jit_vmap_and_batch_splits_agree():
    images = _images(4)
    ids = np.array([7, 3, 100, 5])
    config = ALL

    def fn(im, r, i):
        return da.augment_batch(im, r, config, example_ids=i)

    jfn = jax.jit(fn)
    jitted = np.asarray(jfn(images, RNG, ids))
    assert np.isfinite(jitted).all() and not np.allclose(jitted, image_ops.normalize(images))
    # One example at a time under vmap = the whole batch: each example depends only on its id.
    per_example = jax.jit(jax.vmap(lambda im, i: fn(im[None], RNG, i[None])[0]))(images, ids)
    np.testing.assert_allclose(np.asarray(per_example), jitted, atol=1e-4)
    # Splitting the batch (as over devices or processes) changes nothing.
    halves = np.concatenate([jfn(images[:2], RNG, ids[:2]), jfn(images[2:], RNG, ids[2:])])
    np.testing.assert_allclose(halves, jitted, atol=1e-4)
    # Eagerly (op by op, a different XLA program per op) the numbers agree too.
    eager = np.asarray(da.augment_batch(images[:1], RNG, config, example_ids=ids[:1]))
    np.testing.assert_allclose(eager, jitted[:1], atol=1e-4)


def test_per_example_randomness():
    image = _images(1)
    batch = np.repeat(image, 4, 0)
    out = np.asarray(da.augment_batch(batch, RNG, ALL, example_ids=np.array([0, 1, 2, 0])))
    for i in range(1, 3):
        assert not np.allclose(out[0], out[i], atol=1e-2)
    np.testing.assert_array_equal(out[0], out[3])  # same id, same augmentation
    split = np.asarray(da.augment_batch(batch, RNG, ALL))  # keys from split(rng, B)
    assert not np.allclose(split[0], split[1], atol=1e-2)
    other = np.asarray(da.augment_batch(batch, jax.random.PRNGKey(1), ALL))
    assert not np.allclose(split, other, atol=1e-2)
    keys = da.example_keys(RNG, 3, jnp.array([4, 5, 6]))
    np.testing.assert_array_equal(keys[1], jax.random.fold_in(RNG, 5))
    np.testing.assert_array_equal(da.example_keys(RNG, 3), jax.random.split(RNG, 3))


def test_config_from_the_default_config():
    from isic_jax.configs import default

    config = da.DeviceAugmentConfig.from_config(default.get_config().data.augment)
    assert config.rotation == (-30.0, 30.0) and config.brightness == 0.2 and config.hue == 0.02
    assert config.dihedral
    assert not config.color_constancy and config.fill == "reflect"
    assert da.DeviceAugmentConfig.from_config({"rotation": (90, 90)}).rotation == (90.0, 90.0)
    assert da.DeviceAugmentConfig.from_config(config) is config
    hash(config)  # usable as a static jit argument
    with pytest.raises(ValueError, match="fill"):
        da.DeviceAugmentConfig(fill="black")
    with pytest.raises(ValueError, match="min > max"):
        da.DeviceAugmentConfig(rotation=(10.0, -10.0))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        da.augment_batch(np.zeros((8, 8, 3), np.uint8), RNG, config)
