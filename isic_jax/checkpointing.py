"""Orbax checkpoints of a training run: state, RNG, input-pipeline state and resolved config.

    ckpt = Checkpointer(workdir / "checkpoints", keep=3, best_metric="auc")
    ckpt.save(step, state, rng=rng, data_iter=IteratorState(state_json), config=cfg_dict,
              metrics={"auc": 0.91})                       # asynchronous
    restored = ckpt.restore(ckpt.latest_step(), state_target=abstract_state, data_iter=it)
    ckpt.close()

Layout: `<dir>/<step>/{state,rng,data_iter,config}` (ocp.args.Composite). Retention: the latest
`keep` checkpoints AND, separately, the best one by `best_metric` (AnyPreservationPolicy of
LatestN and BestN), so the newest checkpoint is never deleted for being worse than the best and
resuming always continues from the newest step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from orbax.checkpoint import checkpoint_managers as ocm

PyTree = Any

# Composite item names.
STATE, RNG, DATA_ITER, CONFIG = "state", "rng", "data_iter", "config"


# Orbax warnings that are expected here: checkpoints between evaluations carry no metrics, and
# `evaluate` opens the checkpoint folder read-only on purpose.
_EXPECTED_WARNINGS = ("did not provide metrics", "directory is read only")


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _EXPECTED_WARNINGS)


_FILTER = _DropExpected()


def quiet_orbax_logging() -> None:
    """Orbax logs every save/restore step at INFO through absl: show warnings and errors only,
    minus the expected ones above."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    logger = logging.getLogger("absl")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)


class IteratorState:
    """What grain's Orbax handler saves/restores, decoupled from the live iterator.

    Grain's `CheckpointHandler` calls `get_state()` (bytes for a non-DatasetIterator) on save and
    `set_state(bytes)` + `start_prefetch()` on restore. Saving a snapshot instead of the live
    iterator matters because batches are prefetched: the iterator is ahead of the step being
    checkpointed, and an asynchronous save must not read a state that moves on.

    Args:
      state: the iterator state recorded right after the last consumed batch (dict for grain
        DatasetIterators, bytes for DataLoader iterators), or None for a restore target.
      iterator: for restores: the live iterator whose `set_state` receives the saved state.
    """

    def __init__(self, state: Any = None, iterator: Any = None):
        self._state = state
        self._iterator = iterator

    def get_state(self) -> bytes:
        state = self._state
        if isinstance(state, bytes):
            return state
        return json.dumps(state, indent=1).encode()

    def set_state(self, raw: bytes) -> None:
        target = self._iterator
        if target is None:
            self._state = raw
            return
        import grain

        if isinstance(target, grain.DatasetIterator):
            target.set_state(json.loads(raw.decode()))
        else:  # grain.DataLoaderIterator takes its own bytes
            target.set_state(raw)
        self._state = raw

    def start_prefetch(self) -> None:
        """Called by grain's handler after restore; the live iterator starts on first next()."""


def iterator_state(iterator: Any) -> Any:
    """The state to record after each batch (a JSON-able dict or bytes)."""
    return iterator.get_state()


def _best_fn(name: str, mode: str):
    """Metric -> sortable float; a missing or non-finite value ranks worst."""
    worst = -math.inf if mode == "max" else math.inf

    def fn(metrics: PyTree) -> float:
        value = metrics.get(name) if isinstance(metrics, dict) else None
        try:
            value = float(value)
        except (TypeError, ValueError):
            return worst
        return value if math.isfinite(value) else worst

    return fn


@dataclasses.dataclass
class Restored:
    """What `Checkpointer.restore` returns. Entries not asked for are None."""

    step: int
    state: PyTree | None
    rng: np.ndarray | None
    config: dict[str, Any] | None


