"""Stochastic weight averaging (Izmailov et al. 2018, arXiv:1803.05407), beside the weight EMA.

    schedule = SwaSchedule.from_config(config.optim, total_steps, steps_per_epoch)  # or None
    state.swa = {"params", "batch_stats", "count"}        # create_train_state(use_swa=True)
    train_step(..., swa=schedule)                          # snapshots, inside the jitted step
    state = BatchNormRecompute(...)(state)                 # the loop: before eval and saves

Snapshots. From `optim.swa_start_epoch` on, every `optim.swa_every_epochs`, the step adds the
live weights to a running mean: avg_n = avg_{n-1} + (w - avg_{n-1}) / n, so after n snapshots
`swa.params` is their mean (float32 rounding aside). Both points are rounded up to a multiple of
`optim.accumulation_steps` so that snapshots fall on applied updates. The learning-rate schedule
is the run's own (warmup + cosine); SWA averages the weights along its tail.

BatchNorm. Averaged weights need their own BatchNorm statistics: averaging the snapshots' running
statistics is only an approximation. `BatchNormRecompute` recomputes them as torch's
`swa_utils.update_bn` does (momentum None: the plain mean over batches): `optim.swa_bn_batches`
training batches (the first ones of the training stream, with their training augmentation, no
mixing) through the model in train mode with the averaged weights, the batch mean and variance
of every BatchNorm averaged over the batches. Flax's BatchNorm only exposes running averages
(s' = m s + (1 - m) b), so each batch runs from s = 0 (giving (1 - m) b) and one probe batch from
s = 1 gives m; layers whose statistics never move (frozen BatchNorm, m = 1) keep theirs. Between
recomputations a snapshot updates `swa.batch_stats` with the same running mean as the weights
(the approximation). The loop recomputes before every evaluation and every scheduled checkpoint
once a new snapshot exists, so evaluation, `evaluate`, `export` and `cv` (which all use
`TrainState.eval_variables`: the SWA weights once count > 0) see recomputed statistics; the
result depends only on the averaged weights and the fixed batches, so a resumed run ends with
the same state as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from isic_jax.utils import close_iterator

PyTree = Any
BN_DROPOUT_STREAM = 0x00626E73  # fold_in constant of the dropout key of the BatchNorm pass


@dataclasses.dataclass(frozen=True)
class SwaSchedule:
    """When snapshots are taken, in micro-steps (static: part of the compiled step).

    Attributes:
      start: the first micro-step (1-based, counted after the step) that takes a snapshot.
      every: micro-steps between snapshots.
      bn_batches: training batches of the BatchNorm recomputation (0: keep the running mean of
        the snapshots' statistics).
    """

    start: int
    every: int
    bn_batches: int = 0

    @classmethod
    def from_config(cls, optim_config: Any, total_steps: int, steps_per_epoch: int
                    ) -> SwaSchedule | None:
        """From `config.optim` (swa_start_epoch < 0 or absent: None, SWA off).

        Raises:
          config_utils.ConfigError: the first snapshot would come after the last step.
        """
        start_epoch = float(optim_config.get("swa_start_epoch", -1.0))
        if start_epoch < 0:
            return None
        k = max(1, int(optim_config.get("accumulation_steps", 1)))
        every_epochs = float(optim_config.get("swa_every_epochs", 1.0))
        up = lambda n: k * max(1, math.ceil(n / k))  # a positive multiple of k
        start = up(round(start_epoch * steps_per_epoch))
        every = up(round(every_epochs * steps_per_epoch))
        if start > total_steps:
            from isic_jax.config_utils import ConfigError

            raise ConfigError(
                f"config.optim.swa_start_epoch={start_epoch} starts SWA at step {start}, after "
                f"the last step ({total_steps} steps of {steps_per_epoch} per epoch); use a "
                f"value below {total_steps / steps_per_epoch:.3g} (or -1 to turn SWA off).")
        return cls(start=start, every=every,
                   bn_batches=int(optim_config.get("swa_bn_batches", 0)))

    def is_snapshot(self, step: jax.Array | int) -> jax.Array:
        """Whether micro-step `step` (1-based) takes a snapshot."""
        step = jnp.asarray(step, jnp.int32)
        return (step >= self.start) & ((step - self.start) % self.every == 0)

    def snapshot_steps(self, total_steps: int) -> list[int]:
        """The snapshot steps of a run of `total_steps` micro-steps."""
        return list(range(self.start, total_steps + 1, self.every))


def init_state(params: PyTree, batch_stats: PyTree) -> dict[str, PyTree]:
    """{"params", "batch_stats", "count"}: copies (the state is donated) and no snapshot yet."""
    return {
        "params": jax.tree.map(jnp.copy, params),
        "batch_stats": jax.tree.map(jnp.copy, batch_stats),
        "count": jnp.zeros((), jnp.int32),
    }


def add_snapshot(swa: dict[str, PyTree], params: PyTree, batch_stats: PyTree
                 ) -> dict[str, PyTree]:
    """The running means with one more snapshot (pure)."""
    n = swa["count"].astype(jnp.float32) + 1.0

    def mean(avg: jax.Array, x: jax.Array) -> jax.Array:
        return avg + (x.astype(avg.dtype) - avg) / n

    return {
        "params": jax.tree.map(mean, swa["params"], params),
        "batch_stats": jax.tree.map(mean, swa["batch_stats"], batch_stats),
        "count": swa["count"] + 1,
    }


def maybe_snapshot(
    swa: dict[str, PyTree], step: jax.Array, params: PyTree, batch_stats: PyTree,
    schedule: SwaSchedule, applied: jax.Array | bool = True,
) -> dict[str, PyTree]:
    """`add_snapshot` when micro-step `step` (1-based, after its update) is a snapshot step and
    the step applied an update; else `swa` unchanged. Traceable (lax.cond: no pass over the
    weights on the other steps)."""
    take = jnp.logical_and(schedule.is_snapshot(step), applied)
    return jax.lax.cond(take, lambda s: add_snapshot(s, params, batch_stats), lambda s: s, swa)


# ---------------------------------------------------------------------------------------------
# BatchNorm statistics of the averaged weights.


def statistics_pass(model: Any, par: Any, augment: Any) -> Any:
    """Compiled f(params, template, batch, rng, fill) -> batch_stats after one train-mode
    forward pass whose BatchNorm layers start from statistics all equal to `fill` (0. or 1.),
    over `par`'s devices (pmap: BatchNorm syncs over the axis; jit: global batch)."""
    from isic_jax.training import steps  # steps imports this module

    def fn(params, template, batch, rng, fill):
        start = jax.tree.map(lambda t: jnp.full_like(t, fill), template)
        images = steps.train_inputs(batch, rng, augment, par.axis_name)
        dropout = jax.random.fold_in(rng, BN_DROPOUT_STREAM)
        if par.axis_name is not None:
            dropout = jax.random.fold_in(dropout, jax.lax.axis_index(par.axis_name))
        _, updates = model.apply({"params": params, "batch_stats": start}, images, train=True,
                                 metadata=batch.get("metadata"), mutable=["batch_stats"],
                                 rngs={"dropout": dropout})
        return updates["batch_stats"]

    if par.mode == "pmap":
        from isic_jax.training.parallel import PMAP_AXIS

        return jax.pmap(fn, axis_name=PMAP_AXIS)
    repl = par.replicated
    return jax.jit(fn, in_shardings=(repl, repl, par.batch_sharding, repl, repl),
                   out_shardings=repl)


@jax.jit
def _combine(total: PyTree, probe_one: PyTree, probe_zero: PyTree, keep: PyTree,
             n: jax.Array) -> PyTree:
    """mean_k b_k from sum_k (1 - m) b_k and the probe (m = probe_one - probe_zero); `keep`
    where the layer's statistics do not move (m = 1)."""

    def one(t, p1, p0, k):
        rate = 1.0 - (p1 - p0)  # (1 - m), elementwise
        ok = rate > 1e-6
        return jnp.where(ok, t / (n * jnp.where(ok, rate, 1.0)), k)

    return jax.tree.map(one, total, probe_one, probe_zero, keep)


@jax.jit
def _add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, a, b)


