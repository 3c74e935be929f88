"""Losses against hand computation and optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from isic_jax.training.losses import (
    class_weights_for_config,
    class_weights_from_counts,
    compute_loss,
    softmax_focal_loss,
)


def _config(name="cross_entropy", label_smoothing=0.0, focal_gamma=2.0, class_weights="none"):
    return ml_collections.ConfigDict(
        dict(
            name=name,
            label_smoothing=label_smoothing,
            focal_gamma=focal_gamma,
            class_weights=class_weights,
        )
    )


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 3)).astype(np.float32) * 2
    labels = np.array([0, 1, 2, 1, 0, 0], np.int32)
    mask = np.array([1, 1, 1, 1, 0, 1], np.float32)  # one padded example
    return logits, labels, mask


def test_cross_entropy_matches_hand_computation(batch):
    logits, labels, mask = batch
    per_example = -_log_softmax(logits)[np.arange(6), labels]
    expected = (per_example * mask).sum() / mask.sum()
    got = compute_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask), _config())
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Same as optax's integer-label cross-entropy.
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    np.testing.assert_allclose(got, (ref * mask).sum() / mask.sum(), rtol=1e-5)


def test_padding_is_ignored(batch):
    logits, labels, mask = batch
    changed = logits.copy()
    changed[4] = [100.0, -100.0, 50.0]  # the padded row
    a = compute_loss(logits, labels, mask, _config())
    b = compute_loss(changed, labels, mask, _config())
    np.testing.assert_allclose(a, b, rtol=1e-6)
    # Whatever label padding carries (here -1) does not leak in either.
    odd_labels = labels.copy()
    odd_labels[4] = -1
    cw = np.array([1.0, 2.0, 3.0], np.float32)
    np.testing.assert_allclose(
        compute_loss(changed, odd_labels, mask, _config("focal", label_smoothing=0.1), cw),
        compute_loss(logits, labels, mask, _config("focal", label_smoothing=0.1), cw),
        rtol=1e-6,
    )
    # A boolean mask works too; an all-padding batch gives 0, not NaN.
    np.testing.assert_allclose(compute_loss(logits, labels, mask.astype(bool), _config()), a)
    assert float(compute_loss(logits, labels, np.zeros(6, np.float32), _config())) == 0.0


def test_label_smoothing(batch):
    logits, labels, mask = batch
    alpha = 0.1
    targets = np.eye(3)[labels] * (1 - alpha) + alpha / 3
    per_example = -(targets * _log_softmax(logits)).sum(-1)
    expected = (per_example * mask).sum() / mask.sum()
    got = compute_loss(logits, labels, mask, _config(label_smoothing=alpha))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_class_weights_from_counts():
    counts = np.array([90, 10, 0])
    w = class_weights_from_counts(counts)
    # w_c = N / (K n_c) with K = 2 present classes; absent class -> 1.
    np.testing.assert_allclose(w, [100 / 180, 100 / 20, 1.0], rtol=1e-6)
    assert w.dtype == np.float32
    # Mean weight over the examples is 1.
    np.testing.assert_allclose((counts * w).sum() / counts.sum(), 1.0, rtol=1e-6)
    with pytest.raises(ValueError):
        class_weights_from_counts([0, 0])
    assert class_weights_for_config(_config(), counts) is None
    np.testing.assert_array_equal(
        class_weights_for_config(_config(class_weights="balanced"), counts), w
    )
    with pytest.raises(ValueError, match=r"config\.loss\.class_weights"):
        class_weights_for_config(_config(class_weights="inverse"), counts)


def test_class_weighted_mean(batch):
    logits, labels, mask = batch
    cw = np.array([0.5, 2.0, 4.0], np.float32)
    per_example = -_log_softmax(logits)[np.arange(6), labels]
    a = mask * cw[labels]
    expected = (a * per_example).sum() / a.sum()
    got = compute_loss(logits, labels, mask, _config(), class_weights=cw)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert not np.isclose(got, compute_loss(logits, labels, mask, _config()))


def test_focal_gamma_zero_equals_cross_entropy(batch):
    logits, labels, mask = batch
    for smoothing in (0.0, 0.1):
        ce = compute_loss(logits, labels, mask, _config(label_smoothing=smoothing))
        focal = compute_loss(
            logits, labels, mask, _config("focal", label_smoothing=smoothing, focal_gamma=0.0)
        )
        np.testing.assert_allclose(focal, ce, rtol=1e-6)


def test_focal_matches_hand_computation(batch):
    logits, labels, mask = batch
    gamma = 2.0
    log_p = _log_softmax(logits)[np.arange(6), labels]
    per_example = -((1 - np.exp(log_p)) ** gamma) * log_p
    expected = (per_example * mask).sum() / mask.sum()
    got = compute_loss(logits, labels, mask, _config("focal", focal_gamma=gamma))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Focal down-weights easy examples: below cross-entropy.
    assert got < compute_loss(logits, labels, mask, _config())


def test_focal_gradient_finite_when_confident():
    # p_y rounds to 1: (1 - p)**gamma with gamma < 1 must not give inf/NaN gradients.
    logits = jnp.array([[60.0, -60.0], [0.0, 0.0]])
    labels = jnp.array([0, 1])
    for gamma in (0.0, 0.5, 2.0):
        grad = jax.grad(
            lambda z, g=gamma: softmax_focal_loss(z, jax.nn.one_hot(labels, 2), g).sum()
        )(logits)
        assert np.isfinite(np.asarray(grad)).all(), gamma


def test_unknown_loss_raises(batch):
    logits, labels, mask = batch
    with pytest.raises(ValueError, match=r"config\.loss\.name.*focal"):
        compute_loss(logits, labels, mask, _config("hinge"))


@pytest.mark.parametrize("name", ["cross_entropy", "focal"])
def test_axis_name_makes_split_batch_exact(batch, name):
    # Devices with different valid counts and class mixes: with axis_name, the mean over
    # devices of the per-device losses (and their gradients) equals the global loss.
    logits, labels, mask = batch
    mask = np.array([1, 1, 1, 0, 0, 1], np.float32)
    cw = np.array([0.5, 2.0, 4.0], np.float32)
    cfg = _config(name, label_smoothing=0.1)

    def global_loss(z):
        return compute_loss(z, labels, mask, cfg, class_weights=cw)

    def device_loss(z, y, m):
        return compute_loss(z, y, m, cfg, class_weights=cw, axis_name="d")

    split = lambda a: a.reshape(2, 3, *a.shape[1:])
    per_device = jax.vmap(device_loss, axis_name="d")(split(logits), split(labels), split(mask))
    np.testing.assert_allclose(per_device.mean(), global_loss(logits), rtol=1e-6)
    grads = jax.vmap(jax.grad(device_loss), axis_name="d")(
        split(logits), split(labels), split(mask)
    )
    # dL_d/dz_i = n_devices * dL/dz_i for z_i on device d, so the pmean over devices of
    # parameter gradients (a sum of such terms / n_devices) is the global gradient.
    np.testing.assert_allclose(
        grads.reshape(6, 3) / 2,
        jax.grad(global_loss)(jnp.asarray(logits)),
        rtol=1e-5,
        atol=1e-7,
    )
    # Without axis_name the naive per-device mean differs here (the test is not vacuous).
    naive = jax.vmap(lambda z, y, m: compute_loss(z, y, m, cfg, class_weights=cw))(
        split(logits), split(labels), split(mask)
    )
    assert not np.isclose(naive.mean(), global_loss(logits), rtol=1e-3)
