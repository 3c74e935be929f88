"""Mixup / CutMix: pairs by stream position, soft targets through every loss, and the same
results on 1 or 4 devices (pmap with local or gathered partners, jit over a Mesh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_helpers import REPO, cache_env, compile_cache, run_worker  # noqa: F401

from isic_jax.data import device_augment as da
from isic_jax.data import mixing
from isic_jax.training.losses import compute_loss

RNG = jax.random.PRNGKey(3)
MIXUP = {"mixup_p": 1.0, "mixup_alpha": 0.4}
CUTMIX = {"cutmix_p": 1.0, "cutmix_alpha": 1.0}
BOTH = {"mixup_p": 0.5, "mixup_alpha": 0.4, "cutmix_p": 0.5, "cutmix_alpha": 1.0}


def _batch(n: int = 8, size: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 1, (n, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, 3, n).astype(np.int32)
    return images, labels, np.arange(40, 40 + n, dtype=np.uint32)


def test_pairs_are_positions_2k_and_2k_plus_1_in_any_order() -> None:
    images, labels, positions = _batch()
    order = np.array([5, 2, 7, 0, 3, 6, 1, 4])
    p_images, p_labels, pair_ids = mixing.find_partners(images[order], labels[order],
                                                        positions[order])
    partner_pos = positions[order] ^ 1
    expected = [int(np.flatnonzero(positions == q)[0]) for q in partner_pos]
    np.testing.assert_array_equal(np.asarray(p_images), images[expected])
    np.testing.assert_array_equal(np.asarray(p_labels), labels[expected])
    np.testing.assert_array_equal(np.asarray(pair_ids), positions[order] >> 1)
    # A partner outside the batch: the example stays its own partner (unmixed).
    lone, _, _ = mixing.find_partners(images[:3], labels[:3], positions[:3])
    np.testing.assert_array_equal(np.asarray(lone)[2], images[2])


def test_mixup_blends_both_members_with_one_lambda() -> None:
    images, labels, positions = _batch()
    out, (partner, lam) = mixing.mix_batch(images, labels, RNG, MIXUP, positions=positions)
    out, partner, lam = np.asarray(out), np.asarray(partner), np.asarray(lam)
    for a in range(0, 8, 2):
        b = a + 1
        assert lam[a] == lam[b] and 0 < lam[a] < 1
        np.testing.assert_allclose(out[a], lam[a] * images[a] + (1 - lam[a]) * images[b],
                                   atol=1e-6)
        np.testing.assert_allclose(out[b], lam[a] * images[b] + (1 - lam[a]) * images[a],
                                   atol=1e-6)
        assert partner[a] == labels[b] and partner[b] == labels[a]
    assert np.ptp(lam[::2]) > 0  # a lambda per pair


def test_cutmix_swaps_one_box_and_lambda_is_its_true_area() -> None:
    images, labels, positions = _batch(size=16)
    out, (_, lam) = mixing.mix_batch(images, labels, RNG, CUTMIX, positions=positions)
    out, lam = np.asarray(out), np.asarray(lam)
    for a in range(0, 8, 2):
        b = a + 1
        from_b = np.all(out[a] == images[b], axis=-1) & ~np.all(images[a] == images[b], -1)
        kept = np.all(out[a] == images[a], axis=-1)
        assert (from_b | kept).all()
        assert lam[a] == lam[b] == pytest.approx(1 - from_b.mean(), abs=1e-6)
        np.testing.assert_array_equal(np.all(out[b] == images[a], -1), from_b)  # same box
        if from_b.any():  # the box is one rectangle
            rows, cols = np.flatnonzero(from_b.any(1)), np.flatnonzero(from_b.any(0))
            assert from_b[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
    assert (lam < 1).any()


def test_off_is_the_identity_and_both_share_the_pairs() -> None:
    images, labels, positions = _batch()
    out, (partner, lam) = mixing.mix_batch(images, labels, RNG, {}, positions=positions)
    np.testing.assert_array_equal(np.asarray(out), images)
    np.testing.assert_array_equal(np.asarray(lam), 1.0)
    images, labels, positions = _batch(64)
    cfg = da.DeviceAugmentConfig.from_config(BOTH)
    d = mixing.pair_draws(jax.random.fold_in(RNG, mixing.MIX_STREAM), jnp.asarray(positions >> 1),
                          cfg, (12, 12))
    cut, mix = np.asarray(d["cutmix"]), np.asarray(d["mixup"])
    assert not (cut & mix).any() and cut.any() and mix.any()
    np.testing.assert_array_equal(cut[::2], cut[1::2])


def test_mixing_does_not_depend_on_the_batch_split() -> None:
    images, labels, positions = _batch()
    fn = jax.jit(lambda im, lb, pos: mixing.mix_batch(im, lb, RNG, BOTH, positions=pos))
    whole, (pw, lw) = fn(images, labels, positions)
    parts = [fn(images[s], labels[s], positions[s]) for s in (slice(0, 4), slice(4, 8))]
    np.testing.assert_allclose(np.concatenate([p[0] for p in parts]), whole, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate([p[1][1] for p in parts]), lw)


# ------------------------------------------------------------------------------ losses


def _loss(logits, labels, name="cross_entropy", smoothing=0.0, weights=None, mix=None):
    config = SimpleNamespace(name=name, label_smoothing=smoothing, focal_gamma=2.0)
    return float(compute_loss(logits, labels, jnp.ones(len(labels)), config, weights, mix=mix))


@pytest.mark.parametrize("name", ["cross_entropy", "focal"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("class_weights", [None, np.array([0.5, 1.0, 3.0], np.float32)])
def test_soft_targets_reduce_to_the_hard_label_loss(name, smoothing, class_weights) -> None:
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(0, 2, (6, 3)), jnp.float32)
    labels = jnp.asarray([0, 1, 2, 2, 1, 0], jnp.int32)
    partner = jnp.asarray([1, 0, 0, 1, 2, 2], jnp.int32)
    hard = _loss(logits, labels, name, smoothing, class_weights)
    assert _loss(logits, labels, name, smoothing, class_weights,
                 mix=(partner, jnp.ones(6))) == pytest.approx(hard, rel=1e-6)
    assert _loss(logits, labels, name, smoothing, class_weights,
                 mix=(partner, jnp.zeros(6))) == pytest.approx(
        _loss(logits, partner, name, smoothing, class_weights), rel=1e-6)
    # In between: the soft target and the mixed class weight, by hand.
    lam = jnp.asarray([0.3, 0.7, 0.5, 0.9, 0.1, 0.6])
    t = lambda y: optax.smooth_labels(jax.nn.one_hot(y, 3), smoothing)  # noqa: E731
    target = lam[:, None] * t(labels) + (1 - lam[:, None]) * t(partner)
    log_p = jax.nn.log_softmax(logits)
    mod = (1 - jnp.exp(log_p)) ** 2.0 if name == "focal" else 1.0
    per = -jnp.sum(target * mod * log_p, -1)
    w = (jnp.ones(6) if class_weights is None
         else lam * class_weights[labels] + (1 - lam) * class_weights[partner])
    expected = float(jnp.sum(w * per) / jnp.sum(w))
    assert _loss(logits, labels, name, smoothing, class_weights,
                 mix=(partner, lam)) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------ devices


def _run_devices_worker(devices: int = 4) -> dict:
    env = cache_env(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, __file__, "worker"], env=env, cwd=str(REPO),
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def worker() -> dict:
    """augment_batch + mix_batch of one global batch: 1 device vs pmap (local and gathered
    partners) vs jit over 4 devices; max abs differences."""
    from isic_jax.training import parallel

    rs = np.random.RandomState(0)
    n, size = 16, 24
    batch = {"image": rs.randint(0, 256, (n, size, size, 3)).astype(np.uint8),
             "label": rs.randint(0, 3, n).astype(np.int32),
             "position": np.arange(32, 32 + n, dtype=np.uint32)}
    config = da.DeviceAugmentConfig.from_config({
        **BOTH, "mixup_p": 0.3, "cutmix_p": 0.4, "rotation": 20.0, "affine_p": 0.5,
        "affine_scale": 0.1, "elastic_p": 0.5, "elastic_magnitude": 0.05, "blur_p": 0.5,
        "blur_sigma": 1.0, "noise_p": 0.5, "noise_std": 0.05, "cutout_p": 0.5, "gamma_p": 0.5,
        "gamma": 0.3})
    rng = jax.random.PRNGKey(7)

    def step(b, r, axis_name=None, lookup="auto"):
        aug = jax.random.fold_in(r, da.AUGMENT_STREAM)
        images = da.augment_batch(b["image"], aug, config, example_ids=b["position"])
        out, (partner, lam) = mixing.mix_batch(images, b["label"], r, config,
                                               positions=b["position"], axis_name=axis_name,
                                               lookup=lookup)
        return out, partner, lam

    ref = [np.asarray(x) for x in jax.jit(step)(batch, rng)]
    report = {"devices": len(jax.devices()), "mixed": float(np.mean(ref[2] < 1))}
    for name, mode, lookup in [("pmap_local", "pmap", "local"),
                               ("pmap_gather", "pmap", "gather"), ("jit", "jit", "auto")]:
        par = parallel.DataParallel.create(mode, jax.devices())
        if mode == "pmap":
            fn = jax.pmap(lambda b, r, lookup=lookup: step(b, r, parallel.PMAP_AXIS, lookup),
                          axis_name=parallel.PMAP_AXIS)
        else:
            fn = jax.jit(step, in_shardings=(par.batch_sharding, par.replicated))
        outs = fn(par.shard_batch(batch), par.replicate(rng))
        got = [np.asarray(x).reshape(r.shape) for x, r in zip(outs, ref, strict=True)]
        report[name] = max(float(np.max(np.abs(g.astype(np.float64) - r)))
                           for g, r in zip(got, ref, strict=True))
    return report


@pytest.mark.slow
@pytest.mark.usefixtures("compile_cache")
def test_mixing_and_new_ops_are_the_same_on_1_and_4_devices() -> None:
    report = _run_devices_worker()
    assert report["devices"] == 4 and 0.3 < report["mixed"] < 1
    for name in ("pmap_local", "pmap_gather", "jit"):
        assert report[name] < 1e-4, report


@pytest.mark.slow
@pytest.mark.usefixtures("compile_cache")
def test_training_with_mixing_and_new_ops_matches_across_layouts() -> None:
    # 3 SGD steps: one device vs pmap vs jit over 4, with every new op and pair mixing on.
    overrides = {f"data.augment.{k}": v for k, v in {
        **BOTH, "affine_p": 0.5, "elastic_p": 0.5, "blur_p": 0.5, "noise_p": 0.5,
        "cutout_p": 0.5, "gamma_p": 0.5}.items()}
    report = run_worker("equivalence", {"steps": 3, "overrides": overrides})
    for mode in ("pmap", "jit"):
        assert report[mode]["params"] < 1e-5, report
        assert report[mode]["batch_stats"] < 1e-4, report
        assert report[mode]["loss"] < 1e-5, report


if __name__ == "__main__":
    print(json.dumps(globals()[sys.argv[1]]()))
