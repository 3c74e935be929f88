"""Training-loop benchmarks, printed side by side.

    python scripts/bench_train.py            # (a) (b) (c) (e) on this CPU, ~10 minutes on 2 cores
    python scripts/bench_train.py --only a,e # a subset
    python scripts/bench_train.py --only e --torch-python .venv/bin/python  # torch elsewhere
    python scripts/bench_train.py --only e,f --nets efficientnet_b0,convnext_tiny
    python scripts/bench_train.py --gpu      # (d) ResNet-50 on the GPU (needs a GPU jaxlib)
    python scripts/bench_train.py --gpu --data-dir ~/tfds --stored-size 256 --workers 16 \
        --profile-dir /tmp/prof --json /tmp/bench.json   # (d) + the input pipeline alone + a trace

(a) loop overhead: steps/s of the real training loop (`loop.train_and_evaluate`: Grain input
    pipeline on in-memory JPEGs, device prefetch, metric pulls every `log_every` steps, progress)
    vs a bare Python loop calling the same compiled step on one batch already on the device, for
    a tiny model. The ratio is the share of the step rate the loop keeps (goal >= 0.9).
(b) ResNet-50 training at 224 px on this CPU (float32, small batch, a few steps): images/s, and
    the achieved FLOP/s (XLA's cost analysis of the compiled step / step time) as a fraction of a
    float32 matmul peak measured on the same machine.
(c) pmap vs jit over a Mesh: step time of the same step on 2 (fake) CPU devices.
(d) --gpu: ResNet-50 at 224 px, bfloat16 compute, the real train step (configs/default.py: AdamW,
    its device augmentation, under jit) on batches already on the GPU: images/s, the step's
    FLOPs / step time as a fraction of the bf16 matmul peak measured on the same GPU (and of the
    spec sheet's dense peak), next to the published anchors: ~2,470 img/s on one A100 with mixed
    precision (NVIDIA's PyTorch ResNet-50), ~7,000 img/s per H100 in MLPerf Training. With
    --data-dir, also the input pipeline alone (Grain, --workers processes, the prepared dataset):
    what the host can feed. With --profile-dir, a jax.profiler trace of a few steps.
    scripts/device_check.sh runs this on a lent GPU machine; --allow-cpu runs it here (tiny).

(e) isic_jax vs PyTorch on this CPU, side by side in one run: ResNet-18 at 112 px batch 32,
    ResNet-50 at 224 px batch 16, and the smallest model of each other family at 112 px batch 32
    (EfficientNet-B0, ConvNeXt-T, ViT-Ti/16), float32. For each: the real `isic-jax train`
    loop's img/s (Grain JPEG pipeline, device augmentation, prefetch, metric pulls), the bare
    compiled train step (SGD-Nesterov, batch already on the device, device augmentation
    included) with `model.lowering=auto` (the CPU lowering, `models/cpu_lowering.py`) and `xla`
    (XLA's own convolutions; fewer steps for the depthwise families, whose XLA step takes
    seconds), the same net in PyTorch (torchvision's ResNets, timm's others; channels_last,
    SGD-Nesterov, all cores) run in its own process (`--torch-python`, default this
    interpreter) so that the two never share the cores, the parameters and the forward GFLOPs
    per image (XLA's cost analysis of the forward pass with XLA's own convolutions). torch is
    never a dependency: without it the PyTorch column says so. `--nets` picks a subset.
(f) depthwise convolutions alone (the layers EfficientNet-B0 and ConvNeXt-T spend their time
    in, at 112 px batch 32): forward and forward+backward ms of XLA's grouped convolution, of
    isic_jax's CPU lowering, and of PyTorch's (channels_last, in its own process).

CPU runs set XLA_FLAGS (before jax is imported) to the YNN fusion flags `isic-jax train` uses and
to 2 fake host devices for (c), unless XLA_FLAGS is already set.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import io
import os
import pathlib
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if importlib.util.find_spec("isic_jax") is None:
    # A checkout without the package installed. (An installed one, editable or not, knows that
    # isic_jax.configs is the top-level configs/ folder; the bare checkout on sys.path does not.)
    sys.path.insert(0, str(REPO))

A100_ANCHOR_IMG_S = 2470.0  # ResNet-50 training, 1x A100, mixed precision (NVIDIA DLE results)
MLPERF_H100_IMG_S = 7000.0  # ResNet-50 training per GPU on MLPerf's H100 systems (~)
BF16_DENSE_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # spec sheets, dense bf16


def _set_cpu_flags() -> None:
    if "XLA_FLAGS" in os.environ:
        return
    from isic_jax import runtime

    flags = runtime.set_default_xla_flags() or ""
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=2".strip()


# ------------------------------------------------------------------------------ helpers


def _config(**overrides):
    from isic_jax.configs import smoke

    config = smoke.get_config()
    config.optim.name = "sgd"
    config.optim.learning_rate = 0.05
    config.optim.weight_decay = 0.0
    config.train.progress = False
    config.update_from_flattened_dict(overrides)
    return config


def _records(n: int, size: int, seed: int = 0) -> list[dict]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pixels = np.clip(rng.normal(90 + 60 * (i % 2), 30, (size, size, 3)), 0, 255)
        buf = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append({"image": buf.getvalue(), "label": i % 2, "diagnosis": i % 2,
                    "image_id": f"ISIC_{i:07d}".encode(), "patient_id": b"", "lesion_id": b"",
                    "age": -1, "sex": 0, "anatom_site": b"unknown", "fold": 0})
    return out


def _data(config, n_train: int, n_val: int, size: int):
    import numpy as np

    from isic_jax.data import dataset, pipeline

    tr, va = _records(n_train, size, 1), _records(n_val, size, 2)
    labels = np.array([r["label"] for r in tr], np.int32)
    info = dataset.SourceInfo(
        release="isic2020", task="binary", class_names=["benign", "malignant"],
        num_train=n_train, num_val=n_val, train_class_counts=np.bincount(labels, minlength=2),
        val_class_counts=np.array([n_val // 2, n_val - n_val // 2]), train_labels=labels,
        train_split="train", val_split="val", label_read_seconds=0.0,
    )  # fmt: skip
    sources = (pipeline.ListSource(tr), pipeline.ListSource(va), info)
    return dataset.InputData(config, sources=sources)


class _ReadyBatches:
    """Infinite iterator over a few pre-made host batches (no decoding), with grain-like state."""

    def __init__(self, batches: list[dict]):
        self._batches, self._i = batches, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self._batches[self._i % len(self._batches)]
        self._i += 1
        return dict(batch)

    def get_state(self) -> dict:
        return {"i": self._i}

    def set_state(self, state: dict) -> None:
        self._i = int(state["i"])


def _ready_data(data, n: int = 8):
    """`data` whose training batches are decoded once up front: the loop without the decode."""
    it = data.train_iterator()
    batches = [next(it) for _ in range(n)]
    data.train_iterator = lambda: _ReadyBatches(batches)
    return data


def _step_setup(config, par, batch_size: int, image_size: int):
    """(compiled step, replicated state, device batch, rng) for `config` on `par`."""
    import jax
    import numpy as np

    from isic_jax.models import create_model
    from isic_jax.training import state as train_state
    from isic_jax.training import steps
    from isic_jax.training.optim import create_optimizer

    tx, _ = create_optimizer(config.optim, total_steps=1000, steps_per_epoch=100)
    model = create_model(config.model, 2, axis_name=par.axis_name)
    init_model = create_model(config.model, 2)
    state = train_state.create_train_state(init_model, tx, jax.random.PRNGKey(0), image_size)
    step = functools.partial(steps.train_step, model=model, tx=tx, loss_config=config.loss,
                             axis_name=par.axis_name, augment=steps.augment_config(config))
    rs = np.random.RandomState(0)
    # As the input pipeline ships them: uint8 crops (augmented + normalised in the step).
    host = {"image": rs.randint(0, 256, (batch_size, image_size, image_size, 3)).astype(np.uint8),
            "label": (np.arange(batch_size) % 2).astype(np.int32),
            "mask": np.ones(batch_size, bool),
            "position": np.arange(batch_size, dtype=np.uint32)}
    return (par.compile_train_step(step), par.replicate(state), par.shard_batch(host),
            par.replicate(jax.random.PRNGKey(1)))


def _time_steps(p_step, state, batch, rng, n: int, repeats: int = 1) -> tuple[float, object]:
    """Seconds per step over n steps (after one warm-up/compile step), blocking at the end of
    each of `repeats` rounds; the fastest round counts (the machine is shared)."""
    import jax

    state, m = p_step(state, batch, rng)
    jax.block_until_ready(m)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            state, m = p_step(state, batch, rng)
        jax.block_until_ready((state, m))
        best = min(best, (time.perf_counter() - start) / n)
    return best, state


def _compile_with_flops(p_step, state, batch, rng):
    """(compiled jit step, XLA's FLOP count of one step from its cost analysis)."""
    compiled = p_step.lower(state, batch, rng).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return compiled, float(cost.get("flops", float("nan")))


def matmul_peak(n: int = 2048, repeats: int = 5, dtype: str = "float32", calls: int = 1
                ) -> float:
    """Measured matmul FLOP/s of an [n, n] x [n, n] product in `dtype` on the default device
    (random data; median of `repeats` timings of `calls` back-to-back products)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            out = f(a, b)
        out.block_until_ready()
        times.append((time.perf_counter() - t) / calls)
    return 2 * n**3 / statistics.median(times)


# ------------------------------------------------------------------------------ benchmarks


@contextlib.contextmanager
def _logged(key: str):
    """Yields a list that collects (step, value) of the scalar `key` the training loop logs."""
    from isic_jax import logging_utils

    seen: list[tuple[int, float]] = []
    original = logging_utils.MetricWriter.write_scalars

    def record(self, step, scalars):
        if key in scalars:
            seen.append((step, scalars[key]))
        return original(self, step, scalars)

    logging_utils.MetricWriter.write_scalars = record
    try:
        yield seen
    finally:
        logging_utils.MetricWriter.write_scalars = original


def bench_loop(steps: int = 400, log_every: int = 100) -> dict:
    """(a) the real loop vs a bare loop of the same compiled step, tiny model, one device."""
    import jax

    from isic_jax.testing import runs
    from isic_jax.training import parallel

    config = _config(**{
        "model.width": 8, "data.image_size": 32, "data.stored_size": 40,
        "train.batch_size": 8, "train.num_steps": steps, "train.log_every": log_every,
        "train.eval_every": steps, "train.checkpoint_every": steps,
        "train.parallelism": "jit", "data.device_prefetch": 2,
    })  # fmt: skip
    devices = jax.devices()[:1]

    def run_loop(data) -> tuple[float, list]:
        with _logged("train/step_time") as intervals, tempfile.TemporaryDirectory() as tmp:
            runs.train(config, tmp, devices=devices, data=data)
        # The first interval holds the compilation; like the bare loop, the fastest of the
        # other intervals (of `log_every` steps each) counts.
        return min(t for _, t in intervals[1:]), list(intervals)

    ready_step, ready_intervals = run_loop(_ready_data(_data(config, 256, 16, 40)))
    grain_step, grain_intervals = run_loop(_data(config, 256, 16, 40))
    # The input pipeline alone, for reference.
    it = _data(config, 256, 16, 40).train_iterator()
    for _ in range(10):
        next(it)
    start = time.perf_counter()
    for _ in range(200):
        next(it)
    pipeline_batch_s = (time.perf_counter() - start) / 200

    par = parallel.DataParallel.create("jit", devices)
    p_step, state, batch, rng = _step_setup(config, par, 8, 32)
    bare_step, _ = _time_steps(p_step, state, batch, rng, log_every, repeats=3)
    return {
        "loop_steps_per_s": 1 / ready_step,
        "bare_steps_per_s": 1 / bare_step,
        "ratio": bare_step / ready_step,
        "grain_loop_steps_per_s": 1 / grain_step,
        "grain_ratio": bare_step / grain_step,
        "pipeline_batches_per_s": 1 / pipeline_batch_s,
        "intervals_ms": [(s, round(t * 1e3, 3)) for s, t in ready_intervals],
        "grain_intervals_ms": [(s, round(t * 1e3, 3)) for s, t in grain_intervals],
    }


def bench_resnet50_cpu(batch_size: int = 8, steps: int = 3) -> dict:
    """(b) ResNet-50 at 224 px, float32, on one CPU device."""
    import jax

    from isic_jax.training import parallel

    config = _config(**{"model.name": "resnet50", "model.width": 64, "model.dtype": "float32"})
    par = parallel.DataParallel.create("jit", jax.devices()[:1])
    t0 = time.perf_counter()
    p_step, state, batch, rng = _step_setup(config, par, batch_size, 224)
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled, flops = _compile_with_flops(p_step, state, batch, rng)
    sec, _ = _time_steps(compiled, state, batch, rng, steps)
    compile_and_run_s = time.perf_counter() - t0
    peak = matmul_peak()
    achieved = flops / sec
    return {
        "batch": batch_size, "steps": steps, "step_s": sec, "images_per_s": batch_size / sec,
        "step_gflop": flops / 1e9, "achieved_gflop_s": achieved / 1e9,
        "matmul_peak_gflop_s": peak / 1e9, "fraction_of_peak": achieved / peak,
        "init_s": init_s, "compile_and_run_s": compile_and_run_s,
    }  # fmt: skip


def bench_pmap_vs_jit(steps: int = 10, batch_size: int = 16, image_size: int = 80) -> dict:
    """(c) the same step under pmap and under jit over a Mesh, on all (2 fake) devices."""
    import jax

    from isic_jax.training import parallel

    config = _config(**{"model.name": "resnet18", "model.width": 16, "model.dtype": "float32"})
    out = {"devices": jax.device_count(), "batch": batch_size, "image_size": image_size}
    for mode, devices in (("pmap", jax.devices()), ("jit", jax.devices()),
                          ("jit_1_device", jax.devices()[:1])):
        par = parallel.DataParallel.create("jit" if mode.startswith("jit") else mode, devices)
        p_step, state, batch, rng = _step_setup(config, par, batch_size, image_size)
        sec, _ = _time_steps(p_step, state, batch, rng, steps, repeats=3)
        out[f"{mode}_step_ms"] = sec * 1e3
    return out


def gpu_config(model: str = "resnet50", image_size: int = 224, batch_size: int = 256,
               width: int = 64):
    """configs/default.py (bfloat16, AdamW, its device augmentation) for this net, crop size and
    global batch, under jit: the program `isic-jax train` runs with these overrides."""
    from isic_jax.configs import default

    config = default.get_config()
    config.model.name = model
    config.model.width = width
    config.data.image_size = image_size
    config.train.batch_size = batch_size
    config.train.parallelism = "jit"
    config.train.progress = False
    return config


def step_flops(lowered, compiled) -> tuple[float, str]:
    """FLOPs of one step and where they came from: XLA's cost analysis of the program as lowered
    (what the model asks for, whatever kernels run it), else of the compiled program."""
    for source, stage in (("lowered", lowered), ("compiled", compiled)):
        try:
            cost = stage.cost_analysis()
        except Exception:  # noqa: BLE001 - not every backend/version has it
            continue
        if isinstance(cost, list):
            cost = cost[0] if cost else {}
        flops = float((cost or {}).get("flops", 0.0) or 0.0)
        if flops > 0:
            return flops, source
    return float("nan"), "none"


def input_pipeline_rate(config, data_dir: str, stored_size: int, workers: int,
                        batches: int | None = None) -> dict:
    """img/s of the training input pipeline alone: Grain with `workers` processes reading the
    prepared dataset (host decode + crop to uint8 batches), timed once the batches its buffers
    held at the start are drained (what the host can feed the step)."""
    from isic_jax.data import dataset
    from isic_jax.utils import close_iterator

    config = config.copy_and_resolve_references()
    config.data.data_dir = data_dir
    config.data.stored_size = stored_size
    config.data.num_workers = workers
    batch = int(config.train.batch_size)
    buffered = max(1, workers) * int(config.data.prefetch_buffer_size) + 2
    batches = batches or max(8, 2 * workers)
    t0 = time.perf_counter()
    it = dataset.InputData(config).train_iterator()
    try:
        next(it)
        first_batch_s = time.perf_counter() - t0
        for _ in range(buffered):
            next(it)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        seconds = time.perf_counter() - start
    finally:
        close_iterator(it)
    return {"images_per_s": batches * batch / seconds, "workers": workers, "batch": batch,
            "batches_timed": batches, "first_batch_s": first_batch_s}


def _profile(p_step, state, batch, rng, out_dir: str, n: int):
    """A jax.profiler trace (TensorBoard/XProf layout under out_dir) of n steps."""
    import jax

    with jax.profiler.trace(out_dir):
        for i in range(n):
            with jax.profiler.StepTraceAnnotation("train", step_num=i):
                state, metrics = p_step(state, batch, rng)
        jax.block_until_ready((state, metrics))
    return state


def bench_gpu(batch_size: int = 256, steps: int = 20, *, model: str = "resnet50",
              image_size: int = 224, width: int = 64, allow_cpu: bool = False,
              matmul_n: int = 8192, data_dir: str | None = None, stored_size: int = 256,
              workers: int = 0, profile_dir: str | None = None, profile_steps: int = 5,
              report: dict | None = None, save=lambda: None) -> dict:
    """(d) ResNet-50 at 224 px, bfloat16 compute, on one GPU, batches already on the GPU.

    Fills `report` (returned) as it goes and calls `save()` after each part, so that a part that
    fails or runs out of time keeps what was measured before it.
    """
    import jax

    from isic_jax.training import parallel

    report = {} if report is None else report
    accelerators = [d for d in jax.devices() if d.platform != "cpu"]
    if not accelerators and not allow_cpu:
        raise SystemExit("--gpu: no GPU visible to jax (pip install 'isic-jax[cuda12]' or "
                         "'isic-jax[cuda13]'; --allow-cpu runs it on the CPU)")
    devices = (accelerators or jax.devices())[:1]
    kind = devices[0].device_kind
    spec = next((v for k, v in BF16_DENSE_PEAK.items() if k in kind), None)
    report.update(device=kind, platform=devices[0].platform, jax=jax.__version__, model=model,
                  image_size=image_size, batch=batch_size, dtype="bfloat16")
    peak = matmul_peak(matmul_n, repeats=5, dtype="bfloat16", calls=10)
    report.update(bf16_matmul_peak_tflop_s=peak / 1e12, matmul_n=matmul_n,
                  bf16_spec_peak_tflop_s=spec / 1e12 if spec else None)
    save()

    config = gpu_config(model, image_size, batch_size, width)
    par = parallel.DataParallel.create("jit", devices)
    t0 = time.perf_counter()
    p_step, state, batch, rng = _step_setup(config, par, batch_size, image_size)
    jax.block_until_ready(state)
    report["init_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lowered = p_step.lower(state, batch, rng)
    compiled = lowered.compile()
    report["compile_s"] = time.perf_counter() - t0
    flops, source = step_flops(lowered, compiled)
    try:
        memory = compiled.memory_analysis()
        report["step_temp_gib"] = memory.temp_size_in_bytes / 2**30
        report["state_gib"] = memory.argument_size_in_bytes / 2**30
    except Exception:  # noqa: BLE001 - informative only
        pass
    save()
    sec, state = _time_steps(compiled, state, batch, rng, steps, repeats=3)
    achieved = flops / sec
    report.update(
        step_ms=sec * 1e3, images_per_s=batch_size / sec, steps_timed=steps,
        vs_a100_anchor=batch_size / sec / A100_ANCHOR_IMG_S,
        vs_mlperf_h100=batch_size / sec / MLPERF_H100_IMG_S,
        step_tflop=flops / 1e12, flops_source=source, achieved_tflop_s=achieved / 1e12,
        fraction_of_measured_peak=achieved / peak,
        fraction_of_spec_peak=achieved / spec if spec else None,
    )  # fmt: skip
    save()
    if data_dir:
        try:
            report["input_pipeline"] = input_pipeline_rate(config, data_dir, stored_size, workers)
        except Exception as e:  # noqa: BLE001 - reported, the step numbers stand
            report["input_pipeline"] = {"error": f"{type(e).__name__}: {e}"}
        save()
    if profile_dir:
        try:
            state = _profile(compiled, state, batch, rng, profile_dir, profile_steps)
            report["profile_dir"] = profile_dir
        except Exception as e:  # noqa: BLE001 - the numbers above stand without it
            report["profile_error"] = f"{type(e).__name__}: {e}"
        save()
    return report


def gpu_lines(r: dict) -> list[str]:
    """The human-readable summary of a bench_gpu report."""
    lines = [f"(d) {r.get('platform', '?')} {r.get('device', '?')}: bf16 matmul peak "
             f"{r.get('bf16_matmul_peak_tflop_s', float('nan')):.0f} TFLOP/s measured"
             + (f" (spec {r['bf16_spec_peak_tflop_s']:.0f})" if r.get("bf16_spec_peak_tflop_s")
                else "")]
    if "images_per_s" in r:
        lines.append(
            f"(d) {r['model']} {r['image_size']}px bf16 batch {r['batch']}, bare step: "
            f"{r['images_per_s']:.0f} img/s ({r['step_ms']:.1f} ms/step), "
            f"{r['vs_a100_anchor']:.2f}x the A100 anchor ({A100_ANCHOR_IMG_S:.0f} img/s), "
            f"{r['vs_mlperf_h100']:.2f}x MLPerf's H100 (~{MLPERF_H100_IMG_S:.0f}); "
            f"{r['achieved_tflop_s']:.1f} TFLOP/s of {r['step_tflop']:.2f} TFLOP/step = "
            f"{100 * r['fraction_of_measured_peak']:.1f} % of the measured bf16 matmul peak "
            f"(init {r['init_s']:.0f} s, compile {r['compile_s']:.0f} s)")
    pipe = r.get("input_pipeline")
    if pipe and "error" not in pipe:
        lines.append(f"(d) input pipeline alone: {pipe['images_per_s']:.0f} img/s with "
                     f"{pipe['workers']} Grain workers (first batch after "
                     f"{pipe['first_batch_s']:.1f} s)")
    elif pipe:
        lines.append(f"(d) input pipeline: {pipe['error']}")
    if r.get("profile_error"):
        lines.append(f"(d) profile: {r['profile_error']}")
    return lines


TORCH_CASES = (("resnet18", 112, 32), ("resnet50", 224, 16))
# The smallest model of each other family, at the CPU presets' size (configs/cpu_backbone.py).
FAMILY_CASES = (("efficientnet_b0", 112, 32), ("convnext_tiny", 112, 32),
                ("vit_tiny_patch16_224", 112, 32))
# Families whose XLA-lowered step takes seconds (grouped convolutions): fewer timed steps.
_SLOW_XLA = ("efficientnet", "convnext")


def _torch_model(net: str, size: int):
    """torchvision's ResNets, timm's other models (a ViT built for `size`), 2 classes."""
    import torchvision

    if net.startswith("resnet"):
        return getattr(torchvision.models, net)(num_classes=2)
    import timm

    kwargs = {"img_size": size} if net.startswith("vit") else {}
    return timm.create_model(net, pretrained=False, num_classes=2, **kwargs)


def torch_worker(net: str, size: int, batch: int, steps: int, repeats: int) -> dict:
    """PyTorch's train step of `net` (torchvision/timm; run in a process of its own)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = _torch_model(net, size).to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last)
    y = torch.arange(batch) % 2

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    best = best_seconds(step, steps, repeats)
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "images_per_s": batch / best}


