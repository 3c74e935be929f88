"""The parts of the pretraining that need no training run: BYOL's views, loss, target schedule,
networks and k-NN probe; the presets; the model card's initial weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isic_jax.pretraining import byol, probe, views


def _images(batch: int = 4, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), np.uint8)


def test_identity_views_give_the_normalised_image_back() -> None:
    config = views.ViewConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flips="none",
                              brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0,
                              jitter_prob=0.0, grayscale_prob=0.0, blur_prob=(0.0, 0.0),
                              solarize_prob=(0.0, 0.0))
    images = _images()
    v1, v2 = views.two_views(jnp.asarray(images), jax.random.key(0), config,
                             example_ids=jnp.arange(4, dtype=jnp.uint32))
    expected = (images / 255.0 - np.asarray(config.mean)) / np.asarray(config.std)
    np.testing.assert_allclose(np.asarray(v1), expected, atol=2e-4)
    np.testing.assert_allclose(np.asarray(v2), expected, atol=2e-4)


def test_views_depend_on_the_position_not_on_the_batch() -> None:
    config = views.ViewConfig()
    images = _images(batch=6)
    ids = jnp.arange(10, 16, dtype=jnp.uint32)
    v1, v2 = views.two_views(jnp.asarray(images), jax.random.key(3), config, example_ids=ids)
    assert v1.shape == v2.shape == (6, 32, 32, 3) and v1.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(v1))) and not np.allclose(v1, v2)
    # The last 3 examples alone (another batch, another device's share): the same views.
    w1, w2 = views.two_views(jnp.asarray(images[3:]), jax.random.key(3), config,
                             example_ids=ids[3:])
    np.testing.assert_allclose(np.asarray(w1), np.asarray(v1)[3:], atol=1e-5)
    np.testing.assert_allclose(np.asarray(w2), np.asarray(v2)[3:], atol=1e-5)


def test_dihedral_flips_keep_pixels_and_crop_boxes_stay_inside() -> None:
    image = _images(batch=1, size=16)[0]
    whole = (jnp.array([8.0]), jnp.array([8.0]), jnp.array([16.0]), jnp.array([16.0]))
    for u in np.linspace(0.01, 0.99, 8):
        flip = views._flip_matrices(jnp.array([u], jnp.float32), "dihedral")
        out = np.asarray(views.resized_crops(jnp.asarray(image[None]), whole, flip, 16))[0]
        k = min(int(u * 8), 7)
        expected = np.rot90(np.swapaxes(image, 0, 1) if k >= 4 else image, k % 4, axes=(0, 1))
        np.testing.assert_allclose(out, expected, atol=1e-3)
    u = jax.random.uniform(jax.random.key(0), (256, 4))
    cy, cx, h, w = (np.asarray(a) for a in views.crop_boxes(u, 40, (0.08, 1.0), (0.75, 4 / 3)))
    assert np.all(h <= 40) and np.all(w <= 40)
    assert np.all(cy - h / 2 >= -1e-4) and np.all(cy + h / 2 <= 40 + 1e-4)
    assert np.all(cx - w / 2 >= -1e-4) and np.all(cx + w / 2 <= 40 + 1e-4)


def test_blur_and_solarize() -> None:
    x = jnp.asarray(_images(batch=2, size=20).astype(np.float32))
    same = views.gaussian_blur(x, jnp.array([1.0, 1.0]), jnp.array([False, False]), 2)
    np.testing.assert_allclose(np.asarray(same), np.asarray(x), atol=1e-4)
    blurred = views.gaussian_blur(x, jnp.array([2.0, 2.0]), jnp.array([True, False]), 2)
    assert np.std(np.asarray(blurred[0])) < np.std(np.asarray(x[0]))
    np.testing.assert_allclose(np.asarray(blurred[1]), np.asarray(x[1]), atol=1e-4)
    sol = np.asarray(views.solarize(jnp.array([[[[10.0, 200.0, 128.0]]]]), jnp.array([True])))
    np.testing.assert_allclose(sol.reshape(-1), [10.0, 55.0, 127.0])


def test_loss_and_target_schedule() -> None:
    x = jnp.array([[1.0, 0.0], [1.0, 1.0]])
    y = jnp.array([[2.0, 0.0], [-1.0, -1.0]])
    np.testing.assert_allclose(np.asarray(byol.regression_loss(x, y)), [0.0, 4.0], atol=1e-6)
    taus = [float(byol.target_decay(jnp.asarray(k), 0.99, 100)) for k in (0, 50, 100, 150)]
    np.testing.assert_allclose(taus, [0.99, 0.995, 1.0, 1.0], atol=1e-6)


def test_backbone_names_are_the_classifiers() -> None:
    from isic_jax.configs import smoke

    from isic_jax.models import create_model, init_variables
    from isic_jax.training.optim import create_optimizer

    config = smoke.get_config()
    config.model.width = 4
    model = create_model(config.model, 2)
    nets = byol.Networks.create(model, projector_hidden=16, projection_dim=8, predictor_hidden=16)
    tx, _ = create_optimizer(config.optim, 10, 10)
    state = jax.eval_shape(lambda: byol.create_state(nets, tx, jax.random.key(0), 32))
    classifier = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), 32))
    assert set(state.params) == (set(classifier["params"]) - {"head"}) | {"projector",
                                                                          "predictor"}
    backbone = {k: v.shape for k, v in jax.tree_util.tree_flatten_with_path(
        byol.Networks.backbone_part(state.params))[0]}
    expected = {k: v.shape for k, v in jax.tree_util.tree_flatten_with_path(
        {k: v for k, v in classifier["params"].items() if k != "head"})[0]}
    assert backbone == expected
    assert set(state.target["params"]) == set(state.params) - {"predictor"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_test", "convnext_test", "vit_test"])
def test_every_family_pretrains(name: str) -> None:
    """BYOL on the other registered families: the backbone's parameters are the classifier's
    without its head, and one step trains them (ConvNeXt and ViT carry no BatchNorm)."""
    import functools

    from isic_jax.configs import smoke

    from isic_jax.models import create_model, init_variables
    from isic_jax.training.optim import create_optimizer

    config = smoke.get_config()
    config.model.name, config.model.dtype = name, "float32"
    model = create_model(config.model, 2)
    nets = byol.Networks.create(model, projector_hidden=16, projection_dim=8, predictor_hidden=16)
    tx, _ = create_optimizer(config.optim, 10, 10)
    state = byol.create_state(nets, tx, jax.random.key(0), 32)
    classifier = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), 32))
    assert set(state.params) == (set(classifier["params"]) - {"head"}) | {"projector",
                                                                          "predictor"}
    step = jax.jit(functools.partial(byol.train_step, nets=nets, tx=tx,
                                     views=views.ViewConfig(), total_updates=10))
    batch = {"image": jnp.asarray(_images(batch=4)), "position": jnp.arange(4, dtype=jnp.uint32)}
    new, metrics = step(state, batch, jax.random.key(1))
    assert np.isfinite(float(metrics["loss"]))
    before = jax.tree_util.tree_leaves(byol.Networks.backbone_part(state.params))
    after = jax.tree_util.tree_leaves(byol.Networks.backbone_part(new.params))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(before, after, strict=True))


@pytest.mark.slow
def test_a_bfloat16_step_trains_in_float32_parameters() -> None:
    import functools

    from isic_jax.configs import smoke

    from isic_jax.models import create_model
    from isic_jax.training.optim import create_optimizer

    config = smoke.get_config()
    config.model.width, config.model.dtype = 4, "bfloat16"
    nets = byol.Networks.create(create_model(config.model, 2), projector_hidden=16,
                                projection_dim=8, predictor_hidden=16)
    tx, _ = create_optimizer(config.optim, 10, 10)
    state = byol.create_state(nets, tx, jax.random.key(0), 32)
    step = jax.jit(functools.partial(byol.train_step, nets=nets, tx=tx,
                                     views=views.ViewConfig(), total_updates=10))
    batch = {"image": jnp.asarray(_images(batch=4)), "position": jnp.arange(4, dtype=jnp.uint32)}
    new, metrics = step(state, batch, jax.random.key(1))
    assert np.isfinite(float(metrics["loss"])) and 0.0 <= float(metrics["loss"]) <= 8.0
    kernel = new.params["stem_conv"]["kernel"]
    assert kernel.dtype == jnp.float32
    assert not np.array_equal(np.asarray(kernel), np.asarray(state.params["stem_conv"]["kernel"]))
    assert int(new.step) == 1 and float(metrics["target_decay"]) == pytest.approx(0.99)


def test_knn_probe_scores_neighbours() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = np.repeat([0, 1], 20)
    feats = centres[labels] + rng.normal(0, 0.1, (40, 3))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    bank = probe.Embedding(feats.astype(np.float32), labels.astype(np.int32))
    probs = probe.knn_probabilities(bank, feats[[0, 39]].astype(np.float32), 2, k=5)
    assert probs[0, 0] > 0.9 and probs[1, 1] > 0.9
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    metrics = probe.knn_metrics(bank, bank, class_names=["benign", "malignant"],
                                malignant_classes=[1], k=5)
    assert metrics["knn_auc"] == pytest.approx(1.0) and metrics["knn_bank"] == 40
    with pytest.raises(ValueError, match="memory bank is empty"):
        probe.knn_probabilities(probe.Embedding(np.zeros((0, 3), np.float32),
                                                np.zeros(0, np.int32)), feats, 2)


def test_pretrain_presets_validate_and_lars_builds() -> None:
    from isic_jax.configs import pretrain_byol, pretrain_cpu_sample

    from isic_jax import config_utils
    from isic_jax.config_utils import schema
    from isic_jax.training.optim import create_optimizer

    for module in (pretrain_byol, pretrain_cpu_sample):
        config = module.get_config()
        config_utils.validate_config(config)
    assert schema.section_keys("pretrain") == set(schema.SECTION_CHECKS["pretrain"])
    config = pretrain_byol.get_config()
    tx, _ = create_optimizer(config.optim, 100, 10)
    params = {"w": jnp.ones((3, 3)), "b": jnp.ones(3)}
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    assert all(np.all(np.isfinite(np.asarray(u))) for u in jax.tree.leaves(updates))


def test_model_card_names_a_pretraining_start() -> None:
    from isic_jax.inference.model_card import initial_weights

    assert initial_weights(None) is None
    text = initial_weights({"source": "runs/byol", "origin": "isic_jax-pretrain", "step": 180,
                            "head": "reinitialized",
                            "self_supervised": {"method": "byol", "release": "archive"}})
    assert text == ("runs/byol (isic_jax-pretrain, step 180): self-supervised BYOL pretraining "
                    "on archive without labels, its online backbone; head reinitialized")
