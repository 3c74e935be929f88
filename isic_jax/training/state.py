"""The train state: everything that changes during training, as one pytree.

    state = create_train_state(model, tx, init_rng, image_size, use_ema=True)
    abstract = jax.eval_shape(lambda: create_train_state(...))   # restore targets, no allocation
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from isic_jax.models import create_model, init_variables, model_parts
from isic_jax.training.optim import create_optimizer
from isic_jax.training.swa import init_state as swa_init

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree; checkpointed as is).

    Attributes:
      step: int32 [] micro-steps (batches) done.
      params: model parameters (float32).
      batch_stats: BatchNorm running statistics (float32).
      opt_state: optimiser state (optax; MultiStepsState under gradient accumulation).
      ema: {"params", "batch_stats"} exponential moving average of both, used for evaluation;
        an empty dict when EMA is off.
      swa: {"params", "batch_stats", "count"} stochastic weight average (`training.swa`): the
        mean of `count` snapshots and BatchNorm statistics for it; an empty dict when SWA is off
        (also what checkpoints written before the field existed restore to).
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    ema: PyTree
    swa: PyTree = flax.struct.field(default_factory=dict)

    def eval_variables(self) -> dict[str, PyTree]:
        """The variables evaluation uses: the SWA ones once SWA holds a snapshot, else the EMA
        ones when kept, else the live ones. Traceable (the SWA choice is a select on count)."""
        if self.ema:
            chosen = {"params": self.ema["params"], "batch_stats": self.ema["batch_stats"]}
        else:
            chosen = {"params": self.params, "batch_stats": self.batch_stats}
        if self.swa:
            averaged = {"params": self.swa["params"], "batch_stats": self.swa["batch_stats"]}
            use = self.swa["count"] > 0
            chosen = jax.tree.map(lambda a, b: jnp.where(use, a, b), averaged, chosen)
        return chosen


def create_train_state(
    model: flax.linen.Module,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    image_size: int,
    use_ema: bool = False,
    variables: dict[str, PyTree] | None = None,
    use_swa: bool = False,
) -> TrainState:
    """Initialises parameters, BatchNorm statistics and the optimiser (on the default device).

    Works under `jax.eval_shape` (to build restore targets without allocating).

    Args:
      variables: {"params", "batch_stats"} to start from (pretrained weights, already matched
        to the image-only `model` by `training.weight_sources.load`) instead of a random init.
        A model with a metadata branch takes the pretrained backbone, and its own random
        metadata branch and head (whose input then holds the metadata features too).
    """

    if variables is None:
        variables = init_variables(model, rng, image_size)
    elif getattr(model, "metadata_width", 0):
        variables = _overlay(init_variables(model, rng, image_size), variables)
    else:
        variables = jax.tree.map(jnp.asarray, dict(variables))
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    ema = {}
    if use_ema:
        # Copies: the state is donated to the step, and one buffer cannot be donated twice.
        ema = jax.tree.map(jnp.copy, {"params": params, "batch_stats": batch_stats})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema=ema,
        swa=swa_init(params, batch_stats) if use_swa else {},
    )


def _overlay(fresh: PyTree, given: PyTree) -> PyTree:
    """`fresh` with the leaves of `given` wherever `given` has that variable with that shape."""
    flat_given = {jax.tree_util.keystr(k): v
                  for k, v in jax.tree_util.tree_flatten_with_path(given)[0]}

    def pick(path: Any, leaf: jax.Array) -> jax.Array:
        value = flat_given.get(jax.tree_util.keystr(path))
        return jnp.asarray(value) if value is not None and value.shape == leaf.shape else leaf

    return jax.tree_util.tree_map_with_path(pick, fresh)


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(init key, training key) from config.seed: typed PRNG keys (`jax.random.key`), whose bits
    are those of the legacy `PRNGKey` keys earlier runs used; checkpoints store the bits
    (`checkpointing.key_bits`), so the runs of both resume alike."""
    init_rng, train_rng = jax.random.split(jax.random.key(int(seed)))
    return init_rng, train_rng


def abstract_train_state(config: Any, num_classes: int, metadata: Any = None) -> TrainState:
    """Shapes and dtypes of a run's train state from its config (and its metadata encoder, when
    it has one) alone (jax.ShapeDtypeStruct leaves, nothing allocated): the restore target of
    `evaluate` and `export`."""
    model = create_model(config.model, num_classes, metadata=metadata)
    # The optimiser only shapes opt_state here (the schedule lengths do not matter).
    tx, _ = create_optimizer(config.optim, total_steps=1, steps_per_epoch=1,
                             finetune_config=config.get("finetune"),
                             parts=model_parts(config.model))
    init_rng, _ = seed_keys(config.seed)
    use_ema = float(config.optim.ema_decay) > 0
    use_swa = float(config.optim.get("swa_start_epoch", -1.0)) >= 0
    return jax.eval_shape(
        lambda: create_train_state(model, tx, init_rng, int(config.data.image_size),
                                   use_ema=use_ema, use_swa=use_swa)
    )