def best_seconds(call, n: int, rounds: int, warmup: int = 2) -> float:
    """Seconds per call of `call()` (a synchronous one), best of `rounds` rounds of n calls
    after `warmup` calls (the machine is shared)."""
    for _ in range(warmup):
        call()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n):
            call()
        best = min(best, (time.perf_counter() - start) / n)
    return best


def worker_json(cmd: list[str], what: str) -> dict:
    """The last JSON line a worker process (`cmd`, on the CPU) prints; {"error": why} when it
    fails (e.g. torch is missing from that interpreter)."""
    import json
    import subprocess

    result = subprocess.run(cmd, capture_output=True, text=True, check=False,
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu"))
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"{what} not run ({cmd[0]}: {tail})"}
    return json.loads(lines[-1])


def _torch_images_per_s(python: str, net: str, size: int, batch: int, steps: int) -> dict:
    """torch_worker in a fresh process of `python`; {"error": why} when torch is missing."""
    return worker_json([python, __file__, "--torch-worker", f"{net},{size},{batch},{steps}"],
                       "PyTorch")


def _loop_images_per_s(config, batch: int, size: int, steps: int, log_every: int) -> float:
    """img/s the real training loop logs (best interval after the first, which compiles)."""
    import jax

    from isic_jax.testing import runs

    config.train.num_steps = steps
    config.train.log_every = log_every
    config.train.eval_every = steps
    config.train.checkpoint_every = steps
    config.data.image_size = size
    config.data.stored_size = size + size // 8
    config.train.batch_size = batch
    with _logged("train/images_per_sec") as seen, tempfile.TemporaryDirectory() as tmp:
        runs.train(config, tmp, devices=jax.devices()[:1],
                   data=_data(config, 4 * batch, 8, config.data.stored_size))
    return max(v for _, v in seen[1:] or seen)


