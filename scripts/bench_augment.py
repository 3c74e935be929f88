"""What each augmentation and regulariser adds to a training step on this CPU, side by side.

    python scripts/bench_augment.py                 # ResNet-18, 112 px, batch 32 (~15 min, 2 cores)
    python scripts/bench_augment.py --only none,blur,mixup --steps 3
    python scripts/bench_augment.py --json          # one JSON line at the end as well

For every variant, the real jitted train step (`steps.train_step`: device augmentation, model,
loss, AdamW, on a uint8 batch already on the device, as the input pipeline ships it) is compiled
and timed in --rounds rounds of --steps steps, each round right after the same steps of the
baseline "none" ("added ms" = the median of the per-round differences: a shared machine's load
hits both alike). The variants: "none" (normalisation only), "default" (configs/default.py:
flips, rotation 30, colour jitter), each op of `augment_table` alone at p = 1 with
configs/default.py's strengths (on top of "none"), "all" (default + every op at p = 1,
mixup/cutmix 0.5 each), and the regularisers: "msd5" (multi-sample dropout, 5 masks, dropout
0.5) and "swa" (a SWA snapshot at every step: the worst case; a real run takes one per epoch).

"alone ms" is the variant's own work by itself (jitted, best round): the augmentation
(`device_augment.augment_batch` + `mixing.mix_batch`) for the augmentation variants, the head's
forward + backward with its masks for "msd5", one snapshot (`swa.add_snapshot` of the model's
weights) for "swa". On a loaded machine the step-time difference is noisy; "alone ms" is the
cleaner figure of what a variant adds.

Then the host pipeline (Grain, in this process: JPEG decode + random resized crop + batch, on
in-memory JPEGs at --stored px) with configs/default.py's augmentation and with every device op
on: the img/s must be the same (the device ops never run on the host).
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

NEW_OPS = ("affine", "elastic", "gamma", "blur", "noise", "cutout", "mixup", "cutmix")
VARIANTS = ("none", "default", *NEW_OPS, "all", "msd5", "swa")
_OFF = {"dihedral": False, "rotation": 0.0, "brightness": 0.0, "contrast": 0.0,
        "saturation": 0.0, "hue": 0.0, "color_constancy": False}


def variant_overrides(name: str) -> dict[str, object]:
    """Config overrides ("data.augment.x": v, "model.y": v) of one variant."""
    off = {f"data.augment.{k}": v for k, v in _OFF.items()}
    if name == "none":
        return off
    if name == "default":
        return {}
    if name in NEW_OPS:
        return {**off, f"data.augment.{name}_p": 1.0}
    if name == "all":
        ops = {f"data.augment.{op}_p": 1.0 for op in NEW_OPS if op not in ("mixup", "cutmix")}
        return {**ops, "data.augment.mixup_p": 0.5, "data.augment.cutmix_p": 0.5}
    if name == "msd5":
        return {**off, "model.msd_samples": 5, "model.dropout": 0.5}
    if name == "swa":
        return off
    raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")


def make_config(name: str, model: str, width: int, size: int, batch: int):
    from isic_jax.configs import default

    from isic_jax import config_utils

    config = default.get_config()
    config.model.name, config.model.width, config.model.dtype = model, width, "float32"
    config.data.image_size, config.data.stored_size = size, max(size, 32)
    config.train.batch_size = batch
    config.loss.label_smoothing = 0.0
    config.update_from_flattened_dict(variant_overrides(name))
    config_utils.validate_config(config)
    return config


def build_variant(name: str, args: argparse.Namespace) -> dict[str, object]:
    """{"train": one train step (blocking), "aug": one augmentation-only call (blocking)}."""
    import jax
    import numpy as np

    from isic_jax.data import device_augment, mixing
    from isic_jax.models import create_model
    from isic_jax.training import parallel, steps, swa
    from isic_jax.training import state as train_state
    from isic_jax.training.optim import create_optimizer

    config = make_config(name, args.model, args.width, args.size, args.batch)
    par = parallel.DataParallel.create("jit", jax.devices()[:1])
    tx, _ = create_optimizer(config.optim, total_steps=1000, steps_per_epoch=100)
    model = create_model(config.model, 2)
    schedule = swa.SwaSchedule(start=1, every=1) if name == "swa" else None
    state = train_state.create_train_state(model, tx, jax.random.PRNGKey(0), args.size,
                                           use_swa=schedule is not None)
    augment = steps.augment_config(config)
    step = par.compile_train_step(functools.partial(
        steps.train_step, model=model, tx=tx, loss_config=config.loss, augment=augment,
        swa=schedule))
    rs = np.random.RandomState(0)
    host = {"image": rs.randint(0, 256, (args.batch, args.size, args.size, 3)).astype(np.uint8),
            "label": (np.arange(args.batch) % 2).astype(np.int32),
            "mask": np.ones(args.batch, bool),
            "position": np.arange(args.batch, dtype=np.uint32)}
    batch = par.shard_batch(host)
    rng = par.replicate(jax.random.PRNGKey(1))
    holder = {"state": par.replicate(state)}

    def train_once() -> None:
        holder["state"], metrics = step(holder["state"], batch, rng)
        jax.block_until_ready(metrics)

    @jax.jit
    def aug_only(b, r):
        images = device_augment.augment_batch(
            b["image"], jax.random.fold_in(r, device_augment.AUGMENT_STREAM), augment,
            example_ids=b["position"])
        if augment.has_mixing:
            images, _ = mixing.mix_batch(images, b["label"], r, augment,
                                         positions=b["position"])
        return images

    alone = lambda: jax.block_until_ready(aug_only(batch, rng))  # noqa: E731
    if name == "swa":  # one snapshot of the model's weights
        snapshot = jax.jit(swa.add_snapshot)
        alone = lambda: jax.block_until_ready(  # noqa: E731
            snapshot(holder["state"].swa, holder["state"].params, holder["state"].batch_stats))
    elif name == "msd5":  # the head's forward + backward with its 5 masks
        alone = _head_alone(config, args.batch, holder["state"].params["head"])
    train_once()  # compile
    return {"train": train_once, "aug": alone}


def _head_alone(config, batch: int, head_params):
    """A blocking call: value and gradient of a cross-entropy through `classifier_head` (with
    config.model's dropout and msd_samples) on random pooled features."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from isic_jax.models.head import classifier_head

    class Head(nn.Module):
        @nn.compact
        def __call__(self, x):
            return classifier_head(x, num_classes=2, dropout=float(config.model.dropout),
                                   msd_samples=int(config.model.msd_samples), train=True)

    head_params = jax.tree.map(jnp.copy, head_params)  # the train step donates the state
    features = jax.random.normal(jax.random.PRNGKey(0), (batch, head_params["kernel"].shape[0]))
    labels = jnp.arange(batch) % 2

    @jax.jit
    def fwd_bwd(params, x):
        def loss(p):
            logits = Head().apply({"params": {"head": p}}, x,
                                  rngs={"dropout": jax.random.PRNGKey(1)})
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(batch), labels])
        return jax.value_and_grad(loss)(params)

    return lambda: jax.block_until_ready(fwd_bwd(head_params, features))


