"""The GPU/TPU train step, checked on this CPU (no accelerator needed).

The jitted train step (`steps.train_step` under `DataParallel.compile_train_step`, bfloat16
compute as configs/default.py sets it, its device augmentation, AdamW) is lowered for CUDA and
for TPU from here (`jit(...).trace(...).lower(lowering_platforms=...)`, jax >= 0.10.2) and its
StableHLO is checked for what a fast accelerator run depends on:

- convolutions take bfloat16 operands, and bfloat16 holds ~all of the step's convolution and
  matmul FLOPs (the float32 head and the 3-channel colour maths are the rest);
- the activations kept for the backward pass are bfloat16 (or ReLU masks), except the two float32
  values per BatchNorm layer that Flax's BatchNorm computes its statistics in;
- the state buffers are donated (updated in place), the batch arrives as uint8;
- nothing in the step talks to the host: no callbacks, infeed/outfeed, send/recv, host memory;
- the CPU lowering of models/cpu_lowering.py is absent (its optimisation barriers and sliced
  max-pooling), XLA's native convolutions and pooling are there;
- over a 2-device mesh (fake CPU devices, in a subprocess), each weight gradient is all-reduced
  exactly once, BatchNorm's statistics are the only other cross-device values, and no
  activation moves between devices (no all-gather, all-to-all, collective-permute).

Each check also runs on a program that breaks it (float32 compute, a host callback, no
donation, the CPU lowering) and must flag it: a change that silently makes the GPU step float32
or host-bound fails here. tests/test_cpu_lowering.py checks the model alone op for op.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
BATCH, SIZE = 8, 64


def _config(dtype: str = "bfloat16", lowering: str = "auto"):
    from isic_jax.configs import smoke

    config = smoke.get_config()
    config.model.dtype = dtype
    config.model.lowering = lowering
    config.data.augment.rotation = 30.0  # the default's device augmentation, rotation included
    config.optim.name = "adamw"
    return config


def _step_and_args(config, par, donate: bool = True):
    """(jitted train step, abstract (state, batch, rng)) for `config` on `par` (jit mode)."""
    from isic_jax.models import create_model
    from isic_jax.training import steps
    from isic_jax.training.optim import create_optimizer
    from isic_jax.training.state import create_train_state

    tx, _ = create_optimizer(config.optim, total_steps=10, steps_per_epoch=5)
    model = create_model(config.model, 2, axis_name=par.axis_name)
    state = jax.eval_shape(lambda: create_train_state(create_model(config.model, 2), tx,
                                                      jax.random.PRNGKey(0), SIZE))
    step = functools.partial(steps.train_step, model=model, tx=tx, loss_config=config.loss,
                             axis_name=par.axis_name, augment=steps.augment_config(config))
    if donate:
        jitted = par.compile_train_step(step)
    else:  # a negative control: what compile_train_step would be without donation
        jitted = jax.jit(step, in_shardings=(par.replicated, par.batch_sharding, par.replicated),
                         out_shardings=(par.replicated, par.replicated))
    spec = jax.ShapeDtypeStruct
    batch = {"image": spec((BATCH, SIZE, SIZE, 3), jnp.uint8),
             "label": spec((BATCH,), jnp.int32), "mask": spec((BATCH,), jnp.bool_),
             "position": spec((BATCH,), jnp.uint32)}
    return jitted, (state, batch, spec((2,), jnp.uint32))


def _lowered_text(platform: str, **kw) -> tuple[str, object]:
    from isic_jax.training import parallel

    par = parallel.DataParallel.create("jit", jax.devices()[:1])
    jitted, args = _step_and_args(_config(**{k: v for k, v in kw.items() if k != "donate"}),
                                  par, donate=kw.get("donate", True))
    lowered = jitted.trace(*args).lower(lowering_platforms=(platform,))
    return lowered.as_text(), args[0]


@functools.cache
def _program(platform: str, dtype: str = "bfloat16", donate: bool = True) -> tuple[str, object]:
    return _lowered_text(platform, dtype=dtype, donate=donate)


# ----------------------------------------------------------------------------- StableHLO reading


def _types(signature: str) -> list[tuple[str, tuple[int, ...]]]:
    """[(dtype, shape)] of the tensor types in a signature text, in order."""
    out = []
    for body in re.findall(r"tensor<([^>]*)>", signature):
        *dims, dtype = body.split(",")[0].split("x")
        out.append((dtype, tuple(int(d) for d in dims)))
    return out


def _ops(text: str, name: str) -> list[tuple[str, list, list]]:
    """(line, operand types, result types) of each one-line `stablehlo.<name>` op."""
    found = []
    for line in text.splitlines():
        if f"stablehlo.{name} " not in line and f"stablehlo.{name}(" not in line:
            continue
        m = re.search(r":\s*\(([^()]*)\)\s*->\s*(.*)$", line)
        if m:
            found.append((line, _types(m.group(1)), _types(m.group(2))))
    return found


def _flops(line: str, operands: list, results: list) -> float:
    """2 x multiply-adds of a convolution or dot_general, from its types and dimension numbers."""
    (_, out), = results
    if "stablehlo.convolution" in line:
        kernel_spec = re.search(r"\]x\[([^\]]*)\]->", line).group(1).split(", ")
        kernel = operands[1][1]
        return 2.0 * math.prod(out) * math.prod(kernel) / kernel[kernel_spec.index("o")]
    lhs = operands[0][1]
    contracting = re.search(r"contracting_dims = \[([\d, ]*)\]", line).group(1)
    k = math.prod(lhs[int(d)] for d in contracting.split(",") if d.strip())
    return 2.0 * math.prod(out) * k


def bf16_flop_share(text: str) -> float:
    """Share of the convolution + matmul FLOPs whose operands are all bfloat16."""
    total = bf16 = 0.0
    for name in ("convolution", "dot_general"):
        for line, operands, results in _ops(text, name):
            flops = _flops(line, operands, results)
            total += flops
            bf16 += flops if all(dtype == "bf16" for dtype, _ in operands) else 0.0
    return bf16 / total


def host_interactions(text: str) -> list[str]:
    """What in a program would stop at or talk to the host: callbacks and other custom calls,
    infeed/outfeed, send/recv, host memory spaces."""
    allowed = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"}
    found = [f"custom_call @{t}" for t in re.findall(r"custom_call @(\w+)", text)
             if t not in allowed]
    found += [f"custom_call {t}" for t in re.findall(r'call_target_name = "(\w+)"', text)
              if t not in allowed]
    found += [f"stablehlo.{op}" for op in re.findall(r"stablehlo\.(infeed|outfeed|send|recv)\b",
                                                     text)]
    found += [f"memory kind {k}" for k in re.findall(r'"(pinned_host|unpinned_host)"', text)]
    return found


def undonated_state_args(text: str, num_state_leaves: int) -> list[int]:
    """Indices of the main function's first `num_state_leaves` arguments that are not donated
    (aliased to an output or marked a buffer donor)."""
    signature = re.search(r"func\.func public @main\((.*?)\) ->", text, re.S).group(1)
    args = re.split(r"(?=%arg\d+: )", signature)[1:]
    return [i for i, arg in enumerate(args[:num_state_leaves])
            if "tf.aliasing_output" not in arg and "jax.buffer_donor" not in arg]


def main_arg_types(text: str) -> list[tuple[str, tuple[int, ...]]]:
    signature = re.search(r"func\.func public @main\((.*?)\) ->", text, re.S).group(1)
    return [_types(arg)[0] for arg in re.split(r"(?=%arg\d+: )", signature)[1:]]


def cpu_lowering_traces(text: str) -> dict[str, int]:
    """Op counts that tell models/cpu_lowering.py's CPU branch from XLA's native ops."""
    return {"optimization_barrier": text.count("stablehlo.optimization_barrier"),
            "select_and_scatter": text.count("stablehlo.select_and_scatter"),
            "reduce_window": text.count("stablehlo.reduce_window")}


NUM_CONVS = 6  # resnet_tiny: stem, 2 x (conv1, conv2), the projection


# ------------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerator_step_convolves_in_bfloat16(platform: str) -> None:
    text, _ = _program(platform)
    convs = _ops(text, "convolution")
    # Forward, weight gradient and input gradient of each (the stem's input needs none): the
    # native convolutions, one each (the CPU lowering would split and re-express them).
    assert len(convs) == 3 * NUM_CONVS - 1, len(convs)
    for line, operands, _ in convs:
        assert [dtype for dtype, _ in operands] == ["bf16", "bf16"], line
    assert bf16_flop_share(text) > 0.99
    # Negative control: float32 compute fails this check.
    assert bf16_flop_share(_program(platform, dtype="float32")[0]) == 0.0


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerator_step_is_device_only_and_donates_its_state(platform: str) -> None:
    text, state = _program(platform)
    leaves = len(jax.tree.leaves(state))
    assert host_interactions(text) == []
    assert undonated_state_args(text, leaves) == []
    types = main_arg_types(text)
    assert len(types) == leaves + 5  # + image, label, mask, position, rng: none donated
    assert types[leaves] == ("ui8", (BATCH, SIZE, SIZE, 3))  # uint8 over the host link
    assert all(dtype == "f32" for dtype, shape in types[:leaves] if len(shape) >= 2)
    # Negative control: without donation the check names every state argument.
    undonated, _ = _program(platform, donate=False)
    assert undonated_state_args(undonated, leaves) == list(range(leaves))


def test_a_host_callback_in_the_step_is_flagged() -> None:
    from isic_jax.training import parallel, steps

    par = parallel.DataParallel.create("jit", jax.devices()[:1])
    original = steps.train_step

    def chatty(state, batch, rng, **kw):
        jax.debug.callback(lambda loss: None, state.step)
        return original(state, batch, rng, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(steps, "train_step", chatty)
        jitted, args = _step_and_args(_config(), par)
    # Lowered for the CPU here (a CUDA lowering of a host callback needs a CUDA backend).
    text = jitted.trace(*args).lower(lowering_platforms=("cpu",)).as_text()
    assert any("callback" in item for item in host_interactions(text)), host_interactions(text)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerator_step_has_no_cpu_lowering(platform: str) -> None:
    ops = cpu_lowering_traces(_program(platform)[0])
    assert ops["optimization_barrier"] == 0
    assert ops["select_and_scatter"] == 1 and ops["reduce_window"] >= 1  # XLA's max-pool
    # The same step lowered for the CPU does take the CPU lowering: the check has teeth.
    cpu = cpu_lowering_traces(_lowered_text("cpu")[0])
    assert cpu["optimization_barrier"] > 0 and cpu["select_and_scatter"] == 0


def _activation_residuals(dtype: str) -> tuple[list[tuple[str, tuple, str]], int]:
    """[(dtype, shape, origin)] of the batch-shaped values the model's forward pass keeps for
    its backward pass (lowering "xla": the GPU/TPU program), and the number of BatchNorm
    layers."""
    from isic_jax.models import create_model, init_variables

    model = create_model(_config(dtype=dtype, lowering="xla").model, 2)
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0), SIZE))

    def loss(params, batch_stats, x):
        logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"])
        return jnp.sum(logits)

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(
            loss, variables["params"], variables["batch_stats"],
            jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 3), jnp.float32))
    found = []
    for line in out.getvalue().splitlines():
        m = re.match(r"(\w+)\[([\d,]*)\] (.*)$", line.strip())
        if m:
            shape = tuple(int(d) for d in m.group(2).split(",") if d)
            if len(shape) == 4 and shape[0] == BATCH and shape[-1] > 3:
                found.append((m.group(1), shape, m.group(3)))
    return found, len(jax.tree.leaves(variables["batch_stats"])) // 2


def float32_activation_copies(residuals: list, num_bn: int) -> list[str]:
    """The float32 activations kept for the backward pass beyond BatchNorm's two per layer."""
    wrong = [f"{d}{list(s)} {origin}" for d, s, origin in residuals
             if d not in ("bf16", "bool") and not (d == "f32" and "normalization.py" in origin)]
    from_bn = sum(d == "f32" and "normalization.py" in o for d, _, o in residuals)
    if from_bn > 2 * num_bn:
        wrong.append(f"{from_bn} float32 BatchNorm residuals for {num_bn} layers")
    return wrong


