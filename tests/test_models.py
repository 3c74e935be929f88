"""ResNet family: parameter counts, dtypes, init, strides, train/eval behaviour, pmap BatchNorm."""

from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from isic_jax.models import count_params, create_model, init_variables, model_names


def _config(name: str = "resnet_tiny", width: int = 8, dropout: float = 0.0, dtype="float32"):
    return ml_collections.ConfigDict(dict(name=name, width=width, dropout=dropout, dtype=dtype))


def _abstract_variables(model, size: int = 32):
    """Variable shapes without allocating or running the init."""
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


@pytest.fixture(scope="module")
def tiny():
    """resnet_tiny (width 8, 3 classes) and its variables; other dtypes/dropout share them."""
    model = create_model(_config(), num_classes=3)
    return model, init_variables(model, jax.random.key(0), 32)


def _apply(model, variables, x, train, key=None, **kwargs):
    """Jitted apply (eager op-by-op dispatch is slower than compiling a tiny model)."""
    rngs = {"dropout": key} if key is not None else {}
    fn = jax.jit(lambda v, x, r: model.apply(v, x, train=train, rngs=r, **kwargs))
    return fn(variables, x, rngs)


@pytest.mark.parametrize("name, expected", [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_parameter_count_matches_reference(name, expected):
    # torchvision's counts for a 1000-class head (conv kernels, BN scale/bias, head kernel/bias).
    model = create_model(_config(name, width=64), num_classes=1000)
    variables = _abstract_variables(model)
    assert count_params(variables["params"]) == expected


def test_unknown_name_raises():
    with pytest.raises(ValueError, match=r"config\.model\.name.*resnet50"):
        create_model(_config("resnet51"), num_classes=2)
    with pytest.raises(ValueError, match=r"config\.model\.dtype"):
        create_model(_config(dtype="float16"), num_classes=2)


def test_registry_has_the_family():
    for name in ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200"]:
        assert name in model_names()
    assert "resnet_tiny" in model_names()


def test_init_variables_are_float32(tiny):
    _, variables = tiny
    assert set(variables) == {"params", "batch_stats"}
    for leaf in jax.tree.leaves(variables):
        assert leaf.dtype == jnp.float32
    # Parameters do not depend on the compute dtype.
    bf16 = _abstract_variables(create_model(_config(dtype="bfloat16"), num_classes=3))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), bf16) == jax.tree.map(
        lambda a: (a.shape, a.dtype), variables
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_output_shape_and_dtypes(tiny, dtype):
    _, variables = tiny
    model = create_model(_config(dtype=dtype), num_classes=3)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    logits, updates = _apply(model, variables, x, True, mutable=["batch_stats"])
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    for leaf in jax.tree.leaves(updates):
        assert leaf.dtype == jnp.float32
    eval_logits, inter = _apply(model, variables, x, False, capture_intermediates=True)
    assert eval_logits.shape == (2, 3) and eval_logits.dtype == jnp.float32
    # The convolutions really run in the compute dtype.
    assert inter["intermediates"]["stem_conv"]["__call__"][0].dtype == jnp.dtype(dtype)


def test_last_bn_scale_of_each_branch_is_zero(tiny):
    bottleneck = create_model(_config("resnet_tiny_bottleneck"), num_classes=2)
    for params, last_bn in [
        (tiny[1]["params"], "bn2"),
        (init_variables(bottleneck, jax.random.key(0), 32)["params"], "bn3"),
    ]:
        blocks = [k for k in params if k.startswith("stage")]
        assert blocks == ["stage1_block1", "stage2_block1"]
        for block in blocks:
            assert np.all(np.asarray(params[block][last_bn]["scale"]) == 0)
            # the other BatchNorms keep scale 1
            assert np.all(np.asarray(params[block]["bn1"]["scale"]) == 1)
        assert np.all(np.asarray(params["stem_bn"]["scale"]) == 1)


def test_bottleneck_v15_stride_in_3x3_conv():
    model = create_model(_config("resnet_tiny_bottleneck"), num_classes=2)
    variables = _abstract_variables(model, 64)
    p = variables["params"]["stage2_block1"]
    assert p["conv1"]["kernel"].shape == (1, 1, 32, 16)
    assert p["conv2"]["kernel"].shape == (3, 3, 16, 16)
    assert p["conv3"]["kernel"].shape == (1, 1, 16, 64)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    _, inter = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, capture_intermediates=True), variables, x
    )
    block = inter["intermediates"]["stage2_block1"]
    # 64 px -> stem 32 -> max-pool 16 -> stage 1 keeps 16 -> stage 2 halves to 8.
    assert inter["intermediates"]["stage1_block1"]["__call__"][0].shape == (1, 16, 16, 32)
    assert block["conv1"]["__call__"][0].shape == (1, 16, 16, 16)  # 1x1: stride 1
    assert block["conv2"]["__call__"][0].shape == (1, 8, 8, 16)  # 3x3: stride 2 (v1.5)
    assert block["proj_conv"]["__call__"][0].shape == (1, 8, 8, 64)
    assert block["__call__"][0].shape == (1, 8, 8, 64)