def _seconds(call, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - start) / n


def time_variant(variant: dict, base: dict | None, args: argparse.Namespace) -> dict[str, float]:
    """{"step_ms", "added_ms", "aug_ms"}: `args.rounds` rounds, each timing `args.steps` steps of
    the baseline and then of the variant (the machine is shared: a load change hits both of a
    round alike); step_ms is the variant's best round, added_ms the median of the per-round
    differences to the baseline."""
    import statistics

    from bench_train import best_seconds

    own, diffs = [], []
    for _ in range(args.rounds):
        before = _seconds(base["train"], args.steps) if base is not None else None
        t = _seconds(variant["train"], args.steps)
        own.append(t)
        if before is not None:
            diffs.append(t - before)
    variant["aug"]()  # compile
    aug = best_seconds(variant["aug"], max(3, args.steps), args.rounds, warmup=1)
    row = {"step_ms": 1e3 * min(own), "aug_ms": 1e3 * aug}
    if diffs:
        row["added_ms"] = 1e3 * statistics.median(diffs)
    return row


def host_rates(augments: dict[str, dict], args: argparse.Namespace) -> dict[str, float]:
    """img/s of the host training pipeline (no workers) for each `config.data.augment`, rounds
    interleaved (A, B, A, B, ...) so that the load of the machine hits them alike."""
    import ml_collections
    from bench_train import _records

    from isic_jax.data import pipeline

    records = pipeline.ListSource(_records(max(64, args.batch * 2), args.stored))
    iterators = {}
    for name, augment in augments.items():
        config = make_config("default", args.model, args.width, args.size, args.batch)
        config.data.num_workers = 0
        config.data.augment = ml_collections.ConfigDict(augment)
        iterators[name] = iter(pipeline.create_train_dataset(records, config.data, args.batch,
                                                             seed=0))
        next(iterators[name])  # warm up
    best = dict.fromkeys(augments, 0.0)
    for _ in range(max(3, args.rounds)):
        for name, it in iterators.items():
            start = time.perf_counter()
            for _ in range(args.host_batches):
                next(it)
            rate = args.host_batches * args.batch / (time.perf_counter() - start)
            best[name] = max(best[name], rate)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default=",".join(VARIANTS), help="comma list of variants")
    parser.add_argument("--stored", type=int, default=128, help="stored JPEG side, host bench")
    parser.add_argument("--host-batches", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    args = parser.parse_args()

    from bench_train import _set_cpu_flags

    _set_cpu_flags()  # the XLA flags `isic-jax train` uses on CPU (before jax is imported)
    import jax

    names = [n.strip() for n in args.only.split(",") if n.strip()]
    for name in names:
        variant_overrides(name)  # unknown names fail before anything compiles
    print(f"{args.model} at {args.size} px, batch {args.batch}, float32, "
          f"{jax.devices()[0].platform} ({jax.device_count()} device(s) visible, 1 used); "
          f"{args.rounds} rounds of {args.steps} steps, each after the same of 'none'")
    rows = {}
    base = build_variant("none", args) if names != ["none"] else None
    print(f"{'variant':<9} {'step ms':>9} {'added ms':>9} {'added %':>8} {'alone ms':>9}")
    for name in names:
        variant = base if name == "none" and base is not None else build_variant(name, args)
        row = time_variant(variant, base if name != "none" else None, args)
        rows[name] = row
        ref = rows.get("none", {}).get("step_ms")
        added = (f"{row['added_ms']:>9.1f} {100 * row['added_ms'] / ref:>7.1f}%"
                 if "added_ms" in row and ref else f"{'-':>9} {'-':>8}")
        print(f"{name:<9} {row['step_ms']:>9.1f} {added} {row['aug_ms']:>9.2f}", flush=True)
        del variant

    from isic_jax.configs import default

    defaults = dict(default.get_config().data.augment)
    every = {**defaults, **{f"{op}_p": 1.0 for op in NEW_OPS if op not in ("mixup", "cutmix")},
             "mixup_p": 0.5, "cutmix_p": 0.5}
    host = host_rates({"default": defaults, "every device op on": every}, args)
    print(f"host pipeline ({args.stored} px JPEG -> crop {args.size}, batch {args.batch}, "
          f"1 thread): " + ", ".join(f"{k} {v:.0f} img/s" for k, v in host.items()))
    if args.json:
        print(json.dumps({"config": vars(args), "steps": rows, "host_img_per_s": host}))


if __name__ == "__main__":
    main()
