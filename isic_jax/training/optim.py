"""Optimiser, learning-rate schedule and weight EMA.

    tx, schedule = create_optimizer(config.optim, total_steps, steps_per_epoch)  # in updates

The transformation is, in order: clip by global norm (if `grad_clip_norm` > 0) -> SGD: add
weight decay (masked) then Nesterov momentum and the learning rate, as the ImageNet recipes; or
AdamW with decoupled weight decay (masked; like PyTorch's AdamW the decay is scaled by the
learning rate) -> wrapped in `optax.MultiSteps` when `accumulation_steps` > 1.

Steps count optimiser updates. Under accumulation with k micro-batches per update, the inner
optimiser (and its schedule) advances once per k calls of `tx.update`, so pass `total_steps` and
`steps_per_epoch` in updates (micro-steps // k), and log `schedule(micro_step // k)`.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

OPTIMIZER_NAMES: tuple[str, ...] = ("sgd", "adamw")


def weight_decay_mask(params: Any) -> Any:
    """True for the leaves that get weight decay: kernels with ndim > 1 (conv and dense).

    BatchNorm scales/biases and dense biases (ndim 1) are not decayed: decaying them only fights
    the normalisation and hurts accuracy (Goyal et al. 2017, "no bias decay").

    Args:
      params: pytree of arrays (or ShapeDtypeStruct).

    Returns:
      The same tree structure with bool leaves.
    """
    return jax.tree.map(lambda p: p.ndim > 1, params)


def create_schedule(optim_config: Any, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then cosine decay to lr * `end_lr_factor`.

    Warmup lasts round(warmup_epochs * steps_per_epoch) updates, capped at total_steps - 1 so
    that short runs still decay; the value at `total_steps` (and after) is the end value.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
    peak = float(optim_config.learning_rate)
    warmup_steps = int(round(float(optim_config.warmup_epochs) * steps_per_epoch))
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,  # optax: the total length, warmup included
        end_value=peak * float(optim_config.end_lr_factor),
    )


def create_optimizer(
    optim_config: Any, total_steps: int, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds the optimiser named by `optim_config.name` and its learning-rate schedule.

    Args:
      optim_config: `config.optim` with name ("sgd" | "adamw"), learning_rate, momentum (sgd),
        nesterov (sgd, default True), weight_decay, warmup_epochs, end_lr_factor,
        grad_clip_norm (0 disables), accumulation_steps (1 disables).
      total_steps: length of the run in optimiser updates (micro-steps // accumulation_steps).
      steps_per_epoch: optimiser updates per epoch (sets the warmup length).

    Returns:
      (tx, schedule): tx maps gradients to updates (`optax.apply_updates` adds them); its
      `update` needs `params` (weight decay). schedule(update_step) -> learning rate.

    Raises:
      ValueError: unknown `config.optim.name`, or accumulation_steps < 1.
    """
    name = optim_config.name
    if name not in OPTIMIZER_NAMES:
        raise ValueError(
            f"Unknown config.optim.name={name!r}; known: {', '.join(OPTIMIZER_NAMES)}."
        )
    schedule = create_schedule(optim_config, total_steps, steps_per_epoch)
    weight_decay = float(optim_config.weight_decay)

    parts: list[optax.GradientTransformation] = []
    clip = float(getattr(optim_config, "grad_clip_norm", 0.0))
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    if name == "sgd":
        if weight_decay > 0:
            parts.append(optax.add_decayed_weights(weight_decay, mask=weight_decay_mask))
        momentum = float(optim_config.momentum)
        parts.append(
            optax.sgd(
                schedule,
                momentum=momentum if momentum > 0 else None,
                nesterov=bool(getattr(optim_config, "nesterov", True)) and momentum > 0,
            )
        )
    else:
        parts.append(optax.adamw(schedule, weight_decay=weight_decay, mask=weight_decay_mask))
    tx = optax.chain(*parts)

    k = int(getattr(optim_config, "accumulation_steps", 1))
    if k < 1:
        raise ValueError(f"config.optim.accumulation_steps must be >= 1, got {k}.")
    if k > 1:
        # Averages k micro-batch gradients, then applies one inner update (zeros in between).
        tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
    return tx, schedule


def ema_update(ema_params: Any, params: Any, decay: float | jax.Array) -> Any:
    """One step of an exponential moving average: decay * ema + (1 - decay) * params.

    Pure (jit/pmap friendly). Works on any pytree of float arrays: apply it to `params` and,
    for evaluation with EMA weights, to `batch_stats` too. Returns a new pytree.
    """
    return optax.incremental_update(params, ema_params, step_size=1.0 - decay)