def test_dropout_only_in_train_mode(tiny):
    plain, variables = tiny
    model = create_model(_config(dropout=0.5), num_classes=3)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))

    @functools.cache
    def compiled(m, train):
        return jax.jit(
            lambda v, x, k: m.apply(
                v, x, train=train, rngs={"dropout": k}, mutable=["batch_stats"]
            )[0]
        )

    def run(m, train, key):
        return np.asarray(compiled(m, train)(variables, x, key))

    k1, k2 = jax.random.key(2), jax.random.key(3)
    assert not np.allclose(run(model, True, k1), run(model, True, k2))
    np.testing.assert_array_equal(run(model, False, k1), run(model, False, k2))
    # Eval mode with dropout configured = the model without dropout.
    np.testing.assert_allclose(run(model, False, k1), run(plain, False, k2), rtol=1e-6)
    # Without dropout the train-mode output does not depend on the key.
    np.testing.assert_array_equal(run(plain, True, k1), run(plain, True, k2))


def test_batch_stats_update_only_in_train_mode(tiny):
    model, variables = tiny
    x = 3.0 + jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    _, train_updates = _apply(model, variables, x, True, mutable=["batch_stats"])
    _, eval_updates = _apply(model, variables, x, False, mutable=["batch_stats"])
    old = variables["batch_stats"]["stem_bn"]["mean"]
    assert not np.allclose(train_updates["batch_stats"]["stem_bn"]["mean"], old)
    jax.tree.map(
        np.testing.assert_array_equal, eval_updates["batch_stats"], variables["batch_stats"]
    )


_PMAP_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, ml_collections
    from isic_jax.models import create_model, init_variables
    assert jax.local_device_count() == 2, jax.devices()
    cfg = ml_collections.ConfigDict(dict(name="resnet_tiny", width=8, dropout=0.0,
                                         dtype="float32"))
    single = create_model(cfg, 3)
    synced = create_model(cfg, 3, axis_name="batch")
    variables = init_variables(single, jax.random.key(0), 32)
    # Different statistics on the two halves, so per-device BN would differ from global BN.
    x = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
    x = x.at[:4].multiply(3.0).at[4:].add(1.0)
    ref_logits, ref = single.apply(variables, x, train=True, mutable=["batch_stats"])

    def step(v, xb):
        return synced.apply(v, xb, train=True, mutable=["batch_stats"])

    rep = jax.tree.map(lambda a: jnp.stack([a, a]), variables)
    logits, upd = jax.pmap(step, axis_name="batch")(rep, x.reshape(2, 4, 32, 32, 3))
    np.testing.assert_allclose(logits.reshape(8, 3), ref_logits, rtol=1e-4, atol=1e-5)
    flat_ref = jax.tree.leaves(ref["batch_stats"])
    flat = jax.tree.leaves(upd["batch_stats"])
    assert len(flat) == len(flat_ref) > 0
    for got, want in zip(flat, flat_ref):
        np.testing.assert_allclose(got[0], got[1], rtol=0, atol=0)
        np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-5)
    # Without axis_name the devices would disagree (guards against a vacuous test).
    _, unsynced = jax.pmap(lambda v, xb: single.apply(v, xb, train=True,
                                                      mutable=["batch_stats"]))(
        rep, x.reshape(2, 4, 32, 32, 3))
    m = unsynced["batch_stats"]["stem_bn"]["mean"]
    assert not np.allclose(m[0], m[1])
    print("PMAP_BN_OK")
    """
)


def test_batchnorm_axis_name_under_pmap_matches_full_batch(tmp_path):
    # A fresh process: the fake device count must be set before jax initialises its backend.
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    repo = str(pathlib.Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in [repo, env.get("PYTHONPATH", "")] if p)
    script = tmp_path / "pmap_bn.py"
    script.write_text(_PMAP_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PMAP_BN_OK" in proc.stdout
