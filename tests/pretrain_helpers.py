"""Helpers for the pretraining tests (no tests here): tiny BYOL configs, a pretraining state
restored as numpy, learnable synthetic images, and a 4-device worker run in a subprocess
(`python tests/pretrain_helpers.py WORKER ARGS_JSON`, as train_helpers does)."""

from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from train_helpers import REPO, cache_env, tiny_config  # noqa: E402


def pretrain_config(**overrides: Any):
    """tiny_config (resnet_tiny width 4, 32 px, 6 steps, evaluations at 3 and 6) with a small
    BYOL section; AdamW, no clipping."""
    from isic_jax.configs import pretrain_byol

    config = tiny_config()
    config.pretrain = pretrain_byol.pretrain_section()
    config.pretrain.projector_hidden = 32
    config.pretrain.projection_dim = 16
    config.pretrain.predictor_hidden = 32
    config.data.augment.crop_scale = (1.0, 1.0)
    config.optim.name = "adamw"
    config.optim.learning_rate = 1e-3
    config.optim.grad_clip_norm = 0.0
    for key, value in overrides.items():
        node = config
        *path, name = key.split(".")
        for part in path:
            node = node[part]
        node[name] = value
    return config


def restore_state(workdir: pathlib.Path, step: int | None = None) -> dict[str, np.ndarray]:
    """Every array of a checkpoint's state item (params, batch_stats, opt_state, target, step)
    as flat numpy {"params/stem_conv/kernel": ...}; the latest step by default."""
    import orbax.checkpoint as ocp

    directory = pathlib.Path(workdir) / "checkpoints"
    if step is None:
        step = max(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    path = directory / str(step) / "state"
    handler = ocp.StandardCheckpointHandler()
    try:
        tree = getattr(handler.metadata(path), "tree", None)
    finally:
        handler.close()
    args = __import__("jax").tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=tree, restore_args=args))
    import jax

    def name(path: tuple) -> str:
        return "/".join(str(getattr(e, "key", getattr(e, "idx", getattr(e, "name", e))))
                        for e in path)

    return {name(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]}