class Checkpointer:
    """A thin wrapper around `ocp.CheckpointManager` with this project's items and retention.

    Args:
      directory: where step folders go (created).
      keep: latest checkpoints kept (config.train.keep_checkpoints).
      best_metric: validation metric ranking checkpoints; the best one is kept in addition.
      best_mode: "max" or "min".
      async_save: save in a background thread (wait_until_finished/close before exit).
      read_only: never writes (evaluate).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        keep: int = 3,
        best_metric: str = "auc",
        best_mode: str = "max",
        async_save: bool = True,
        read_only: bool = False,
    ):
        quiet_orbax_logging()
        self.directory = pathlib.Path(directory).absolute()
        self.best_metric = best_metric
        best_fn = _best_fn(best_metric, best_mode)
        # BestN sorts ascending and keeps the tail: reverse for "min".
        policy = ocm.AnyPreservationPolicy(
            [
                ocm.LatestN(n=keep),
                ocm.BestN(
                    get_metric_fn=best_fn,
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            # best_fn/best_mode only serve best_step() here; retention is the policy above.
            best_fn=best_fn,
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            # The loop decides when to save (0 when read-only, which Orbax requires).
            save_interval_steps=0 if read_only else 1,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # --- queries -----------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the best `best_metric` among kept checkpoints with metrics, else None."""
        with_metrics = [s for s in self.all_steps() if self.metrics(s) is not None]
        if not with_metrics:
            return None
        return self._manager.best_step()

    def metrics(self, step: int) -> dict[str, Any] | None:
        return self._manager.metrics(step)

    def resolve_step(self, which: str | int) -> int:
        """"latest", "best" or a step number -> an existing step.

        Raises:
          FileNotFoundError: no checkpoint (or not that one) in the directory.
        """
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if which == "latest":
            return steps[-1]
        if which == "best":
            best = self.best_step()
            if best is None:
                raise FileNotFoundError(
                    f"no checkpoint with validation metrics in {self.directory} (steps: {steps})"
                )
            return best
        step = int(which)
        if step not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; available: {steps}"
            )
        return step

    # --- save / restore ----------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: PyTree,
        *,
        rng: jax.Array | np.ndarray,
        data_iter: IteratorState | None,
        config: dict[str, Any],
        metrics: dict[str, Any] | None = None,
        force: bool = True,
    ) -> bool:
        """Starts an asynchronous save of one step. Returns whether a save was started.

        Args:
          state: one (unreplicated) copy of the train state, device or host arrays.
          rng: the run's base PRNG key (uint32 [2]).
          data_iter: the input pipeline's state after the last consumed batch.
          config: the resolved config as a plain dict.
          metrics: scalar validation metrics of this step (ranks it for "best").
        """
        items: dict[str, Any] = {
            STATE: ocp.args.StandardSave(state),
            RNG: ocp.args.JsonSave({"key": np.asarray(jax.device_get(rng)).tolist()}),
            CONFIG: ocp.args.JsonSave(config),
        }
        if data_iter is not None:
            import grain

            items[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
        clean = None
        if metrics is not None:
            clean = {k: _json_scalar(v) for k, v in metrics.items() if _is_scalar(v)}
        return self._manager.save(
            step, args=ocp.args.Composite(**items), metrics=clean, force=force
        )

    def restore(
        self,
        step: int,
        state_target: PyTree | None = None,
        *,
        data_iter: IteratorState | None = None,
        with_rng: bool = True,
        with_config: bool = True,
    ) -> Restored:
        """Restores the asked-for items of one step.

        Args:
          state_target: pytree of jax.ShapeDtypeStruct with shardings (or arrays) giving
            structure, dtypes and placement; None skips the state.
          data_iter: receives the saved input-pipeline state (IteratorState(iterator=it)).
        """
        items: dict[str, Any] = {}
        if state_target is not None:
            items[STATE] = ocp.args.StandardRestore(state_target)
        if with_rng:
            items[RNG] = ocp.args.JsonRestore()
        if with_config:
            items[CONFIG] = ocp.args.JsonRestore()
        if data_iter is not None:
            import grain

            items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
        rng = None
        if with_rng:
            rng = np.asarray(out[RNG]["key"], dtype=np.uint32)
        return Restored(
            step=step,
            state=out[STATE] if state_target is not None else None,
            rng=rng,
            config=out[CONFIG] if with_config else None,
        )

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _json_scalar(v: Any) -> float:
    return float(v)


def abstract_target(abstract_state: PyTree, sharding: jax.sharding.Sharding) -> PyTree:
    """ShapeDtypeStructs with `sharding` on every leaf: a restore target for any device count."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_state
    )
