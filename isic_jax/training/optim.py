"""Optimiser, learning-rate schedule and weight EMA.

    tx, schedule = create_optimizer(config.optim, total_steps, steps_per_epoch)  # in updates

The transformation is, in order: clip by global norm (if `grad_clip_norm` > 0) -> SGD: add
weight decay (masked) then Nesterov momentum and the learning rate, as the ImageNet recipes; or
AdamW with decoupled weight decay (masked; like PyTorch's AdamW the decay is scaled by the
learning rate); or LARS (You et al. 2017; trust coefficient 1e-3, momentum; weight decay and the
trust ratio masked alike, as BYOL and SimCLR run it for large-batch self-supervised
pretraining) -> wrapped in `optax.MultiSteps` when `accumulation_steps` > 1.

Steps count optimiser updates. Under accumulation with k micro-batches per update, the inner
optimiser (and its schedule) advances once per k calls of `tx.update`, so pass `total_steps` and
`steps_per_epoch` in updates (micro-steps // k), and log `schedule(micro_step // k)`.

Fine-tuning (`config.finetune`, `FineTune`): the parameters are split by model part
(`models.part_of`; `models.model_parts` lists a model's parts, e.g. stem, stage1..N for a ResNet,
stem, block1..12, final for a ViT, then the head) with `optax.partition`, one optimiser per part:

- the head follows the schedule above; every other part gets lr * backbone_lr_mult *
  layer_decay**depth, depth 1 for the last part ... N + 1 for the first (the stem);
- head_warmup_epochs > 0: for that many epochs the backbone gets no update (its gradients are
  zeroed before clipping, its learning rate is 0), then it starts its own linear warmup
  (warmup_epochs long) and cosine decay to the end of the run, as timm/Kaggle pipelines do when
  they unfreeze a backbone;
- freeze_stages = k > 0: the first k parts (the stem and the first k-1 stages) get no update,
  no weight decay and no optimiser state (`optax.set_to_zero`); the train step also stops
  their gradients, so XLA skips their backward pass, and their BatchNorm statistics stay fixed
  (`frozen_bn_parts`).

With every fine-tuning key at its default the optimiser is exactly the plain one above (same
state tree: checkpoints of earlier runs still resume).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from isic_jax.models import part_of

OPTIMIZER_NAMES: tuple[str, ...] = ("sgd", "adamw", "lars")
LARS_TRUST_COEFFICIENT = 1e-3  # BYOL's eta
FROZEN = "frozen"  # optax.partition label of frozen parameters
HEAD = "head"


@dataclasses.dataclass(frozen=True)
class FineTune:
    """`config.finetune` (all defaults: plain training). See the module docstring."""

    backbone_lr_mult: float = 1.0
    layer_decay: float = 1.0
    freeze_stages: int = 0
    freeze_bn: bool = False
    head_warmup_epochs: float = 0.0

    @classmethod
    def from_config(cls, finetune_config: Any = None) -> FineTune:
        """From `config.finetune` (a ConfigDict or dict); None or missing keys: defaults (configs
        saved before these keys existed)."""
        if finetune_config is None:
            return cls()
        kwargs = {f.name: finetune_config[f.name]
                  for f in dataclasses.fields(cls) if f.name in finetune_config}
        return cls(
            backbone_lr_mult=float(kwargs.get("backbone_lr_mult", 1.0)),
            layer_decay=float(kwargs.get("layer_decay", 1.0)),
            freeze_stages=int(kwargs.get("freeze_stages", 0)),
            freeze_bn=bool(kwargs.get("freeze_bn", False)),
            head_warmup_epochs=float(kwargs.get("head_warmup_epochs", 0.0)),
        )

    @property
    def splits_parameters(self) -> bool:
        """Whether the optimiser treats parts differently (optax.partition)."""
        return (self.backbone_lr_mult != 1.0 or self.layer_decay != 1.0
                or self.freeze_stages > 0 or self.head_warmup_epochs > 0)

    def frozen_parts(self, parts: tuple[str, ...]) -> tuple[str, ...]:
        """The frozen parts of a model whose backbone parts are `parts` (input to output,
        `models.model_parts`): () for 0, ("stem",) for 1, ("stem", "stage1") for 2, ...

        Raises:
          ValueError: more parts than the backbone has.
        """
        k = int(self.freeze_stages)
        if k > len(parts):
            raise ValueError(
                f"config.finetune.freeze_stages={k} exceeds this model's {len(parts)} parts "
                f"({', '.join(parts)}); the head always trains.")
        return tuple(parts[:k])

    def frozen_bn_parts(self, parts: tuple[str, ...]) -> tuple[str, ...]:
        """Parts whose BatchNorm keeps its running statistics in training (`create_model`'s
        frozen_bn): every part with freeze_bn, else the frozen parts."""
        if self.freeze_bn:
            return tuple(parts)
        return self.frozen_parts(parts)


def part_depth(part: str, parts: tuple[str, ...]) -> int:
    """0 for the head, 1 for the last backbone part ... len(parts) for the first (the stem):
    the layer-decay exponent."""
    if part == HEAD:
        return 0
    return len(parts) - parts.index(part)


def param_labels(params: Any, frozen: tuple[str, ...] = ()) -> Any:
    """The part of every parameter leaf (`models.part_of` of its top-level module), or FROZEN;
    the same tree structure with str leaves."""
    labels = {}
    for name, sub in params.items():
        part = part_of(name)
        label = FROZEN if part in frozen else part
        labels[name] = jax.tree.map(lambda _, label=label: label, sub)
    return labels


class GradMaskState(NamedTuple):
    """Updates seen by `mask_gradients` (int32 [])."""

    count: jax.Array


def mask_gradients(frozen: tuple[str, ...], head_only_steps: int) -> optax.GradientTransformation:
    """Zeroes the gradients of frozen parts always, and of every part but the head during the
    first `head_only_steps` updates; placed first, so that clipping sees only what trains."""

    def init(params: Any) -> GradMaskState:
        del params
        return GradMaskState(count=jnp.zeros([], jnp.int32))

    def update(updates: Any, state: GradMaskState, params: Any = None):
        del params
        labels = param_labels(updates, frozen)
        warm = state.count < head_only_steps

        def one(g: jax.Array, label: str) -> jax.Array:
            if label == FROZEN:
                return jnp.zeros_like(g)
            if label != HEAD and head_only_steps > 0:
                return jnp.where(warm, jnp.zeros_like(g), g)
            return g

        return jax.tree.map(one, updates, labels), GradMaskState(count=state.count + 1)

    return optax.GradientTransformation(init, update)


# Leaves with ndim > 1 that are no kernels: a ViT's class token and position embedding (timm's
# `no_weight_decay`).
NO_WEIGHT_DECAY: tuple[str, ...] = ("cls_token", "pos_embed")


def weight_decay_mask(params: Any) -> Any:
    """True for the leaves that get weight decay: kernels with ndim > 1 (conv and dense), not
    a ViT's class token and position embedding (`NO_WEIGHT_DECAY`).

    Normalisation scales/biases, dense biases and layer scales (ndim 1) are not decayed:
    decaying them only fights the normalisation and hurts accuracy (Goyal et al. 2017, "no bias
    decay").

    Args:
      params: pytree of arrays (or ShapeDtypeStruct).

    Returns:
      The same tree structure with bool leaves.
    """

    def decays(path: tuple, p: Any) -> bool:
        name = getattr(path[-1], "key", None) if path else None
        return p.ndim > 1 and name not in NO_WEIGHT_DECAY

    return jax.tree_util.tree_map_with_path(decays, params)


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
    optim_config: Any,
    total_steps: int,
    steps_per_epoch: int,
    finetune_config: Any = None,
    parts: tuple[str, ...] = ("stem", "stage1", "stage2", "stage3", "stage4"),
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds the optimiser named by `optim_config.name` and its learning-rate schedule.

    Args:
      optim_config: `config.optim` with name ("sgd" | "adamw" | "lars"), learning_rate,
        momentum (sgd, lars),
        nesterov (sgd, default True), weight_decay, warmup_epochs, end_lr_factor,
        grad_clip_norm (0 disables), accumulation_steps (1 disables).
      total_steps: length of the run in optimiser updates (micro-steps // accumulation_steps).
      steps_per_epoch: optimiser updates per epoch (sets the warmup length).
      finetune_config: `config.finetune` (None: plain training); see the module docstring.
      parts: the model's backbone parts, input to output (`models.model_parts(config.model)`):
        layer depths and the parts freeze_stages counts.

    Returns:
      (tx, schedule): tx maps gradients to updates (`optax.apply_updates` adds them); its
      `update` needs `params` (weight decay). schedule(update_step) -> learning rate (of the
      head when fine-tuning controls split the parameters).

    Raises:
      ValueError: unknown `config.optim.name`, accumulation_steps < 1, or freeze_stages past
        the model's stages.
    """
    name = optim_config.name
    if name not in OPTIMIZER_NAMES:
        raise ValueError(
            f"Unknown config.optim.name={name!r}; known: {', '.join(OPTIMIZER_NAMES)}."
        )
    schedule = create_schedule(optim_config, total_steps, steps_per_epoch)
    weight_decay = float(optim_config.weight_decay)

    def base(lr: optax.Schedule) -> optax.GradientTransformation:
        if name == "sgd":
            momentum = float(optim_config.momentum)
            sgd = optax.sgd(
                lr,
                momentum=momentum if momentum > 0 else None,
                nesterov=bool(getattr(optim_config, "nesterov", True)) and momentum > 0,
            )
            if weight_decay > 0:
                return optax.chain(
                    optax.add_decayed_weights(weight_decay, mask=weight_decay_mask), sgd)
            return sgd
        if name == "lars":
            # Biases and BatchNorm parameters: no weight decay and no trust-ratio scaling.
            return optax.lars(lr, weight_decay=weight_decay, weight_decay_mask=weight_decay_mask,
                              trust_coefficient=LARS_TRUST_COEFFICIENT,
                              trust_ratio_mask=weight_decay_mask,
                              momentum=float(optim_config.momentum))
        return optax.adamw(lr, weight_decay=weight_decay, mask=weight_decay_mask)

    ft = FineTune.from_config(finetune_config)
    chain: list[optax.GradientTransformation] = []
    if ft.splits_parameters:
        frozen = ft.frozen_parts(parts)
        head_only = _head_only_steps(ft, total_steps, steps_per_epoch)
        chain.append(mask_gradients(frozen, head_only))
    clip = float(getattr(optim_config, "grad_clip_norm", 0.0))
    if clip > 0:
        chain.append(optax.clip_by_global_norm(clip))
    if not ft.splits_parameters:
        chain.append(base(schedule))
    else:
        transforms: dict[str, optax.GradientTransformation] = {HEAD: base(schedule)}
        for part in parts:
            if part not in frozen:
                factor = ft.backbone_lr_mult * ft.layer_decay ** part_depth(part, parts)
                transforms[part] = base(backbone_schedule(
                    optim_config, total_steps, steps_per_epoch, factor, head_only))
        if frozen:
            transforms[FROZEN] = optax.set_to_zero()
        chain.append(optax.partition(
            transforms, lambda params: param_labels(params, frozen)))
    tx = optax.chain(*chain)

    k = int(getattr(optim_config, "accumulation_steps", 1))
    if k < 1:
        raise ValueError(f"config.optim.accumulation_steps must be >= 1, got {k}.")
    if k > 1:
        # Averages k micro-batch gradients, then applies one inner update (zeros in between).
        tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
    return tx, schedule


def _head_only_steps(ft: FineTune, total_steps: int, steps_per_epoch: int) -> int:
    steps = int(round(ft.head_warmup_epochs * steps_per_epoch))
    return max(0, min(steps, total_steps - 1))


def backbone_schedule(
    optim_config: Any, total_steps: int, steps_per_epoch: int, factor: float,
    head_only_steps: int,
) -> optax.Schedule:
    """factor x the head's schedule; with a head-only warm-up: 0 for `head_only_steps` updates,
    then a warmup (warmup_epochs) + cosine of its own over the rest of the run."""
    if head_only_steps <= 0:
        head = create_schedule(optim_config, total_steps, steps_per_epoch)
        return lambda step: factor * head(step)
    rest = create_schedule(optim_config, max(1, total_steps - head_only_steps), steps_per_epoch)
    return optax.join_schedules(
        [optax.constant_schedule(0.0), lambda step: factor * rest(step)], [head_only_steps])


def ema_update(ema_params: Any, params: Any, decay: float | jax.Array) -> Any:
    """One step of an exponential moving average: decay * ema + (1 - decay) * params.

    Pure (jit/pmap friendly). Works on any pytree of float arrays: apply it to `params` and,
    for evaluation with EMA weights, to `batch_stats` too. Returns a new pytree.
    """
    return optax.incremental_update(params, ema_params, step_size=1.0 - decay)