def test_backward_pass_keeps_bfloat16_activations() -> None:
    residuals, num_bn = _activation_residuals("bfloat16")
    assert num_bn == 6  # stem, 2 per block, the projection
    assert float32_activation_copies(residuals, num_bn) == []
    assert sum(d == "bf16" for d, _, _ in residuals) >= NUM_CONVS  # the convolutions' inputs
    # Negative control: a float32 model keeps float32 activations everywhere.
    residuals, num_bn = _activation_residuals("float32")
    assert len(float32_activation_copies(residuals, num_bn)) >= NUM_CONVS


_MESH_SCRIPT = textwrap.dedent(
    """
    import json, re, sys
    sys.path.insert(0, sys.argv[1])
    import jax
    import test_gpu_program as t
    from isic_jax.training import parallel

    assert jax.device_count() == 2, jax.devices()
    out = {}
    config = t._config(lowering="xla")  # the GPU program (see test_cpu_lowering.py)
    jit = parallel.DataParallel.create("jit", jax.devices())
    step, args = t._step_and_args(config, jit)
    # SPMD partitioning places the collectives; the CPU code generation after it needs no effort.
    compiled = step.trace(*args).lower().compile(compiler_options={
        "xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})
    out["jit"] = t.collectives(compiled.as_text())
    shardings = compiled.input_shardings[0]
    out["state_replicated"] = all(s.is_fully_replicated for s in jax.tree.leaves(shardings[0]))
    out["batch_specs"] = sorted({tuple(s.spec) for s in jax.tree.leaves(shardings[1])})
    pmap = parallel.DataParallel.create("pmap", jax.devices())
    step, (state, batch, rng) = t._step_and_args(config, pmap)
    per_device = lambda x: jax.ShapeDtypeStruct((2, *x.shape), x.dtype)
    batch = {k: jax.ShapeDtypeStruct((2, v.shape[0] // 2, *v.shape[1:]), v.dtype)
             for k, v in batch.items()}
    text = step.lower(jax.tree.map(per_device, state), batch, per_device(rng)).as_text()
    out["pmap"] = t.stablehlo_all_reduces(text)
    params = jax.tree.leaves(state.params)
    out["param_shapes"] = [list(p.shape) for p in params]
    out["bn_channels"] = [p.shape[0] for p in jax.tree.leaves(state.batch_stats)][::2]
    print("MESH " + json.dumps(out))
    """
)


