"""The pure steps: `train_step(state, batch, rng)` and `eval_step(state, batch)`.

    step = functools.partial(train_step, model=model, tx=tx, loss_config=config.loss,
                             class_weights=weights, axis_name=par.axis_name, ema_decay=0.999)
    state, metrics = step(state, batch, rng)      # pure: pmap and jit wrap this same function
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from isic_jax.data import device_augment, image_ops, mixing
from isic_jax.models import part_of
from isic_jax.training import swa as swa_lib
from isic_jax.training.losses import compute_loss
from isic_jax.training.optim import ema_update
from isic_jax.training.state import TrainState

PyTree = Any


def _applied_update(opt_state: PyTree) -> jax.Array | bool:
    """Whether the last `tx.update` applied an update (False inside a MultiSteps accumulation)."""
    if isinstance(opt_state, optax.MultiStepsState):
        return jnp.logical_and(opt_state.mini_step == 0, opt_state.gradient_step > 0)
    return True



def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    model: flax.linen.Module,
    tx: optax.GradientTransformation,
    loss_config: Any,
    class_weights: np.ndarray | None = None,
    axis_name: str | None = None,
    ema_decay: float = 0.0,
    augment: Any = None,
    frozen_parts: tuple[str, ...] = (),
    swa: swa_lib.SwaSchedule | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser micro-step. Pure; collectives only when `axis_name` is given (pmap).

    Args:
      state: TrainState (pmap: this device's copy).
      batch: image uint8 [B, H, W, 3] (host-cropped; augmented and normalised here by
        `device_augment.augment_batch`) or float32 (already normalised, used as is), label
        int32 [B], mask bool [B], position uint32 [B] (the example's place in the training
        stream: its augmentation key). B: this device's share under pmap, the global batch
        under jit.
      rng: the run's PRNG key (typed; raw uint32 [2] works too), the same on every device.
        Augmentation uses fold_in(rng, AUGMENT_STREAM) and the positions (identical whatever
        the device count); dropout uses fold_in(rng, step) (and the pmap device index).
      model: from `create_model(..., axis_name=axis_name)`.
      tx: from `optim.create_optimizer`.
      loss_config: `config.loss`.
      class_weights: float32 [C] or None.
      axis_name: pmap axis: gradients and metrics are `lax.pmean`-ed over it. None under jit
        (the batch is global; XLA reduces across devices itself).
      ema_decay: > 0 updates `state.ema` after each applied optimiser update.
      augment: `device_augment.DeviceAugmentConfig` (from config.data.augment); None: no
        rotation/colour jitter, only normalisation. With mixup_p / cutmix_p > 0 the augmented
        inputs are then mixed in pairs and the loss takes soft targets (`data.mixing`).
      frozen_parts: ResNet parts (`models.part_of`) that do not train
        (`optim.FineTune.frozen_parts`): their gradients are stopped, so XLA drops their
        backward pass (the optimiser gives them no update either).
      swa: `swa.SwaSchedule`: adds a snapshot to `state.swa` at its steps (None: SWA off).

    Returns:
      (new state, metrics) with metrics float32 scalars: loss (mean over the global batch),
      accuracy, grad_norm (of the averaged gradient).
    """
    step_rng = jax.random.fold_in(rng, state.step)
    if axis_name is not None:
        # Different dropout masks per device, as one global draw would give.
        step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))
    images = train_inputs(batch, rng, augment, axis_name)
    weights = batch["mask"].astype(jnp.float32)
    labels = batch["label"].astype(jnp.int32)
    mix = None
    if augment is not None and augment.has_mixing:
        images, mix = mixing.mix_batch(images, labels, rng, augment,
                                       positions=batch.get("position"), axis_name=axis_name)

    def loss_fn(params):
        if frozen_parts:
            params = {name: jax.lax.stop_gradient(sub) if part_of(name) in frozen_parts else sub
                      for name, sub in params.items()}
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            metadata=batch.get("metadata"),
            mutable=["batch_stats"],
            rngs={"dropout": step_rng},
        )
        loss = compute_loss(
            logits, labels, weights, loss_config, class_weights, axis_name=axis_name, mix=mix
        )
        return loss, (logits, updates.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    count = jnp.sum(weights)
    correct_sum = jnp.sum(correct * weights)
    if axis_name is not None:
        # compute_loss normalised by the global weight sum / n: pmean gives the global mean.
        grads = jax.lax.pmean(grads, axis_name)
        loss = jax.lax.pmean(loss, axis_name)
        count = jax.lax.psum(count, axis_name)
        correct_sum = jax.lax.psum(correct_sum, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    ema = state.ema
    if ema_decay > 0 and ema:
        new_vars = {"params": params, "batch_stats": batch_stats}
        updated = ema_update(ema, new_vars, ema_decay)
        applied = _applied_update(opt_state)
        ema = jax.tree.map(lambda u, o: jnp.where(applied, u, o), updated, ema)
    averaged = state.swa
    if swa is not None and averaged:
        averaged = swa_lib.maybe_snapshot(averaged, state.step + 1, params, batch_stats, swa,
                                          _applied_update(opt_state))

    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        ema=ema,
        swa=averaged,
    )
    metrics = {
        "loss": loss,
        "accuracy": correct_sum / jnp.maximum(count, 1.0),
        "grad_norm": optax.tree.norm(grads),
    }
    return new_state, metrics


def _no_augment() -> Any:
    return device_augment.DeviceAugmentConfig()


def augment_config(config: ml_collections.ConfigDict) -> Any:
    """The device half of config.data.augment, with the run's input normalisation
    (config.data.mean/std; ImageNet's when unset). Static, hashable."""
    mean, std = image_ops.normalization(config.data)
    return dataclasses.replace(
        device_augment.DeviceAugmentConfig.from_config(config.data.augment),
        mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
    )


def train_inputs(
    batch: dict[str, jax.Array], rng: jax.Array, augment: Any, axis_name: str | None
) -> jax.Array:
    """Model input float32 [B, H, W, 3] from a train batch (see `train_step`)."""
    images = batch["image"]
    if images.dtype != jnp.uint8:
        return images.astype(jnp.float32)

    aug_rng = jax.random.fold_in(rng, device_augment.AUGMENT_STREAM)
    positions = batch.get("position")
    if positions is None and axis_name is not None:
        # Without positions the keys are split over the local batch: differ per device.
        aug_rng = jax.random.fold_in(aug_rng, jax.lax.axis_index(axis_name))
    return device_augment.augment_batch(
        images, aug_rng, augment or _no_augment(), example_ids=positions
    )


# What the steps read from a batch; only these go to the devices (ids stay on the host).
TRAIN_KEYS = ("image", "label", "mask", "position", "metadata")
EVAL_KEYS = ("image", "metadata")


def device_batch(batch: dict[str, np.ndarray], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The entries of a host batch a step needs; positions as uint32 (what fold_in takes; JAX
    has no int64 without x64)."""
    out = {k: batch[k] for k in keys if k in batch}
    if "position" in out:
        out["position"] = (np.asarray(out["position"]) % 2**32).astype(np.uint32)
    return out


def eval_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: flax.linen.Module,
    augment: Any = None,
) -> jax.Array:
    """Class probabilities (EMA weights when kept). Pure, no collectives.

    Args:
      batch: image uint8 [B, H, W, 3] (normalised here by `device_augment.preprocess_eval`,
        with colour constancy if `augment` asks for it) or float32 already normalised;
        metadata float32 [B, F] for a model with a metadata branch.
      augment: `device_augment.DeviceAugmentConfig` or None.

    Returns:
      float32 [B, C] softmax probabilities.
    """
    return embed_step(state, batch, model=model, augment=augment)[0]


def embed_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: flax.linen.Module,
    augment: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """`eval_step` that also returns the penultimate features: (probabilities float32 [B, C],
    embedding float32 [B, D]) (pooled image features, with the metadata branch's)."""
    images = batch["image"]
    if images.dtype == jnp.uint8:
        images = device_augment.preprocess_eval(images, augment or _no_augment())
    logits, embedding = model.apply(state.eval_variables(), images, train=False,
                                    metadata=batch.get("metadata"), return_embedding=True)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1), embedding


@jax.jit
def tree_all_finite(tree: PyTree) -> jax.Array:
    """bool []: every float leaf of `tree` is finite."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    if not leaves:
        return jnp.array(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
