"""BYOL (Grill et al., "Bootstrap your own latent", NeurIPS 2020): networks, state, pure steps.

    nets = Networks.create(classifier, projector_hidden=4096, projection_dim=256,
                           predictor_hidden=4096)
    state = create_state(nets, tx, rng, image_size)
    step = functools.partial(train_step, nets=nets, tx=tx, views=view_config,
                             axis_name=par.axis_name, base_decay=0.99, total_updates=K)
    state, metrics = step(state, batch, rng)     # pure: pmap and jit wrap this same function

The online network is backbone -> projector -> predictor; the target network is backbone ->
projector with the weights of an exponential moving average of the online ones. For the two
views v1, v2 of each image the loss is

    ||q(v1)/|q(v1)| - z'(v2)/|z'(v2)| ||^2 + ||q(v2)/|q(v2)| - z'(v1)/|z'(v1)| ||^2

(q: online prediction, z': target projection, no gradient through z'), averaged over the batch:
each term is 2 - 2 cos, so the loss lies in [0, 8]. After each optimiser update the target moves
towards the online weights with rate 1 - tau, tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2
at update k of K. Both views go through each network one after the other, the BatchNorm
statistics running through both (as the paper's Haiku code does).

The backbone is any registered classifier's `features` (models/classifier.py): a features-only
module of the same class, so its variables carry exactly the classifier's top-level names
(`stem_conv`, `stage1_block1`, ...); the projector and predictor are top-level modules of their
own (`projector`, `predictor`) next to them. `init_from` of a pretraining workdir therefore maps
the backbone 1:1 and drops the other two (training/weight_sources.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from isic_jax.data import device_augment
from isic_jax.models import Classifier
from isic_jax.pretraining import views as views_lib
from isic_jax.training.weight_sources import PRETRAIN_MODULES

PyTree = Any
PROJECTOR, PREDICTOR = PRETRAIN_MODULES
BN_MOMENTUM = 0.9  # BYOL's bn decay_rate
BN_EPSILON = 1e-5
PAPER = "Grill et al., Bootstrap your own latent, NeurIPS 2020 (arXiv:2006.07733)"


# --------------------------------------------------------------------------- networks


@functools.cache
def _features_class(cls: type[Classifier]) -> type[Classifier]:
    """A subclass of a family's classifier whose `__call__` is its `features` alone: the same
    top-level modules (and names), no metadata branch, no head."""

    class Features(cls):  # type: ignore[valid-type, misc]
        @nn.compact
        def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:  # type: ignore[override]
            """x float32 [B, H, W, 3] -> pooled features float32 [B, D]."""
            return self.features(x, train).astype(jnp.float32)

    Features.__name__ = Features.__qualname__ = f"{cls.__name__}Features"
    return Features


def features_only(model: Classifier) -> Classifier:
    """The backbone of a classifier built by `models.create_model` (same architecture, dtype,
    BatchNorm axis and options) as a module of its own: apply -> float32 [B, D]."""
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
              if f.init and f.name not in ("parent", "name")}
    return _features_class(type(model))(**fields)


class MLP(nn.Module):
    """BYOL's projector / predictor: Linear(hidden) -> BatchNorm -> ReLU -> Linear(out, no
    bias), in float32. x float32 [B, D] -> float32 [B, out].

    axis_name: BatchNorm averages its batch statistics over this pmap axis (None under jit).
    """

    hidden: int
    out: int
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Dense(self.hidden, dtype=jnp.float32, name="dense1")(x.astype(jnp.float32))
        x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                         epsilon=BN_EPSILON, axis_name=self.axis_name, dtype=jnp.float32,
                         name="bn")(x)
        x = nn.relu(x)
        return nn.Dense(self.out, use_bias=False, dtype=jnp.float32, name="dense2")(x)


@dataclasses.dataclass(frozen=True)
class Networks:
    """The backbone (features-only classifier), the projector and the predictor, each applied
    with its own variables; `split` / `join` convert to and from one flat dict whose top-level
    names are the backbone's modules, "projector" and "predictor"."""

    backbone: nn.Module
    projector: MLP
    predictor: MLP

    @classmethod
    def create(cls, model: Classifier, *, projector_hidden: int, projection_dim: int,
               predictor_hidden: int) -> Networks:
        """From the classifier of `create_model(config.model, ..., axis_name=par.axis_name)`."""
        axis = model.axis_name
        return cls(features_only(model),
                   MLP(projector_hidden, projection_dim, axis_name=axis),
                   MLP(predictor_hidden, projection_dim, axis_name=axis))

    @staticmethod
    def backbone_part(tree: PyTree) -> PyTree:
        """The backbone's entries of a flat params / batch_stats dict."""
        return {k: v for k, v in tree.items() if k not in PRETRAIN_MODULES}

    def init(self, rng: jax.Array, image_size: int) -> dict[str, PyTree]:
        """{"params", "batch_stats"} of all three (the projector and predictor under their own
        top-level names), float32."""
        k_backbone, k_projector, k_predictor = jax.random.split(rng, 3)
        x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
        backbone = self.backbone.init(k_backbone, x, train=False)
        width = jax.eval_shape(lambda: self.backbone.apply(backbone, x, train=False)).shape[-1]
        projector = self.projector.init(k_projector, jnp.zeros((1, width)), train=False)
        predictor = self.predictor.init(k_predictor, jnp.zeros((1, self.projector.out)),
                                        train=False)
        params = {**backbone["params"], PROJECTOR: projector["params"],
                  PREDICTOR: predictor["params"]}
        stats = {**backbone.get("batch_stats", {}), PROJECTOR: projector["batch_stats"],
                 PREDICTOR: predictor["batch_stats"]}
        return {"params": params, "batch_stats": stats}

    def features(self, params: PyTree, batch_stats: PyTree, x: jax.Array) -> jax.Array:
        """Evaluation features (running statistics): float32 [B, D]."""
        return self.backbone.apply({"params": self.backbone_part(params),
                                    "batch_stats": self.backbone_part(batch_stats)},
                                   x, train=False)

    def forward(self, params: PyTree, batch_stats: PyTree, x: jax.Array, rng: jax.Array,
                predict: bool) -> tuple[jax.Array, PyTree]:
        """Training-mode pass: projection (target) or prediction (online) float32 [B, P], and
        the updated batch statistics (the same flat layout as `batch_stats`)."""
        variables = {"params": self.backbone_part(params),
                     "batch_stats": self.backbone_part(batch_stats)}
        h, updates = self.backbone.apply(variables, x, train=True, mutable=["batch_stats"],
                                         rngs={"dropout": rng})
        new_stats = dict(batch_stats)
        new_stats.update(updates.get("batch_stats", {}))
        z, up = self.projector.apply(
            {"params": params[PROJECTOR], "batch_stats": batch_stats[PROJECTOR]}, h,
            train=True, mutable=["batch_stats"])
        new_stats[PROJECTOR] = up["batch_stats"]
        if not predict:
            return z, new_stats
        q, up = self.predictor.apply(
            {"params": params[PREDICTOR], "batch_stats": batch_stats[PREDICTOR]}, z,
            train=True, mutable=["batch_stats"])
        new_stats[PREDICTOR] = up["batch_stats"]
        return q, new_stats