class BatchNormRecompute:
    """Recomputes `state.swa["batch_stats"]` for the averaged weights (module docstring).

    Args:
      model, par, augment: the run's model, `DataParallel` and `DeviceAugmentConfig`.
      data: the run's `InputData` (a fresh training iterator each time: the first
        `num_batches` global batches of the stream, so the result is reproducible).
      rng: the run's key, replicated as the step gets it.
      num_batches: batches per recomputation (> 0).
    """

    def __init__(self, model: Any, par: Any, augment: Any, data: Any, rng: jax.Array,
                 num_batches: int):
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        self.par, self.data, self.rng = par, data, rng
        self.num_batches = num_batches
        self._pass = statistics_pass(model, par, augment)
        self._done_at_count: int | None = None
        self._fills = {v: par.replicate(jnp.float32(v)) for v in (0.0, 1.0)}

    def _count(self, state: Any) -> int:
        return int(jax.device_get(self.par.unreplicate(state.swa["count"])))

    def __call__(self, state: Any, force: bool = False) -> Any:
        """`state` with recomputed SWA statistics (the same state when there is no snapshot yet,
        or none since the last recomputation, unless `force`)."""
        if not state.swa:
            return state
        count = self._count(state)
        if count == 0 or (count == self._done_at_count and not force):
            return state
        from isic_jax.training import steps  # steps imports this module

        params, keep = state.swa["params"], state.swa["batch_stats"]
        iterator = self.data.train_iterator()
        try:
            total = probe_zero = probe_one = None
            for _ in range(self.num_batches):
                batch = self.par.shard_batch(
                    steps.device_batch(next(iterator), steps.TRAIN_KEYS))
                out = self._pass(params, keep, batch, self.rng, self._fills[0.0])
                if total is None:
                    probe_zero = total = out
                    probe_one = self._pass(params, keep, batch, self.rng, self._fills[1.0])
                else:
                    total = _add(total, out)
        finally:
            close_iterator(iterator)
        new = _combine(total, probe_one, probe_zero, keep, jnp.float32(self.num_batches))
        self._done_at_count = count
        return state.replace(swa={**state.swa, "batch_stats": new})