def _model_size(net: str, size: int) -> dict:
    """Parameters and forward GFLOPs per image (XLA's cost analysis of the eval forward pass at
    batch 1 with XLA's own convolutions, which it counts as 2 x multiply-adds)."""
    import jax
    import jax.numpy as jnp

    from isic_jax.models import count_params, create_model

    config = _config(**{"model.name": net, "model.width": 64, "model.lowering": "xla"})
    model = create_model(config.model, 1000)
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    cost = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
    cost = cost.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"params_m": count_params(variables["params"]) / 1e6,
            "gflops": float(cost.get("flops", float("nan"))) / 1e9}


def bench_vs_torch(torch_python: str, quick: bool = False,
                   cases: tuple[tuple[str, int, int], ...] | None = None) -> list[dict]:
    """(e) loop, bare step (auto and xla lowering), PyTorch, parameters and GFLOPs, per case
    (net, size, batch); default TORCH_CASES."""
    import jax

    from isic_jax.training import parallel

    out = []
    for net, size, batch in cases or TORCH_CASES:
        steps = 3 if quick else (10 if net == "resnet18" else 5)
        row = {"net": net, "size": size, "batch": batch, **_model_size(net, size)}
        for lowering in ("auto", "xla"):
            slow = lowering == "xla" and net.startswith(_SLOW_XLA)
            config = _config(**{"model.name": net, "model.width": 64, "model.dtype": "float32",
                                "model.lowering": lowering})
            par = parallel.DataParallel.create("jit", jax.devices()[:1])
            p_step, state, dev_batch, rng = _step_setup(config, par, batch, size)
            sec, _ = _time_steps(p_step, state, dev_batch, rng, 2 if slow else steps,
                                 repeats=1 if slow else 3)
            row[f"step_{lowering}"] = batch / sec
            print(f"(e) {net} {size}px b{batch}: bare step, lowering={lowering}: "
                  f"{batch / sec:.1f} img/s", flush=True)
        config = _config(**{"model.name": net, "model.width": 64, "model.dtype": "float32",
                            "data.num_workers": 0})
        log_every = 5 if quick else 10
        # ResNet-18 steps are short: more intervals, so that warm-up does not count.
        intervals = 3 if quick or net != "resnet18" else 6
        row["loop"] = _loop_images_per_s(config, batch, size, intervals * log_every, log_every)
        row["torch"] = _torch_images_per_s(torch_python, net, size, batch, steps)
        print(f"(e) {net} {size}px b{batch}: loop {row['loop']:.1f} img/s, torch "
              f"{row['torch']}", flush=True)
        out.append(row)
    return out


