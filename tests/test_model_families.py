"""EfficientNet, ConvNeXt and ViT without torch: parameter counts against timm's published
numbers, parts, bfloat16, stochastic depth, Grad-CAM layers, TF padding, position embeddings,
the registry's names. (Against the real timm modules: tests/test_timm_families.py.)"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from isic_jax.models import (
    HEAD,
    count_params,
    create_model,
    family_of,
    init_variables,
    layers,
    model_names,
    part_of,
    registry,
    vit,
)

TEST_MODELS = ("efficientnet_test", "convnext_test", "vit_test")
SIZE = 32


def _config(name: str, **kwargs) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"name": name, "dtype": "float32", "dropout": 0.0, **kwargs})


def _shapes(name: str, size: int = 64, num_classes: int = 1000):
    model = create_model(_config(name), num_classes)
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return model, jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


@pytest.mark.parametrize("name, size, expected", [
    # timm 1.0's counts with a 1000-class head (`sum(p.numel() for p in model.parameters())`).
    ("efficientnet_b0", 64, 5_288_548),
    ("tf_efficientnet_b0", 64, 5_288_548),
    ("efficientnet_b3", 64, 12_233_232),
    ("convnext_tiny", 64, 28_589_128),
    ("vit_tiny_patch16_224", 224, 5_717_416),
    ("vit_small_patch16_224", 224, 22_050_664),
    ("vit_small_patch16_384", 384, 22_196_584),
])
def test_parameter_counts_equal_timm(name, size, expected) -> None:
    _, variables = _shapes(name, size)
    assert count_params(variables["params"]) == expected


@pytest.mark.parametrize("name", ["efficientnet_b0", "convnext_tiny", "vit_tiny_patch16_224"])
def test_every_module_belongs_to_a_listed_part(name) -> None:
    model, variables = _shapes(name)
    parts = model.parts()
    assert parts[0] == "stem" and parts[-1] == "final"
    modules = {part_of(top) for top in variables["params"]}
    assert modules <= {*parts, HEAD}, modules - {*parts, HEAD}
    assert modules == {*parts, HEAD}  # every part holds parameters
    batch_stats = variables.get("batch_stats", {})
    assert bool(batch_stats) == family_of(name).batch_norm
    assert {part_of(top) for top in batch_stats} <= set(parts)
    if name.startswith("vit"):
        assert parts == ("stem", *(f"block{i}" for i in range(1, 13)), "final")


def test_registry_names_families_and_suggests() -> None:
    names = model_names()
    for name in ["efficientnet_b0", "efficientnet_b7", "tf_efficientnet_b0", "tf_efficientnet_b7",
                 "convnext_tiny", "convnext_small", "convnext_base", "vit_tiny_patch16_224",
                 "vit_small_patch16_384", "vit_base_patch16_224", "resnet50"]:
        assert name in names
    assert family_of("tf_efficientnet_b3").name == "efficientnet"
    message = registry.check_name("convnext_tiney")
    assert "did you mean 'convnext_tiny'?" in message
    for listed in ("efficientnet: efficientnet_b0", "convnext: convnext_tiny",
                   "resnet: resnet18", "vit: vit_tiny_patch16_224"):
        assert listed in message
    with pytest.raises(ValueError, match=r"did you mean 'efficientnet_b3'"):
        family_of("efficientnet-b3")


@functools.cache
def _variables(name: str):
    model = create_model(_config(name), 3)
    return init_variables(model, jax.random.key(0), SIZE)


@functools.cache
def _forward(name: str, train: bool, drop_path: float = 0.0, dtype: str = "float32"):
    model = create_model(_config(name, drop_path=drop_path, dtype=dtype), 3)

    def run(variables, x, key):
        out = model.apply(variables, x, train=train, rngs={"dropout": key},
                          mutable=["batch_stats"] if train else False,
                          capture_intermediates=True)
        logits, state = out
        return logits, state["intermediates"]

    return jax.jit(run)


@pytest.mark.slow
@pytest.mark.parametrize("name", TEST_MODELS)
def test_bfloat16_compute_float32_parameters_and_logits(name) -> None:
    variables = _variables(name)
    for leaf in jax.tree.leaves(variables):
        assert leaf.dtype == jnp.float32
    x = jax.random.normal(jax.random.key(1), (2, SIZE, SIZE, 3))
    logits, inter = _forward(name, True, 0.0, "bfloat16")(variables, x, jax.random.key(2))
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    stem = next(v for k, v in inter.items() if k.startswith("stem"))
    assert jax.tree.leaves(stem)[0].dtype == jnp.bfloat16  # the backbone computes in bfloat16
    f32, _ = _forward(name, False)(variables, x, jax.random.key(2))
    b16, _ = _forward(name, False, 0.0, "bfloat16")(variables, x, jax.random.key(2))
    np.testing.assert_allclose(np.asarray(b16), np.asarray(f32), atol=0.1 * float(
        np.max(np.abs(np.asarray(f32)))) + 0.05)


@pytest.mark.slow
@pytest.mark.parametrize("name", TEST_MODELS)
def test_drop_path_only_in_training(name) -> None:
    # ConvNeXt's layer scale starts at 1e-6, which would hide its residual branches.
    variables = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.ones_like(v) if path[-1].key == "gamma" else v, _variables(name))
    x = jax.random.normal(jax.random.key(1), (4, SIZE, SIZE, 3))
    k1, k2 = jax.random.key(3), jax.random.key(4)

    def logits(train, rate, key):
        return np.asarray(_forward(name, train, rate)(variables, x, key)[0])

    # Training with drop path: the output depends on the key; without it, it does not.
    assert not np.allclose(logits(True, 0.5, k1), logits(True, 0.5, k2))
    np.testing.assert_array_equal(logits(True, 0.0, k1), logits(True, 0.0, k2))
    # Evaluation: drop path is the identity.
    np.testing.assert_array_equal(logits(False, 0.5, k1), logits(False, 0.0, k2))


def test_drop_path_rates_follow_timm() -> None:
    # ConvNeXt/ViT: torch.linspace(0, rate, n); EfficientNet's builder: rate * i / n.
    np.testing.assert_allclose(layers.drop_path_rates(0.2, 5), [0.0, 0.05, 0.1, 0.15, 0.2])
    np.testing.assert_allclose(layers.drop_path_rates(0.2, 4, inclusive=False),
                               [0.0, 0.05, 0.1, 0.15])
    assert layers.drop_path_rates(0.0, 3) == (0.0, 0.0, 0.0)


def test_tf_same_padding_is_asymmetric_at_stride_2() -> None:
    # TensorFlow's SAME: total (ceil(n / s) - 1) * s + k - n, the odd pixel at the end.
    assert layers.tf_same_padding((72, 67), 3, 2) == [(0, 1), (1, 1)]
    assert layers.tf_same_padding((18, 18), 5, 2) == [(1, 2), (1, 2)]
    assert layers.tf_same_padding((9, 9), 3, 1) == [(1, 1), (1, 1)]
    assert layers.symmetric_padding(5, 2) == [(2, 2), (2, 2)]


@pytest.mark.parametrize("name", TEST_MODELS)
def test_grad_cam_layer_is_a_spatial_map(name) -> None:
    from isic_jax.evaluation import gradcam

    model = create_model(_config(name), 3)
    variables = _variables(name)
    layer = model.cam_layer(variables["params"])
    x = jax.random.normal(jax.random.key(5), (2, SIZE, SIZE, 3))
    _, inter = jax.eval_shape(lambda v, x: model.apply(
        v, x, train=False, capture_intermediates=lambda m, _: m.name == layer), variables, x)
    (feature,) = inter["intermediates"][layer]["__call__"]
    assert len(feature.shape) == 4 and feature.shape[0] == 2  # [B, h, w, C]
    heat = gradcam.grad_cam(model, variables, x, class_index=1)
    assert heat.shape == (2, SIZE, SIZE) and np.isfinite(heat).all()
    assert heat.max() > 0  # the gradient reaches the layer (not an all-zero map)


def test_vit_position_embedding_follows_the_input_size() -> None:
    for size, grid in ((32, 2), (48, 3)):
        model = create_model(_config("vit_test"), 2)
        params = init_variables(model, jax.random.key(0), size)["params"]
        assert params["stem_embed"]["pos_embed"].shape == (1, 1 + grid * grid, 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        init_variables(create_model(_config("vit_test"), 2), jax.random.key(0), 40)
    # Resampling to the same grid changes nothing; the class token's entry is kept.
    pos = np.random.default_rng(0).normal(size=(1, 1 + 9, 8)).astype(np.float32)
    np.testing.assert_allclose(vit.resample_pos_embed(pos, (3, 3)), pos, atol=1e-6)
    out = vit.resample_pos_embed(pos, (5, 5))
    assert out.shape == (1, 26, 8)
    np.testing.assert_array_equal(out[:, 0], pos[:, 0])
    assert vit.resize("pos_embed", pos, (1, 26, 8)).shape == (1, 26, 8)
    assert vit.resize("cls_token", pos, (1, 26, 8)) is None


def test_vit_tokens_get_no_weight_decay_and_layer_decay_runs_over_blocks() -> None:
    import optax

    from isic_jax.training.optim import create_optimizer, weight_decay_mask

    model = create_model(_config("vit_test"), 2)
    params = _variables("vit_test")["params"]
    mask = weight_decay_mask(params)
    assert not mask["stem_embed"]["pos_embed"] and not mask["stem_embed"]["cls_token"]
    assert mask["stem_embed"]["proj"]["kernel"] and mask["block1"]["attn"]["qkv"]["kernel"]
    assert not mask["block1"]["norm1"]["scale"]
    optim = ml_collections.ConfigDict(dict(name="sgd", learning_rate=1.0, momentum=0.0,
                                           weight_decay=0.0, warmup_epochs=0.0,
                                           end_lr_factor=1.0, grad_clip_norm=0.0))
    finetune = ml_collections.ConfigDict(dict(layer_decay=0.5))
    tx, _ = create_optimizer(optim, 10, 10, finetune, parts=model.parts())
    ones = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(ones, tx.init(params), params)
    step = {name: float(-np.asarray(jax.tree.leaves(sub)[0]).flat[0])
            for name, sub in optax.tree_utils.tree_cast(updates, jnp.float32).items()}
    # head 1, final 0.5, block2 0.25, block1 0.125, stem 0.0625 (parts: stem, block1, block2,
    # final).
    assert step == pytest.approx({"head": 1.0, "final_norm": 0.5, "block2": 0.25,
                                  "block1": 0.125, "stem_embed": 0.0625})
