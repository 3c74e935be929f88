"""The CPU lowering of convolutions and max-pooling: same values and gradients as XLA's own ops,
and GPU/TPU programs untouched."""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from isic_jax.models import cpu_lowering, create_model

NHWC = ("NHWC", "HWIO", "NHWC")


def _plain_conv(x, w, stride, pad):
    return lax.conv_general_dilated(x, w, (stride, stride), [(pad, pad)] * 2,
                                    dimension_numbers=NHWC)


def _cpu_conv(x, w, stride, pad):
    return cpu_lowering.conv_general_dilated(x, w, (stride, stride), [(pad, pad)] * 2,
                                             dimension_numbers=NHWC)


def _value_and_grads(conv, x, w, g, stride, pad):
    y, vjp = jax.vjp(lambda x, w: conv(x, w, stride, pad), x, w)
    return (y, *vjp(g))


@pytest.mark.parametrize(
    "size,cin,cout,k,stride",
    [(9, 5, 7, 1, 1), (9, 5, 7, 1, 2), (8, 4, 6, 3, 1), (9, 4, 6, 3, 2), (8, 4, 6, 3, 2),
     (15, 3, 8, 7, 2), (5, 6, 4, 3, 1), (2, 3, 5, 3, 1)],
)
def test_conv_matches_xla_values_and_gradients(size, cin, cout, k, stride) -> None:
    keys = jax.random.split(jax.random.PRNGKey(size * 100 + k * 10 + stride), 3)
    x = jax.random.normal(keys[0], (3, size, size + 1, cin))
    w = jax.random.normal(keys[1], (k, k, cin, cout))
    pad = k // 2
    y = _plain_conv(x, w, stride, pad)
    g = jax.random.normal(keys[2], y.shape)
    expected = jax.jit(lambda *a: _value_and_grads(_plain_conv, *a, stride, pad))(x, w, g)
    got = jax.jit(lambda *a: _value_and_grads(_cpu_conv, *a, stride, pad))(x, w, g)
    for name, e, o in zip(("y", "dx", "dw"), expected, got, strict=True):
        assert o.shape == e.shape and o.dtype == e.dtype, name
        np.testing.assert_allclose(np.asarray(o), np.asarray(e), rtol=1e-4, atol=1e-4,
                                   err_msg=name)


def test_conv_bfloat16_follows_xla_dtypes() -> None:
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4), jnp.bfloat16)
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 6), jnp.bfloat16)
    for stride in (1, 2):
        g = jnp.ones(_plain_conv(x, w, stride, 1).shape, jnp.bfloat16)
        expected = _value_and_grads(_plain_conv, x, w, g, stride, 1)
        got = _value_and_grads(_cpu_conv, x, w, g, stride, 1)
        for e, o in zip(expected, got, strict=True):
            assert o.dtype == e.dtype == jnp.bfloat16
            np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(e, np.float32),
                                       rtol=3e-2, atol=3e-1)


def test_max_pool_ties_send_the_gradient_to_the_first_maximum() -> None:
    # After a ReLU most windows tie at 0: XLA's select_and_scatter gives one element the whole
    # gradient, and so must the CPU lowering (jnp.maximum alone would split it).
    x = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(0), (2, 11, 10, 3)))
    x = x.at[:, 2:6, 2:6, :].set(1.0)

    def plain(v):
        return nn.max_pool(v, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    def lowered(v):
        return cpu_lowering.max_pool(v, 3, 2, ((1, 1), (1, 1)))

    y = plain(x)
    np.testing.assert_array_equal(np.asarray(jax.jit(lowered)(x)), np.asarray(y))
    g = jax.random.normal(jax.random.PRNGKey(1), y.shape)
    expected = jax.vjp(plain, x)[1](g)[0]
    got = jax.jit(lambda x, g: jax.vjp(lowered, x)[1](g)[0])(x, g)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6, atol=1e-6)


def _model_and_variables(name: str, lowering: str):
    import ml_collections

    config = ml_collections.ConfigDict({"name": name, "width": 8, "dtype": "float32",
                                        "dropout": 0.0, "lowering": lowering})
    model = create_model(config, 3)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 40, 40, 3)))
    return model, variables


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet_tiny", "resnet_tiny_bottleneck"])
def test_resnet_train_gradients_equal_with_either_lowering(name: str) -> None:
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 40, 40, 3))
    labels = jnp.array([0, 1, 2, 1])
    results = []
    for lowering in ("auto", "xla"):
        model, variables = _model_and_variables(name, lowering)

        def loss(params, model=model, variables=variables):
            logits, updates = model.apply({"params": params,
                                           "batch_stats": variables["batch_stats"]},
                                          x, train=True, mutable=["batch_stats"])
            onehot = jax.nn.one_hot(labels, 3)
            return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1)), updates

        (value, updates), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
            variables["params"])
        results.append((value, updates, grads))
    (v_auto, u_auto, g_auto), (v_xla, u_xla, g_xla) = results
    np.testing.assert_allclose(float(v_auto), float(v_xla), rtol=1e-5)
    for a, b in zip(jax.tree.leaves((u_auto, g_auto)), jax.tree.leaves((u_xla, g_xla)),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


def _op_counts(text: str) -> dict[str, int]:
    return {op: text.count(f"stablehlo.{op}")
            for op in ("convolution", "dot_general", "reduce_window", "select_and_scatter")}


def test_accelerator_programs_hold_xla_native_ops_only() -> None:
    """Lowered for TPU and CUDA (no device needed), the train gradient of the model with
    lowering=auto is op for op the program of lowering=xla; for CPU it is not."""
    from jax import export

    texts = {}
    for lowering in ("auto", "xla"):
        model, variables = _model_and_variables("resnet_tiny_bottleneck", lowering)

        def grad(params, x, model=model, variables=variables):
            def loss(p):
                logits, _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]},
                                        x, train=True, mutable=["batch_stats"])
                return jnp.sum(logits)
            return jax.grad(loss)(params)

        x = jax.ShapeDtypeStruct((2, 40, 40, 3), jnp.float32)
        for platform in ("tpu", "cuda", "cpu"):
            exported = export.export(jax.jit(grad), platforms=[platform])(variables["params"], x)
            texts[lowering, platform] = _op_counts(exported.mlir_module())
    for platform in ("tpu", "cuda"):
        assert texts["auto", platform] == texts["xla", platform], platform
        assert texts["auto", platform]["select_and_scatter"] == 1
    cpu, native = texts["auto", "cpu"], texts["xla", "cpu"]
    assert cpu["convolution"] < native["convolution"]
    assert cpu["select_and_scatter"] == 0 and cpu["reduce_window"] == 0


