"""Helpers for the trainer tests (no tests here): tiny configs, in-memory data, a 4-device worker.

The worker runs as `python tests/train_helpers.py WORKER ARGS_JSON` in a subprocess, because the
number of fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N) must be set
before jax is imported, and other test modules import jax first.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# The backbone parts of tiny_config's two-stage ResNet (models.model_parts).
TINY_PARTS = ("stem", "stage1", "stage2")


def _cache_dir(base: pathlib.Path) -> str:
    return str(base / "jax_compilation_cache")


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """JAX's persistent compilation cache for this module (and the workers it starts).

    Compilation dominates these tests (each training run compiles init, train and eval steps);
    runs with the same programs then load them from disk: ~9 s -> ~2 s per run here.
    """
    import jax

    path = _cache_dir(tmp_path_factory.getbasetemp())
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    os.environ["ISIC_JAX_TEST_CACHE"] = path
    yield path
    for name, value in old.items():
        jax.config.update(name, value)
    os.environ.pop("ISIC_JAX_TEST_CACHE", None)


def cache_env(env: dict[str, str]) -> dict[str, str]:
    """Environment for a subprocess that shares the compilation cache (if a test set one)."""
    env = dict(env)
    path = os.environ.get("ISIC_JAX_TEST_CACHE")
    if path:
        env["JAX_COMPILATION_CACHE_DIR"] = path
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def tiny_config(**overrides: Any):
    """configs/smoke.py made smaller still: resnet_tiny width 4 at 32 px, SGD, 6 steps."""
    from isic_jax.configs import smoke

    config = smoke.get_config()
    config.data.stored_size = 40
    config.data.image_size = 32
    config.data.device_prefetch = 2
    config.model.width = 4
    config.optim.name = "sgd"
    config.optim.learning_rate = 0.05
    config.optim.weight_decay = 0.0
    config.train.batch_size = 8
    config.eval.batch_size = 8
    config.train.num_steps = 6
    config.train.log_every = 2
    config.train.eval_every = 3
    config.train.checkpoint_every = 3
    config.train.progress = False
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        if "." in name:
            sub, name = name.split(".")
            config[section][sub][name] = value
        else:
            config[section][name] = value
    return config


def standard_config(**overrides: Any):
    """The in-process test config: everything that carries state across a resume is on (SGD
    momentum, gradient accumulation via MultiSteps, EMA, dropout RNG, augmentation RNG), under
    jit (donated buffers + asynchronous saves). Tests share it so that they share compiled
    programs through the compilation cache."""
    base = {
        "optim.accumulation_steps": 2,
        "optim.ema_decay": 0.9,
        "model.dropout": 0.2,
        "train.parallelism": "jit",
    }
    base.update(overrides)
    return tiny_config(**base)


def make_records(n: int, size: int = 40, seed: int = 0) -> list[dict[str, Any]]:
    """n records as the TFDS source yields them: JPEG bytes, label (bright = malignant), ids."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        label = i % 2
        base = 150 if label else 90
        pixels = np.clip(rng.normal(base, 30, (size, size, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        records.append(
            {
                "image": buf.getvalue(),
                "image_id": f"ISIC_{seed:02d}{i:05d}".encode(),
                "label": label,
                "diagnosis": label,
                "patient_id": f"IP_{i // 3:04d}".encode(),
                "lesion_id": b"",
                "age": 50,
                "sex": 1,
                "anatom_site": b"torso",
                "fold": 0,
            }
        )
    return records


def make_data(config, n_train: int = 32, n_val: int = 12):
    """A dataset.InputData over in-memory records (no TFDS), deterministic."""
    from isic_jax.data import dataset, pipeline

    train_records = make_records(n_train, seed=1)
    val_records = make_records(n_val, seed=2)
    labels = np.array([r["label"] for r in train_records], np.int32)
    val_labels = np.array([r["label"] for r in val_records], np.int32)
    info = dataset.SourceInfo(
        release="isic2020",
        task="binary",
        class_names=["benign", "malignant"],
        num_train=n_train,
        num_val=n_val,
        train_class_counts=np.bincount(labels, minlength=2),
        val_class_counts=np.bincount(val_labels, minlength=2),
        train_labels=labels,
        train_split="fold1+fold2+fold3+fold4",
        val_split="fold0",
        label_read_seconds=0.0,
    )
    sources = (
        pipeline.ListSource(train_records),
        pipeline.ListSource(val_records),
        info,
    )
    return dataset.InputData(config, sources=sources)


def restore_params(
    workdir: pathlib.Path, checkpoint: str | int = "latest"
) -> dict[str, np.ndarray]:
    """The whole train state of a checkpoint (params, batch_stats, opt_state, ema) as flat numpy,
    restored the way `isic-jax evaluate` does it, onto this process's first device."""
    import jax

    from isic_jax import config_utils
    from isic_jax.evaluation import evaluate
    from isic_jax.training import parallel

    config = config_utils.load_config(workdir)
    par = parallel.DataParallel.create("jit", jax.devices()[:1])
    state, _, _ = evaluate.restore_for_eval(workdir, config, 2, par, checkpoint)
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def run_worker(name: str, args: dict[str, Any], devices: int = 4, timeout: int = 300) -> dict:
    """Runs `worker_<name>(**args)` in a fresh process with `devices` fake CPU devices."""
    env = cache_env(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    result = subprocess.run(
        [sys.executable, __file__, name, json.dumps(args)],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=str(REPO), check=False,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"worker {name} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
            f"{result.stderr[-5000:]}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ workers


def worker_equivalence(steps: int = 3, optimizer: str = "sgd",
                       finetune: dict[str, Any] | None = None,
                       overrides: dict[str, Any] | None = None) -> dict:
    """Params after `steps` steps: single device (jit on 1 device) vs pmap vs jit on all.

    Same init, same global batches (random arrays), dropout off. Returns max abs differences and
    how many times each step function was compiled. `finetune`: config.finetune overrides (the
    optimiser parts, frozen stages and BatchNorm of models/optim.py). `overrides`: other config
    keys ("data.augment.mixup_p": 0.5, ...), as `tiny_config` takes them.
    """
    import functools
    import logging

    import jax

    from isic_jax.models import create_model
    from isic_jax.training import parallel
    from isic_jax.training import state as train_state
    from isic_jax.training import steps as train_steps
    from isic_jax.training.optim import FineTune, create_optimizer

    compiles: list[str] = []

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if "Finished XLA compilation of" in msg:
                compiles.append(msg)

    jax.config.update("jax_log_compiles", True)
    logging.getLogger("jax").addHandler(Count())
    logging.getLogger("jax").setLevel(logging.WARNING)

    config = tiny_config(**{"optim.name": optimizer, **(overrides or {})})
    if optimizer == "adamw":
        config.optim.learning_rate = 1e-3
    rs = np.random.RandomState(0)
    batch, size = 8, 32
    # uint8 images and stream positions, as the input pipeline ships them: the step's device
    # augmentation (colour jitter + rotation here) must also agree across layouts.
    config.data.augment.rotation = 15.0
    batches = [
        {
            "image": rs.randint(0, 256, (batch, size, size, 3)).astype(np.uint8),
            "label": rs.randint(0, 2, batch).astype(np.int32),
            "mask": np.ones(batch, bool),
            "position": np.arange(i * batch, (i + 1) * batch, dtype=np.uint32),
        }
        for i in range(steps)
    ]
    for key, value in (finetune or {}).items():
        config.finetune[key] = value
    ft = FineTune.from_config(config.finetune)
    tx, _ = create_optimizer(config.optim, 10, 10, config.finetune, parts=TINY_PARTS)
    init_model = create_model(config.model, 2)
    results = {}
    for name, mode, devices in [
        ("single", "jit", jax.devices()[:1]),
        ("pmap", "pmap", jax.devices()),
        ("jit", "jit", jax.devices()),
    ]:
        par = parallel.DataParallel.create(mode, devices)
        model = create_model(config.model, 2, axis_name=par.axis_name,
                             frozen_bn=ft.frozen_bn_parts(TINY_PARTS))
        state = train_state.create_train_state(init_model, tx, jax.random.PRNGKey(0), size)

        def train_step(state, b, rng, par=par, model=model):
            return train_steps.train_step(state, b, rng, model=model, tx=tx,
                                          loss_config=config.loss, axis_name=par.axis_name,
                                          augment=train_steps.augment_config(config),
                                          frozen_parts=ft.frozen_parts(TINY_PARTS))

        p_step = par.compile_train_step(functools.partial(train_step))
        state = par.replicate(state)
        rng = par.replicate(jax.random.PRNGKey(1))
        device_batches = [par.shard_batch(b) for b in batches]
        before = len(compiles)  # from here on, only the step itself can compile
        losses = []
        for b in device_batches:
            state, metrics = p_step(state, b, rng)
            losses.append(jax.device_get(metrics["loss"]))
        n_compiles = len(compiles) - before
        losses = [float(np.asarray(x).reshape(-1)[0]) for x in losses]
        out = jax.device_get(par.unreplicate(state))
        results[name] = (out, losses, n_compiles)

    def max_diff(a, b):
        return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

    ref = results["single"][0]
    report = {"devices": len(jax.devices())}
    for name in ("pmap", "jit"):
        out, losses, n_compiles = results[name]
        report[name] = {
            "params": max_diff(ref.params, out.params),
            "batch_stats": max_diff(ref.batch_stats, out.batch_stats),
            "loss": max(abs(a - b) for a, b in zip(losses, results["single"][1], strict=True)),
            "compiles": n_compiles,
            "param_scale": max(float(np.max(np.abs(x))) for x in jax.tree.leaves(ref.params)),
        }
    report["single_compiles"] = results["single"][2]
    return report


def worker_train(workdir: str, overrides: dict[str, Any] | None = None,
                 dump: str | None = None) -> dict:
    """train_and_evaluate on all (fake) devices with in-memory data; optionally dumps the state."""
    from isic_jax import config_utils
    from isic_jax.testing import runs

    config = tiny_config(**(overrides or {}))
    try:
        result = runs.train(config, workdir, data=make_data(config))
    except config_utils.ConfigError as e:
        return {"config_error": str(e)}
    if dump:
        import jax

        flat = jax.tree_util.tree_flatten_with_path(jax.device_get(result["state"]))[0]
        np.savez(dump, **{jax.tree_util.keystr(p): np.asarray(x) for p, x in flat})
    val = result["val"] or {}
    return {"step": result["step"], "val_auc": val.get("auc"), "val_loss": val.get("loss")}


def worker_process(process_id: int, port: int, workdir: str, mode: str) -> dict:
    """One of 2 JAX processes (1 CPU device each) training together on localhost."""
    import jax

    from isic_jax.testing import runs

    jax.distributed.initialize(f"127.0.0.1:{port}", 2, process_id)

    config = standard_config(**{"train.parallelism": mode, "model.dropout": 0.0})
    result = runs.train(config, workdir, data=make_data(config))
    flat = jax.tree.leaves(jax.device_get(result["state"].params))
    return {
        "process": jax.process_index(),
        "devices": jax.device_count(),
        "step": result["step"],
        "val_loss": result["val"]["loss"],
        "val_examples": result["val"]["num_examples"],
        "param_sum": float(sum(np.sum(np.abs(x), dtype=np.float64) for x in flat)),
    }


def run_two_processes(workdir: str, mode: str, timeout: int = 240) -> list[dict]:
    """Runs `worker_process` as processes 0 and 1 (a missing peer aborts: hence the timeout)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = cache_env(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "process",
             json.dumps({"process_id": i, "port": port, "workdir": workdir, "mode": mode})],
            env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outs = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        if p.returncode != 0:
            raise AssertionError(f"process failed ({p.returncode}):\n{stdout[-2000:]}\n"
                                 f"{stderr[-4000:]}")
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    return outs


if __name__ == "__main__":
    name, raw = sys.argv[1], sys.argv[2]
    out = globals()[f"worker_{name}"](**json.loads(raw))
    print(json.dumps(out, default=float))