def collectives(hlo: str) -> dict[str, list]:
    """Compiled HLO text -> {"all-reduce": [[dtype, shape], ...] (tuple operands one by one),
    and the count of each other cross-device op}."""
    out: dict[str, list] = collections.defaultdict(list)
    for line in hlo.splitlines():
        m = re.search(r"= (\(.*?\)|\S+) (all-reduce|all-gather|reduce-scatter|all-to-all|"
                      r"collective-permute)(?:-start)?\(", line)
        if not m:
            continue
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
            out[m.group(2)].append([dtype, [int(d) for d in dims.split(",") if d]])
    return dict(out)


def stablehlo_all_reduces(text: str) -> list:
    """[[dtype, shape], ...] of every all_reduce operand in a StableHLO text."""
    found = []
    for m in re.finditer(r'"stablehlo\.all_reduce"\(.*?\n\s*\}\) : \(([^)]*)\)', text, re.S):
        found += [[dtype, list(shape)] for dtype, shape in _types(m.group(1))]
    return found


@pytest.fixture(scope="module")
def mesh() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, str(REPO / "tests")], env=env,
                          cwd=str(REPO), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("MESH "))
    return json.loads(line[len("MESH "):])


def _check_gradient_reduces(reduced: list, mesh: dict, bn_stats_shape) -> None:
    params = [tuple(s) for s in mesh["param_shapes"]]
    kernels = collections.Counter(s for s in params if len(s) == 4)
    reduced_kernels = collections.Counter(tuple(s) for _, s in reduced if len(s) == 4)
    # Each convolution's weight gradient crosses the devices exactly once.
    assert reduced_kernels == kernels
    assert all(dtype == "f32" for dtype, _ in reduced)
    # The rest: the other gradients and BatchNorm's batch statistics (forward and backward),
    # a few scalars (loss, counts); nothing activation-sized.
    channels = sum(mesh["bn_channels"])
    n_params = sum(math.prod(s) for s in params)
    total = sum(math.prod(s) for _, s in reduced)
    assert sum(math.prod(s) for s in kernels.elements()) < total <= n_params + 4 * channels + 16
    assert max(math.prod(s) for _, s in reduced) <= max(math.prod(s) for s in params)
    if bn_stats_shape is not None:  # pmap: Flax pmeans [mean, mean of squares] per layer
        stats = collections.Counter(tuple(s) for _, s in reduced if len(s) == 2 and s[0] == 2)
        assert sum(stats.values()) == 2 * len(mesh["bn_channels"])  # forward + backward


def test_jit_over_a_2_device_mesh_all_reduces_each_gradient_once(mesh: dict) -> None:
    jit = mesh["jit"]
    assert set(jit) == {"all-reduce"}, set(jit)  # no all-gather, all-to-all, permute
    _check_gradient_reduces(jit["all-reduce"], mesh, None)
    assert mesh["state_replicated"]
    assert mesh["batch_specs"] == [["data"]]  # the batch split over the devices


def test_pmap_all_reduces_each_gradient_once(mesh: dict) -> None:
    reduced = mesh["pmap"]
    _check_gradient_reduces(reduced, mesh, "stacked")
    # Before XLA combines anything: one all-reduce per parameter (its gradient's pmean).
    params = collections.Counter(tuple(s) for s in mesh["param_shapes"])
    per_shape = collections.Counter(tuple(s) for _, s in reduced if not (len(s) == 2 and s[0] == 2)
                                    and len(s) >= 1)
    assert all(per_shape[shape] >= n for shape, n in params.items()), (per_shape, params)