# (label, batch, side, channels, kernel, stride): depthwise layers of EfficientNet-B0 and
# ConvNeXt-T at 112 px, batch 32 (input side of the layer).
DEPTHWISE_CASES = (
    ("B0 stage2 3x3/2", 32, 56, 96, 3, 2),
    ("B0 stage3 5x5", 32, 14, 240, 5, 1),
    ("B0 stage6 5x5", 32, 4, 1152, 5, 1),
    ("CNX-T stage1 7x7", 32, 28, 96, 7, 1),
    ("CNX-T stage3 7x7", 32, 7, 384, 7, 1),
)


def _torch_depthwise_ms(torch, b: int, side: int, c: int, k: int, stride: int, calls: int,
                        rounds: int) -> dict:
    conv = torch.nn.Conv2d(c, c, k, stride, k // 2, groups=c, bias=False)
    conv = conv.to(memory_format=torch.channels_last)
    x = torch.randn(b, c, side, side).to(memory_format=torch.channels_last)
    xg = x.clone().requires_grad_(True)

    def fwd() -> None:
        with torch.no_grad():
            conv(x)

    def fwd_bwd() -> None:
        conv.zero_grad(set_to_none=True)
        conv(xg).square().sum().backward()

    return {"fwd_ms": 1e3 * best_seconds(fwd, calls, rounds),
            "fwd_bwd_ms": 1e3 * best_seconds(fwd_bwd, calls, rounds)}


def torch_depthwise_worker(calls: int, rounds: int) -> dict:
    """PyTorch's depthwise convolutions of DEPTHWISE_CASES, fwd and fwd+bwd ms (own process)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    layers = {label: _torch_depthwise_ms(torch, b, side, c, k, stride, calls, rounds)
              for label, b, side, c, k, stride in DEPTHWISE_CASES}
    return {"torch": torch.__version__, "layers": layers}


def _jax_depthwise_ms(conv, x, w, stride: int, calls: int, rounds: int) -> dict:
    """fwd and fwd+bwd ms of `conv` (lax.conv_general_dilated's signature), depthwise."""
    import jax
    import jax.numpy as jnp

    k, c = w.shape[0], w.shape[3]

    def f(x, w):
        return conv(x, w, (stride, stride), ((k // 2, k // 2),) * 2,
                    dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)

    fwd = jax.jit(f)
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.square(f(x, w))), (0, 1)))
    return {"fwd_ms": 1e3 * best_seconds(lambda: jax.block_until_ready(fwd(x, w)), calls,
                                         rounds),
            "fwd_bwd_ms": 1e3 * best_seconds(lambda: jax.block_until_ready(grad(x, w)), calls,
                                             rounds)}


def bench_depthwise(torch_python: str, quick: bool = False) -> list[dict]:
    """(f) XLA's grouped convolution vs isic_jax's CPU lowering vs PyTorch, per layer (XLA's
    side one call per round: it takes up to seconds)."""
    import jax
    from jax import lax

    from isic_jax.models import cpu_lowering

    calls, rounds = (1, 1) if quick else (3, 3)
    torch_side = worker_json([torch_python, __file__, "--torch-dw-worker", f"{calls},{rounds}"],
                             "PyTorch")
    rows = []
    for label, b, side, c, k, stride in DEPTHWISE_CASES:
        x = jax.random.normal(jax.random.key(0), (b, side, side, c))
        w = jax.random.normal(jax.random.key(1), (k, k, 1, c)) * 0.1
        xla = _jax_depthwise_ms(lax.conv_general_dilated, x, w, stride, 1, 1 if quick else 2)
        ours = _jax_depthwise_ms(cpu_lowering.conv_general_dilated, x, w, stride, calls, rounds)
        row = {"layer": label, "xla": xla, "isic_jax": ours,
               "torch": torch_side.get("layers", {}).get(label, torch_side.get("error"))}
        print(f"(f) {label}: {row}", flush=True)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="run (d) on the GPU instead")
    parser.add_argument("--only", default="a,b,c,e,f",
                        help="comma list of a,b,c,e,f (CPU mode)")
    parser.add_argument("--nets", default=",".join(n for n, _, _ in TORCH_CASES + FAMILY_CASES),
                        help="(e): comma list of nets of TORCH_CASES and FAMILY_CASES")
    parser.add_argument("--gpu-batch", type=int, default=256)
    gpu = parser.add_argument_group("--gpu options")
    gpu.add_argument("--model", default="resnet50")
    gpu.add_argument("--width", type=int, default=64)
    gpu.add_argument("--image-size", type=int, default=224)
    gpu.add_argument("--steps", type=int, default=20, help="timed steps per round (3 rounds)")
    gpu.add_argument("--matmul-n", type=int, default=8192, help="side of the peak matmul")
    gpu.add_argument("--data-dir", help="prepared TFDS data_dir: also time the input pipeline")
    gpu.add_argument("--stored-size", type=int, default=256, help="its prepared size, px")
    gpu.add_argument("--workers", type=int, default=-1, help="Grain workers (-1: all cores)")
    gpu.add_argument("--profile-dir", help="write a jax.profiler trace of a few steps here")
    gpu.add_argument("--json", help="write the results here (updated after each part)")
    gpu.add_argument("--allow-cpu", action="store_true", help="run (d) on the CPU (tiny runs)")
    parser.add_argument("--torch-python", default=sys.executable,
                        help="interpreter with torch+torchvision for (e)")
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    parser.add_argument("--torch-worker", help=argparse.SUPPRESS)
    parser.add_argument("--torch-dw-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_worker:
        import json

        net, size, batch, steps = args.torch_worker.split(",")
        print(json.dumps(torch_worker(net, int(size), int(batch), int(steps), repeats=3)))
        return
    if args.torch_dw_worker:
        import json

        calls, rounds = args.torch_dw_worker.split(",")
        print(json.dumps(torch_depthwise_worker(int(calls), int(rounds))))
        return
    if not args.gpu:
        _set_cpu_flags()
    import jax

    from isic_jax import runtime

    runtime.quiet_library_logging()
    print(f"jax {jax.__version__}, devices: {jax.devices()}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS')}")
    if args.gpu:
        import json

        report: dict = {}

        def save() -> None:
            if args.json:
                pathlib.Path(args.json).write_text(json.dumps(report, indent=1, sort_keys=True))

        try:
            bench_gpu(args.gpu_batch, args.steps, model=args.model, image_size=args.image_size,
                      width=args.width, allow_cpu=args.allow_cpu, matmul_n=args.matmul_n,
                      data_dir=args.data_dir, stored_size=args.stored_size,
                      workers=(os.cpu_count() or 1) if args.workers < 0 else args.workers,
                      profile_dir=args.profile_dir, report=report, save=save)
        finally:
            save()
            print("\n".join(gpu_lines(report)), flush=True)
        return
    rows = []
    chosen = set(args.only.split(","))
    if "a" in chosen:
        r = bench_loop()
        rows.append(("(a) loop vs bare step, resnet_tiny w8 32px b8",
                     f"loop {r['loop_steps_per_s']:.0f} steps/s | bare {r['bare_steps_per_s']:.0f}"
                     f" steps/s | ratio {r['ratio']:.2f} (goal >= 0.9; batches decoded up front)"))
        rows.append(("    same loop, Grain JPEG pipeline in-process",
                     f"loop {r['grain_loop_steps_per_s']:.0f} steps/s | ratio "
                     f"{r['grain_ratio']:.2f} | the pipeline alone makes "
                     f"{r['pipeline_batches_per_s']:.0f} batches/s"))
        print(rows[-2][0], "interval ms/step:", r["intervals_ms"], "grain:",
              r["grain_intervals_ms"], flush=True)
    if "b" in chosen:
        r = bench_resnet50_cpu()
        rows.append(("(b) ResNet-50 224px f32 b8, 1 CPU device",
                     f"{r['images_per_s']:.2f} img/s ({r['step_s']:.2f} s/step) | "
                     f"{r['achieved_gflop_s']:.1f} GFLOP/s of {r['step_gflop']:.0f} GFLOP/step = "
                     f"{100 * r['fraction_of_peak']:.1f} % of the {r['matmul_peak_gflop_s']:.0f} "
                     f"GFLOP/s f32 matmul peak"))
        print(rows[-1][0], f"(init {r['init_s']:.0f} s, compile+run "
              f"{r['compile_and_run_s']:.0f} s)", flush=True)
    if "c" in chosen:
        r = bench_pmap_vs_jit()
        rows.append((f"(c) pmap vs jit, resnet18 w16 {r['image_size']}px b{r['batch']}, "
                     f"{r['devices']} devices",
                     f"pmap {r['pmap_step_ms']:.1f} ms/step | jit {r['jit_step_ms']:.1f} ms/step |"
                     f" jit on 1 device {r['jit_1_device_step_ms']:.1f} ms/step"))
    if "e" in chosen:
        wanted = args.nets.split(",")
        cases = tuple(c for c in TORCH_CASES + FAMILY_CASES if c[0] in wanted)
        for r in bench_vs_torch(args.torch_python, args.quick, cases):
            torch_ips = r["torch"].get("images_per_s")
            name = (f"(e) {r['net']} {r['size']}px b{r['batch']} f32 ({r['params_m']:.1f} M "
                    f"params, {r['gflops']:.2f} GFLOPs)")
            if torch_ips is None:
                rows.append((name, f"loop {r['loop']:.1f} img/s | step {r['step_auto']:.1f} "
                                   f"(xla lowering {r['step_xla']:.1f}) | {r['torch']['error']}"))
                continue
            rows.append((name, f"loop {r['loop']:.1f} img/s | step {r['step_auto']:.1f} (xla "
                               f"lowering {r['step_xla']:.1f}) | PyTorch {r['torch']['torch']} "
                               f"{torch_ips:.1f} | loop/torch {r['loop'] / torch_ips:.2f}, "
                               f"step/torch {r['step_auto'] / torch_ips:.2f} (xla "
                               f"{r['step_xla'] / torch_ips:.2f})"))
    if "f" in chosen:
        for r in bench_depthwise(args.torch_python, args.quick):
            t = r["torch"]
            torch_text = (f"PyTorch {t['fwd_ms']:.1f} / {t['fwd_bwd_ms']:.1f}"
                          if isinstance(t, dict) else str(t))
            rows.append((f"(f) depthwise {r['layer']} (ms fwd / fwd+bwd)",
                         f"XLA {r['xla']['fwd_ms']:.1f} / {r['xla']['fwd_bwd_ms']:.1f} | "
                         f"isic_jax {r['isic_jax']['fwd_ms']:.1f} / "
                         f"{r['isic_jax']['fwd_bwd_ms']:.1f} | {torch_text}"))
    print("\n" + "\n".join(f"{name:<52} {text}" for name, text in rows))
    print("(d) GPU: not run (pass --gpu on a machine with a GPU)")


if __name__ == "__main__":
    main()