def texture_records(n: int, size: int = 40, seed: int = 0) -> list[dict[str, Any]]:
    """n records whose class is in the texture: malignant lesions are striped (random direction,
    frequency and phase), benign ones solid. Every image also gets a random lesion size and
    place and a random brightness and contrast, which change its pixel statistics more than the
    stripes do.

    A random network's pooled features mostly see those statistics (a k-NN on them is near
    chance); BYOL, whose views change brightness, contrast, crop and orientation, has to keep
    what they do not change to match two views: the texture."""
    from PIL import Image

    from isic_jax.data import device_augment

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    skin, lesion = np.array([200.0, 160.0, 140.0]), np.array([90.0, 55.0, 40.0])
    records = []
    for i in range(n):
        label = int(i % 2)
        cy, cx = rng.uniform(-0.12, 0.12, 2)
        radius = rng.uniform(0.18, 0.4)
        inside = ((yy - cy) ** 2 + (xx - cx) ** 2) < radius**2
        if label:
            theta = rng.uniform(0, np.pi)
            freq = rng.uniform(3.0, 5.0)
            phase = rng.uniform(0, 2 * np.pi)
            wave = np.sin(2 * np.pi * freq * (np.cos(theta) * xx + np.sin(theta) * yy) + phase)
            pattern = (wave > 0).astype(np.float32)
        else:
            pattern = np.ones((size, size), np.float32)
        mix = (inside * pattern)[..., None]
        pixels = skin * (1 - mix) + lesion * mix
        # Brightness, contrast, saturation and hue as BYOL's colour jitter draws them.
        b, c, sat = rng.uniform(0.6, 1.4, 3)
        affine = device_augment.color_matrices(
            np.asarray(pixels.mean(axis=(0, 1)), np.float32)[None], brightness=np.float32([b]),
            contrast=np.float32([c]), saturation=np.float32([sat]),
            hue=np.float32([rng.uniform(-0.1, 0.1)]))
        pixels = np.asarray(device_augment.apply_color(pixels[None].astype(np.float32),
                                                       affine))[0]
        pixels = pixels + rng.normal(0, 4, (size, size, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG",
                                                                       quality=95)
        records.append({
            "image": buf.getvalue(), "image_id": f"ISIC_{seed:02d}{i:05d}".encode(),
            "label": label, "diagnosis": label, "patient_id": f"IP_{seed}_{i:04d}".encode(),
            "lesion_id": b"", "age": 50, "sex": 1, "anatom_site": b"torso", "fold": 0,
        })
    return records


def records_data(config, train_records: list[dict], val_records: list[dict]):
    """A dataset.InputData over in-memory records (binary task)."""
    from isic_jax.data import dataset, pipeline

    labels = np.array([r["label"] for r in train_records], np.int32)
    val_labels = np.array([r["label"] for r in val_records], np.int32)
    info = dataset.SourceInfo(
        release="isic2020", task="binary", class_names=["benign", "malignant"],
        num_train=len(train_records), num_val=len(val_records),
        train_class_counts=np.bincount(labels, minlength=2),
        val_class_counts=np.bincount(val_labels, minlength=2), train_labels=labels,
        train_split="fold1+fold2+fold3+fold4", val_split="fold0", label_read_seconds=0.0,
    )
    sources = (pipeline.ListSource(train_records), pipeline.ListSource(val_records), info)
    return dataset.InputData(config, sources=sources)


def run_worker(name: str, args: dict[str, Any], devices: int = 4, timeout: int = 420) -> dict:
    """Runs `worker_<name>(**args)` of this file in a fresh process with `devices` fake CPU
    devices (their number must be set before jax is imported)."""
    env = cache_env(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    result = subprocess.run([sys.executable, __file__, name, json.dumps(args)], env=env,
                            capture_output=True, text=True, timeout=timeout, cwd=str(REPO),
                            check=False)
    if result.returncode != 0:
        raise AssertionError(f"worker {name} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ workers


def worker_equivalence(steps: int = 3) -> dict:
    """The BYOL state after `steps` steps on one device (jit), under pmap and under jit on
    every (fake) device: the same batches, the same init. Returns the max abs differences."""
    import functools

    import jax

    from isic_jax.data import image_ops
    from isic_jax.models import create_model
    from isic_jax.pretraining import byol, views
    from isic_jax.training import parallel
    from isic_jax.training.optim import create_optimizer

    # SGD: Adam would turn the rounding noise of gradients that are zero in exact arithmetic
    # (the projector's bias before its BatchNorm) into +-lr updates.
    config = pretrain_config(**{"optim.name": "sgd", "optim.learning_rate": 0.05})
    rs = np.random.RandomState(0)
    batch, size = 8, 32
    batches = [{"image": rs.randint(0, 256, (batch, size, size, 3)).astype(np.uint8),
                "position": np.arange(i * batch, (i + 1) * batch, dtype=np.uint32)}
               for i in range(steps)]
    tx, _ = create_optimizer(config.optim, 10, 10)
    mean, std = image_ops.normalization(config.data)
    view_config = views.ViewConfig.from_config(config.pretrain.views, mean, std)
    p = config.pretrain
    sizes = dict(projector_hidden=int(p.projector_hidden), projection_dim=int(p.projection_dim),
                 predictor_hidden=int(p.predictor_hidden))
    init_nets = byol.Networks.create(create_model(config.model, 2), **sizes)
    results = {}
    for name, mode, devices in [("single", "jit", jax.devices()[:1]),
                                ("pmap", "pmap", jax.devices()), ("jit", "jit", jax.devices())]:
        par = parallel.DataParallel.create(mode, devices)
        nets = byol.Networks.create(create_model(config.model, 2, axis_name=par.axis_name),
                                    **sizes)
        state = byol.create_state(init_nets, tx, jax.random.key(0), size)
        step = par.compile_train_step(functools.partial(
            byol.train_step, nets=nets, tx=tx, views=view_config, axis_name=par.axis_name,
            base_decay=0.9, total_updates=steps))
        state, rng = par.replicate(state), par.replicate(jax.random.key(1))
        losses = []
        for b in batches:
            state, metrics = step(state, par.shard_batch(b), rng)
            losses.append(float(np.asarray(jax.device_get(metrics["loss"])).reshape(-1)[0]))
        results[name] = (jax.device_get(par.unreplicate(state)), losses)

    def max_diff(a, b):
        return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

    ref, ref_losses = results["single"]
    report = {"devices": len(jax.devices())}
    for name in ("pmap", "jit"):
        out, losses = results[name]
        report[name] = {
            "params": max_diff(ref.params, out.params),
            "target": max_diff(ref.target, out.target),
            "batch_stats": max_diff(ref.batch_stats, out.batch_stats),
            "loss": max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)),
        }
    report["moved"] = max_diff(ref.params, jax.device_get(
        byol.create_state(init_nets, tx, jax.random.key(0), size)).params)
    return report


if __name__ == "__main__":
    name, raw = sys.argv[1], sys.argv[2]
    out = globals()[f"worker_{name}"](**json.loads(raw))
    print(json.dumps(out, default=float))