# --------------------------------------------------------------------------- state


@flax.struct.dataclass
class PretrainState:
    """Everything that changes during pretraining (a pytree; checkpointed as is).

    Attributes:
      step: int32 [] micro-steps (batches) done.
      params: the online network's parameters, float32: the backbone's modules under the
        classifier's names, "projector", "predictor".
      batch_stats: the online network's BatchNorm statistics, the same layout.
      opt_state: the optimiser's state (of the online parameters).
      target: {"params", "batch_stats"}: the target network (backbone and projector), the
        moving average of the online weights (its BatchNorm statistics are its own).
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    target: PyTree


def _target_part(tree: PyTree) -> PyTree:
    return {k: v for k, v in tree.items() if k != PREDICTOR}


def create_state(nets: Networks, tx: optax.GradientTransformation, rng: jax.Array,
                 image_size: int, backbone: dict[str, PyTree] | None = None) -> PretrainState:
    """The step-0 state: random weights (or `backbone`: {"params", "batch_stats"} of the
    classifier's backbone, e.g. init_from weights, over them); target = online (as BYOL).
    Works under `jax.eval_shape`."""
    variables = nets.init(rng, image_size)
    params, stats = dict(variables["params"]), dict(variables["batch_stats"])
    if backbone is not None:
        for name, value in Networks.backbone_part(backbone.get("params", {})).items():
            if name in params:
                params[name] = jax.tree.map(jnp.asarray, value)
        for name, value in Networks.backbone_part(backbone.get("batch_stats", {})).items():
            if name in stats:
                stats[name] = jax.tree.map(jnp.asarray, value)
    # Copies: the state is donated to the step, and one buffer cannot be donated twice.
    target = jax.tree.map(jnp.copy, {"params": _target_part(params),
                                     "batch_stats": _target_part(stats)})
    return PretrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                         opt_state=tx.init(params), target=target)


# --------------------------------------------------------------------------- the steps


def target_decay(update: jax.Array, base_decay: float, total_updates: int) -> jax.Array:
    """BYOL's target EMA rate at optimiser update `update` of `total_updates`: tau_base at the
    start, cosine-increased to 1 at the end. float32 []."""
    progress = jnp.clip(update.astype(jnp.float32) / max(1, total_updates), 0.0, 1.0)
    return 1.0 - (1.0 - base_decay) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0


def regression_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """||x/|x| - y/|y| ||^2 = 2 - 2 cos(x, y) per row: float32 [B] of [B, P] inputs."""
    x = prediction / jnp.maximum(jnp.linalg.norm(prediction, axis=-1, keepdims=True), 1e-12)
    y = target / jnp.maximum(jnp.linalg.norm(target, axis=-1, keepdims=True), 1e-12)
    return jnp.sum((x - y) ** 2, axis=-1)


def _applied_update(opt_state: PyTree) -> jax.Array | bool:
    """Whether the last `tx.update` applied an update (False inside a MultiSteps accumulation)."""
    if isinstance(opt_state, optax.MultiStepsState):
        return jnp.logical_and(opt_state.mini_step == 0, opt_state.gradient_step > 0)
    return True


def train_step(
    state: PretrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    nets: Networks,
    tx: optax.GradientTransformation,
    views: views_lib.ViewConfig,
    axis_name: str | None = None,
    base_decay: float = 0.99,
    total_updates: int = 1,
    accumulation_steps: int = 1,
) -> tuple[PretrainState, dict[str, jax.Array]]:
    """One BYOL micro-step. Pure; collectives only when `axis_name` is given (pmap).

    Args:
      state: PretrainState (pmap: this device's copy).
      batch: image uint8 [B, S, S, 3] (the host's image; both views are made here) and
        position uint32 [B] (the views' keys); labels are not read. B: this device's share
        under pmap, the global batch under jit.
      rng: the run's key, the same on every device. Views use fold_in(rng, VIEW_STREAM) and the
        positions; stochastic depth (if the backbone has it) fold_in(rng, step) (+ device).
      nets: `Networks.create(model, ...)`, the model built with `axis_name`.
      tx: the optimiser (of the online parameters).
      views: `views.ViewConfig` (static).
      axis_name: pmap axis: gradients and the loss are `lax.pmean`-ed over it. None under jit.
      base_decay: tau_base of the target EMA.
      total_updates: K, optimiser updates in the whole run (the EMA schedule's length).
      accumulation_steps: micro-steps per optimiser update (config.optim.accumulation_steps).

    Returns:
      (new state, metrics) with float32 scalars: loss (mean over the global batch, in [0, 8]),
      grad_norm (of the averaged gradient), target_decay (tau of this update).
    """
    step_rng = jax.random.fold_in(rng, state.step)
    if axis_name is not None:
        step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))
    images = batch["image"]
    if images.dtype != jnp.uint8:
        raise ValueError("the BYOL step makes its views from the host's uint8 images")
    v1, v2 = views_lib.two_views(images, rng, views, example_ids=batch.get("position"),
                                 axis_name=axis_name)
    k_online1, k_online2, k_target1, k_target2 = jax.random.split(step_rng, 4)

    target = state.target
    z1, target_stats = nets.forward(target["params"], target["batch_stats"], v1, k_target1,
                                    predict=False)
    z2, target_stats = nets.forward(target["params"], target_stats, v2, k_target2,
                                    predict=False)
    z1, z2 = jax.lax.stop_gradient(z1), jax.lax.stop_gradient(z2)

    def loss_fn(params: PyTree) -> tuple[jax.Array, PyTree]:
        q1, stats = nets.forward(params, state.batch_stats, v1, k_online1, predict=True)
        q2, stats = nets.forward(params, stats, v2, k_online2, predict=True)
        loss = jnp.mean(regression_loss(q1, z2) + regression_loss(q2, z1))
        return loss, stats

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        loss = jax.lax.pmean(loss, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    update = state.step // max(1, int(accumulation_steps))  # the update just made
    tau = target_decay(update, base_decay, total_updates)
    moved = jax.tree.map(lambda t, o: tau * t + (1.0 - tau) * o, target["params"],
                         _target_part(params))
    applied = _applied_update(opt_state)
    new_target = {
        "params": jax.tree.map(lambda m, t: jnp.where(applied, m, t), moved, target["params"]),
        "batch_stats": target_stats,
    }
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, target=new_target)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "target_decay": jnp.asarray(tau, jnp.float32)}
    return new_state, metrics


def embed_step(state: PretrainState, batch: dict[str, jax.Array], *, nets: Networks,
               augment: Any = None) -> jax.Array:
    """The online backbone's L2-normalised pooled features of evaluation images (the k-NN
    probe's embedding). Pure, no collectives.

    Args:
      batch: image uint8 [B, H, W, 3] (normalised here by `device_augment.preprocess_eval`).
      augment: `device_augment.DeviceAugmentConfig` with the run's mean/std.

    Returns:
      float32 [B, D], unit rows.
    """
    images = batch["image"]
    if images.dtype == jnp.uint8:
        images = device_augment.preprocess_eval(images, augment or
                                                device_augment.DeviceAugmentConfig())
    h = nets.features(state.params, state.batch_stats, images.astype(jnp.float32))
    return h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-12)