@pytest.mark.parametrize("pads", [((1, 1), (1, 1)), ((0, 2), (2, 0)), ((2, 1), (0, 1))])
def test_small_map_input_gradient_matches_xla(pads) -> None:
    # A 4x4 map under a 3x3x32x32 kernel: the input gradient flips g instead of the kernel.
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 5, 32))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 32, 24))

    def plain(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=NHWC)

    def lowered(x, w):
        return cpu_lowering.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=NHWC)

    y = plain(x, w)
    g = jax.random.normal(jax.random.PRNGKey(2), y.shape)
    expected = jax.vjp(plain, x, w)[1](g)
    got = jax.jit(lambda x, w, g: jax.vjp(lowered, x, w)[1](g))(x, w, g)
    for e, o in zip(expected, got, strict=True):
        np.testing.assert_allclose(np.asarray(o), np.asarray(e), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size,channels,k,stride,pads", [
    (9, 5, 3, 1, ((1, 1), (1, 1))), (9, 5, 3, 2, ((1, 1), (1, 1))),
    (8, 4, 5, 2, ((1, 2), (1, 2))),  # TF "SAME" at stride 2: the extra row at the end
    (7, 6, 7, 1, ((3, 3), (3, 3))),  # ConvNeXt's 7x7
    (2, 3, 7, 1, ((3, 3), (3, 3))),  # a map smaller than the kernel
    (8, 4, 3, 2, ((0, 1), (1, 1))),
])
def test_depthwise_matches_xla_values_and_gradients(size, channels, k, stride, pads) -> None:
    keys = jax.random.split(jax.random.PRNGKey(size * 10 + k), 3)
    x = jax.random.normal(keys[0], (2, size, size + 1, channels))
    w = jax.random.normal(keys[1], (k, k, 1, channels))

    def conv(fn):
        return lambda x, w: fn(x, w, (stride, stride), pads, dimension_numbers=NHWC,
                               feature_group_count=channels)

    @functools.partial(jax.jit, static_argnums=3)
    def value_and_grads(x, w, g, lowered):
        fn = cpu_lowering.conv_general_dilated if lowered else lax.conv_general_dilated
        y, vjp = jax.vjp(conv(fn), x, w)
        return (y, *vjp(g.astype(y.dtype)))

    g = jax.random.normal(keys[2], jax.eval_shape(conv(lax.conv_general_dilated), x, w).shape)
    expected = value_and_grads(x, w, g, False)
    for want, have in zip(expected, value_and_grads(x, w, g, True), strict=True):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(have), np.asarray(want), rtol=0, atol=1e-5 * scale)
    # bfloat16 in, bfloat16 out (accumulated in float32), as XLA's.
    y = expected[0]
    yb, dx, dw = value_and_grads(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), g, True)
    assert yb.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(yb, np.float32), np.asarray(y), rtol=0,
                               atol=0.03 * float(jnp.max(jnp.abs(y))))


def test_grouped_but_not_depthwise_convolutions_stay_xla() -> None:
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 4))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 2, 4))  # 2 groups of 2 channels
    args = ((1, 1), ((1, 1), (1, 1)))
    lowered = jax.jit(lambda x, w: cpu_lowering.conv_general_dilated(
        x, w, *args, dimension_numbers=NHWC, feature_group_count=2)).lower(x, w).as_text()
    assert "feature_group_count = 2" in lowered
    np.testing.assert_allclose(
        np.asarray(cpu_lowering.conv_general_dilated(x, w, *args, dimension_numbers=NHWC,
                                                     feature_group_count=2)),
        np.asarray(lax.conv_general_dilated(x, w, *args, dimension_numbers=NHWC,
                                            feature_group_count=2)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["efficientnet_test", "convnext_test"])
def test_depthwise_families_lower_to_native_grouped_convolutions_off_cpu(name: str) -> None:
    """On CUDA an EfficientNet's or ConvNeXt's program keeps XLA's grouped convolutions; on CPU
    none is left (they are the slice sums)."""
    import ml_collections
    from jax import export

    model = create_model(ml_collections.ConfigDict({"name": name, "lowering": "auto"}), 3)
    x = jax.ShapeDtypeStruct((2, 40, 40, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
    for platform, grouped in (("cuda", True), ("cpu", False)):
        text = export.export(jax.jit(lambda v, x: model.apply(v, x, train=False)),
                             platforms=[platform])(variables, x).mlir_module()
        groups = [int(g) for g in re.findall(r"feature_group_count = (\d+)", text)]
        assert groups and any(g > 1 for g in groups) == grouped, (platform, groups)
