"""Optimiser: schedule, weight-decay mask, accumulation, clipping, EMA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from isic_jax.models import create_model
from isic_jax.training.optim import create_optimizer, ema_update, weight_decay_mask


def _config(**overrides):
    cfg = dict(
        name="sgd",
        learning_rate=0.1,
        momentum=0.9,
        weight_decay=0.0,
        warmup_epochs=2.0,
        end_lr_factor=0.01,
        grad_clip_norm=0.0,
        accumulation_steps=1,
        ema_decay=0.0,
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def test_schedule_warmup_then_cosine():
    _, schedule = create_optimizer(_config(), total_steps=100, steps_per_epoch=10)
    np.testing.assert_allclose(schedule(0), 0.0, atol=1e-9)
    np.testing.assert_allclose(schedule(10), 0.05, rtol=1e-6)  # linear warmup
    np.testing.assert_allclose(schedule(20), 0.1, rtol=1e-6)  # end of warmup: peak
    # cosine half-way through the decay: (peak + end) / 2
    np.testing.assert_allclose(schedule(60), (0.1 + 0.001) / 2, rtol=1e-5)
    np.testing.assert_allclose(schedule(100), 0.001, rtol=1e-5)  # end: lr * end_lr_factor
    np.testing.assert_allclose(schedule(150), 0.001, rtol=1e-5)


def test_schedule_without_warmup_and_short_runs():
    _, schedule = create_optimizer(_config(warmup_epochs=0.0), total_steps=6, steps_per_epoch=3)
    np.testing.assert_allclose(schedule(0), 0.1, rtol=1e-6)
    # Warmup longer than the run is capped: still ends at the end value.
    _, schedule = create_optimizer(_config(warmup_epochs=5.0), total_steps=4, steps_per_epoch=3)
    np.testing.assert_allclose(schedule(3), 0.1, rtol=1e-6)
    np.testing.assert_allclose(schedule(4), 0.001, rtol=1e-5)


def test_unknown_optimizer_raises():
    with pytest.raises(ValueError, match=r"config\.optim\.name.*adamw"):
        create_optimizer(_config(name="lamb"), total_steps=10, steps_per_epoch=5)


@pytest.fixture(scope="module")
def tiny_params():
    model = create_model(
        ml_collections.ConfigDict(dict(name="resnet_tiny", width=8, dropout=0.0, dtype="float32")),
        num_classes=2,
    )
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    # Deterministic non-zero values, no init compile needed.
    return jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype), shapes["params"])


def _paths(tree, keep):
    return {
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        if keep(leaf)
    }


def test_weight_decay_mask_selects_conv_and_dense_kernels(tiny_params):
    mask = weight_decay_mask(tiny_params)
    decayed = _paths(mask, lambda m: m)
    kernels = _paths(tiny_params, lambda p: True)
    kernels = {p for p in kernels if p.endswith("['kernel']")}
    assert decayed == kernels
    assert "['head']['kernel']" in decayed and "['stem_conv']['kernel']" in decayed
    assert "['stage2_block1']['proj_conv']['kernel']" in decayed
    assert not any("bias" in p or "scale" in p for p in decayed)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_weight_decay_skips_batchnorm_and_biases(tiny_params, name):
    # Zero gradients: the only update is weight decay, so it must touch kernels only.
    tx, _ = create_optimizer(
        _config(name=name, weight_decay=0.1, warmup_epochs=0.0),
        total_steps=10,
        steps_per_epoch=5,
    )
    zeros = jax.tree.map(jnp.zeros_like, tiny_params)
    updates, _ = tx.update(zeros, tx.init(tiny_params), tiny_params)
    moved = _paths(updates, lambda u: bool(jnp.any(u != 0)))
    assert moved == _paths(weight_decay_mask(tiny_params), lambda m: m)


def _linear_problem():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)
    params = {"dense": {"kernel": jnp.ones((5, 2)) * 0.1, "bias": jnp.zeros(2)}}

    def loss(p, xb, yb):
        pred = xb @ p["dense"]["kernel"] + p["dense"]["bias"]
        return jnp.mean((pred - yb) ** 2)

    return x, y, params, loss


def test_accumulation_equals_one_step_on_concatenated_batch():
    x, y, params, loss = _linear_problem()
    k, updates = 4, 2
    common = dict(weight_decay=0.01, warmup_epochs=0.0, grad_clip_norm=0.0)
    tx_big, _ = create_optimizer(_config(**common), total_steps=updates, steps_per_epoch=1)
    tx_acc, _ = create_optimizer(
        _config(accumulation_steps=k, **common), total_steps=updates, steps_per_epoch=1
    )

    big, big_state = params, tx_big.init(params)
    acc, acc_state = params, tx_acc.init(params)
    for _ in range(updates):  # two updates: momentum and the schedule carry over correctly
        g = jax.grad(loss)(big, x, y)
        u, big_state = tx_big.update(g, big_state, big)
        big = optax.apply_updates(big, u)
        for xb, yb in zip(jnp.split(x, k), jnp.split(y, k), strict=True):
            g = jax.grad(loss)(acc, xb, yb)
            u, acc_state = tx_acc.update(g, acc_state, acc)
            acc = optax.apply_updates(acc, u)
    assert not np.allclose(big["dense"]["kernel"], params["dense"]["kernel"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), acc, big)


def test_accumulation_holds_params_between_updates():
    x, y, params, loss = _linear_problem()
    tx, _ = create_optimizer(
        _config(accumulation_steps=3, warmup_epochs=0.0), total_steps=5, steps_per_epoch=1
    )
    state = tx.init(params)
    u, state = tx.update(jax.grad(loss)(params, x, y), state, params)
    assert all(np.all(np.asarray(leaf) == 0) for leaf in jax.tree.leaves(u))


@pytest.mark.parametrize("clip, expected_norm", [(1.0, 1.0), (0.0, 100.0)])
def test_clipping_bounds_the_update_norm(clip, expected_norm):
    # Constant lr 1, no momentum, no decay: the update is -(clipped gradient).
    tx, _ = create_optimizer(
        _config(
            learning_rate=1.0,
            momentum=0.0,
            warmup_epochs=0.0,
            end_lr_factor=1.0,
            grad_clip_norm=clip,
        ),
        total_steps=10,
        steps_per_epoch=5,
    )
    params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}
    grads = {"w": jnp.full((3, 4), 100.0 / np.sqrt(16)), "b": jnp.full(4, 100.0 / np.sqrt(16))}
    np.testing.assert_allclose(optax.tree.norm(grads), 100.0, rtol=1e-6)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(optax.tree.norm(updates), expected_norm, rtol=1e-5)


def test_ema_update():
    ema = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(4.0)}}
    new = {"a": jnp.array([3.0, 2.0]), "b": {"c": jnp.array(0.0)}}
    out = ema_update(ema, new, 0.9)
    np.testing.assert_allclose(out["a"], [1.2, 2.0], rtol=1e-6)
    np.testing.assert_allclose(out["b"]["c"], 3.6, rtol=1e-6)
    out = jax.jit(ema_update)(ema, new, jnp.float32(0.0))  # decay 0: the new params
    np.testing.assert_allclose(out["a"], new["a"])
