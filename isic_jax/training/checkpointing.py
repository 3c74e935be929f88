"""Orbax checkpoints of a training run: state, RNG, input-pipeline state and resolved config.

    ckpt = Checkpointer(workdir / "checkpoints", keep=3, best_metric="auc")
    ckpt.save(step, state, rng=rng, data_iter=IteratorState(state_json), config=cfg_dict,
              metrics={"auc": 0.91})                       # asynchronous
    restored = ckpt.restore(ckpt.latest_step(), state_target=abstract_state, data_iter=it)
    ckpt.close()

Layout: `<dir>/<step>/{state,rng,data_iter,config}` (ocp.args.Composite; the rng item also
records the topology that wrote it: processes, devices, parallelism). Retention: the latest
`keep` checkpoints AND, separately, the best one by `best_metric` (AnyPreservationPolicy of
LatestN and BestN), so the newest checkpoint is never deleted for being worse than the best and
resuming always continues from the newest step.

Safety (what `resume.py` builds on):
- A save is atomic: Orbax writes `<step>.orbax-checkpoint-tmp` and renames it when every item and
  every process is done. A process killed mid-save leaves only the tmp folder, which Orbax never
  lists as a step; `incomplete_saves()` names them, `remove_incomplete_saves()` deletes them
  (the trainer does once it has decided to resume or start).
- `saved_state_signature(step)` reads a checkpoint's array names, shapes and dtypes from its
  metadata (nothing else), so that a workdir holding another model is refused before anything
  is restored or written (`signature_differences`).
- `set_aside(step)` renames a finalized but unreadable step to `<step>.corrupt` (Orbax ignores
  it; nothing is deleted), so that a run can fall back to the previous step and later save that
  step number again.
- Content checksums (`integrity.py`): every save also writes the `checksums` item (one file per
  process, finalized atomically with the rest, hashed off the step) recording a CRC of every
  array of the state, of the rng and config items and of this process's input-pipeline state;
  `restore` compares what it restored with them and raises `integrity.IntegrityError` (naming
  the step and the array) on a difference, which `resume.py` treats like an unreadable step.
  Checkpoints without the item (earlier versions) restore with `Restored.checksums == "absent"`.
- The input-pipeline state is one file per process (`data_iter/process_<i>-of-<n>.json`, grain's
  handler). Restoring on another process count uses the saved state of process 0 for every
  process: with this project's pipeline, the state counts global batches and is the same on every
  process (see `Checkpointer.restore`).

Observers of `training.events` are notified at `during_save` inside the background commit of
each step's asynchronous save (tests kill the process there).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from isic_jax import config_utils
from isic_jax.training import events, integrity

PyTree = Any

# Composite item names.
STATE, RNG, DATA_ITER, CONFIG = "state", "rng", "data_iter", "config"
CHECKSUMS = integrity.ITEM
SET_ASIDE_FILE = "set_aside.json"  # in a `<step>.corrupt` folder: why it was set aside
CHECKPOINTS_DIR = "checkpoints"  # inside a run folder
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's suffix of a save in progress
CORRUPT_SUFFIX = ".corrupt"  # a finalized step that could not be restored, set aside


class CheckpointError(RuntimeError):
    """The workdir's checkpoints cannot be used (another model, or none readable); the message
    says what to do. Raised before anything in the checkpoint folder is changed."""


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

        if isinstance(target, grain.DataLoaderIterator):
            target.set_state(raw)  # takes its own bytes
        else:  # grain DatasetIterators (and wrappers around them) take the JSON dict
            target.set_state(json.loads(raw.decode()))
        self._state = raw

    def start_prefetch(self) -> None:
        """Called by grain's handler after restore; the live iterator starts on first next()."""


class _NotifyDuringCommit(IteratorState):
    """Grain's handler calls `get_state` in Orbax's background commit, while the step's tmp
    folder exists and before it is finalized: where `events` observers hear `during_save`."""

    def __init__(self, inner: IteratorState, step: int):
        super().__init__(inner._state, inner._iterator)
        self._step = step

    def get_state(self) -> bytes:
        events.notify("during_save", self._step)
        return super().get_state()


def key_bits(key: jax.Array | np.ndarray) -> np.ndarray:
    """A PRNG key's raw bits (uint32 [2] for threefry) on the host: typed keys (`jax.random.key`)
    and legacy raw keys alike, the format checkpoints store."""
    if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(jax.device_get(key), np.uint32)


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
    # Set when the input-pipeline state was written by another number of processes.
    data_note: str | None = None
    # {"processes", "devices", "parallelism"} of the run that wrote it (None: not recorded).
    topology: dict[str, Any] | None = None
    # integrity.VERIFIED (what was restored matches its checksums), ABSENT (an earlier version
    # wrote it without checksums) or OFF (the checkpointer does not check).
    checksums: str = integrity.OFF
    # The mean training loss logged last before the save (None: not recorded).
    train_loss: float | None = None


class Checkpointer:
    """A thin wrapper around `ocp.CheckpointManager` with this project's items and retention.

    Args:
      directory: where step folders go (created).
      keep: latest checkpoints kept (config.train.keep_checkpoints).
      best_metric: validation metric ranking checkpoints; the best one is kept in addition.
      best_mode: "max" or "min".
      async_save: save in a background thread (wait_until_finished/close before exit).
      read_only: never writes (evaluate).
      checksums: write the `checksums` item with each save and check restores against it
        (False: neither, as earlier versions did; for benchmarks and tests).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        keep: int = 3,
        best_metric: str = "auc",
        best_mode: str = "max",
        async_save: bool = True,
        read_only: bool = False,
        checksums: bool = True,
    ):
        self.directory = pathlib.Path(directory).absolute()
        self.checksums = checksums
        self._async = async_save
        # Listed now, removed by `remove_incomplete_saves` once the run decided to go on.
        self.found_incomplete = [] if read_only else self.incomplete_saves()
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

    def step_path(self, step: int) -> pathlib.Path:
        return self.directory / str(int(step))

    def incomplete_saves(self) -> list[pathlib.Path]:
        """Folders of saves that never finished (the process died before Orbax's final rename)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if p.name.endswith(TMP_SUFFIX))

    def remove_incomplete_saves(self) -> None:
        """Deletes the folders of saves that never finished (never restorable; Orbax would only
        overwrite the one of a step it saves again). Process 0 deletes; all processes wait."""
        import shutil

        if jax.process_index() == 0:
            for path in self.incomplete_saves():
                shutil.rmtree(path, ignore_errors=True)
        _sync("isic_jax_remove_incomplete")

    def reload(self) -> None:
        """Re-reads the step list from disk (after `set_aside`)."""
        self._manager.reload()

    def set_aside(self, step: int, reason: str | None = None) -> pathlib.Path:
        """Renames an unreadable step folder to `<step>.corrupt[.k]` (kept for inspection, ignored
        by Orbax) and returns the new path; `reason` goes to its `set_aside.json`. Process 0
        renames; every process reloads."""
        source = self.step_path(step)
        target = source.with_name(source.name + CORRUPT_SUFFIX)
        k = 1
        while target.exists():
            target = source.with_name(f"{source.name}{CORRUPT_SUFFIX}.{k}")
            k += 1
        if jax.process_index() == 0:
            source.rename(target)
            if reason is not None:
                (target / SET_ASIDE_FILE).write_text(json.dumps(
                    {"step": int(step), "reason": reason}, indent=1) + "\n")
        _sync("isic_jax_set_aside")
        self.reload()
        return target

    def saved_state_signature(self, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """{array name: (shape, dtype)} of a checkpoint's train state, from its metadata only.

        Raises:
          Exception: the metadata is missing or unreadable (a damaged checkpoint).
        """
        handler = ocp.StandardCheckpointHandler()
        try:
            metadata = handler.metadata(self.step_path(step) / STATE)
        finally:
            handler.close()
        tree = getattr(metadata, "tree", metadata)
        if tree is None:
            raise FileNotFoundError(f"no state metadata in {self.step_path(step) / STATE}")
        return state_signature(tree)

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
        topology: dict[str, Any] | None = None,
        train_loss: float | None = None,
    ) -> bool:
        """Starts an asynchronous save of one step. Returns whether a save was started.

        Args:
          state: one (unreplicated) copy of the train state, device or host arrays.
          rng: the run's base PRNG key (typed, or its raw uint32 [2] bits); stored as bits.
          data_iter: the input pipeline's state after the last consumed batch.
          config: the resolved config as a plain dict.
          metrics: scalar validation metrics of this step (ranks it for "best").
          topology: where it was written ({"processes", "devices", "parallelism"}), stored
            with the RNG key so that a resume on other hardware can say what changed.
          train_loss: the training loss logged last (kept with the checksums, so that a
            non-finite loss after a resume can say the loss was finite before).
        """
        rng_item: dict[str, Any] = {"key": key_bits(rng).tolist()}
        if topology is not None:
            rng_item["topology"] = topology
        items: dict[str, Any] = {
            STATE: ocp.args.StandardSave(state),
            RNG: ocp.args.JsonSave(rng_item),
            CONFIG: ocp.args.JsonSave(config),
        }
        # The CRCs wait for `released` (set once the blocking part of the save returns): they
        # run in Orbax's background commit, never beside the step's own share of the save.
        released = threading.Event() if self._async else None
        if self.checksums:
            items[CHECKSUMS] = self._checksums(state, rng_item, config, data_iter, train_loss)
            items[CHECKSUMS].after = released
        if data_iter is not None:
            import grain

            if events.active():
                data_iter = _NotifyDuringCommit(data_iter, step)
            items[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
        clean = None
        if metrics is not None:
            clean = {k: float(v) for k, v in metrics.items() if is_scalar(v)}
        try:
            return self._manager.save(
                step, args=ocp.args.Composite(**items), metrics=clean, force=force
            )
        finally:
            if released is not None:
                released.set()

    @staticmethod
    def _checksums(state: PyTree, rng_item: dict[str, Any], config: dict[str, Any],
                   data_iter: IteratorState | None, train_loss: float | None
                   ) -> integrity.ChecksumSave:
        """The `checksums` item of a save: host views of the state's arrays (hashed later, in
        Orbax's background commit) and the CRCs of the small items."""
        files = {}
        if data_iter is not None:  # grain's handler writes get_state()'s bytes as they are
            name = f"{DATA_ITER}/{integrity.process_file()}"
            files[name] = integrity.crc32(data_iter.get_state())
        extra = {}
        if train_loss is not None and math.isfinite(float(train_loss)):
            extra["train_loss"] = float(train_loss)
        return integrity.ChecksumSave(
            arrays={STATE: integrity.named_arrays(state)},
            json={RNG: integrity.json_crc32(rng_item), CONFIG: integrity.json_crc32(config)},
            files=files, extra=extra)

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
          data_iter: receives the saved input-pipeline state (IteratorState(iterator=it)). When
            the checkpoint was written by another number of processes (no file for this one),
            process 0's saved state is given to every process: the pipeline's state counts
            global batches (batch j of every process holds part of global batch j, and the
            parts of all processes make up the same global batch whatever their number), so the
            global stream continues where it stopped, re-sliced over the new processes. This
            needs the saved states of all processes to be equal, which is checked.

        Raises:
          CheckpointError: per-process input states that differ (not re-sliceable).
          integrity.IntegrityError: what was restored differs from the checksums saved with it
            (the message names the step and the array or item).
          Exception: whatever Orbax raises on a missing or damaged item.
        """
        items: dict[str, Any] = {}
        rebuild = None
        if state_target is not None:
            state_target, rebuild = _without_fields_added_since(
                state_target, self.step_path(step) / STATE)
            items[STATE] = ocp.args.StandardRestore(state_target)
        if with_rng:
            items[RNG] = ocp.args.JsonRestore()
        if with_config:
            items[CONFIG] = ocp.args.JsonRestore()
        note = None
        if data_iter is not None:
            import grain

            own = _data_iter_file(self.step_path(step) / DATA_ITER)
            if own.exists():
                items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
            else:
                note = _restore_resliced(self.step_path(step) / DATA_ITER, data_iter)
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
        checksums, manifest = integrity.OFF, None
        if self.checksums:
            manifest = integrity.read_checkpoint_manifest(self.step_path(step))
            checksums = integrity.ABSENT if manifest is None else integrity.VERIFIED
        if manifest is not None:
            _verify(manifest, f"checkpoint {self.step_path(step)}", out,
                    data_iter if DATA_ITER in items else None)
            if note is not None:  # re-sliced: the files read directly
                _verify_data_iter_files(self.step_path(step))
        rng = topology = None
        if with_rng:
            rng = np.asarray(out[RNG]["key"], dtype=np.uint32)
            topology = out[RNG].get("topology")
        state = out[STATE] if state_target is not None else None
        if rebuild is not None:
            state = rebuild(state)
        return Restored(
            step=step,
            state=state,
            rng=rng,
            config=out[CONFIG] if with_config else None,
            data_note=note,
            topology=topology,
            checksums=checksums,
            train_loss=(manifest or {}).get("extra", {}).get("train_loss"),
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


def open_checkpointer(workdir: str | os.PathLike, config: Any, *, read_only: bool = False
                      ) -> Checkpointer:
    """The `Checkpointer` of a run folder (`workdir/checkpoints`), with the config's retention
    (train.keep_checkpoints, train.best_metric). `read_only` for evaluate and export."""
    best = str(config.train.best_metric)
    return Checkpointer(
        pathlib.Path(workdir) / CHECKPOINTS_DIR,
        keep=int(config.train.keep_checkpoints),
        best_metric=best,
        best_mode=config_utils.best_metric_mode(best),
        read_only=read_only,
    )


def is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def abstract_target(abstract_state: PyTree, sharding: jax.sharding.Sharding) -> PyTree:
    """ShapeDtypeStructs with `sharding` on every leaf: a restore target for any device count."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_state
    )


# ---------------------------------------------------------------------------------------------
# Helpers: state signatures, input state on another process count.


def _key_name(entry: Any) -> str:
    for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey/FlattenedIndexKey, SequenceKey
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def state_signature(tree: PyTree) -> dict[str, tuple[tuple[int, ...], str]]:
    """{dotted name: (shape, dtype)} of every array leaf, named as Orbax names them on disk
    (dataclass fields, dict keys and NamedTuple fields by name, sequence items by index).

    Works on arrays, jax.ShapeDtypeStruct and Orbax's ArrayMetadata alike.
    """
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = ".".join(_key_name(k) for k in path)
        shape = tuple(int(d) for d in getattr(leaf, "shape", np.shape(leaf)))
        dtype = str(np.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype)))
        out[name] = (shape, dtype)
    return out


def signature_differences(
    saved: dict[str, tuple[tuple[int, ...], str]],
    expected: dict[str, tuple[tuple[int, ...], str]],
    limit: int = 5,
) -> list[str]:
    """Readable differences between a checkpoint's signature and the current config's."""
    lines = []
    for name in sorted(set(saved) | set(expected)):
        a, b = saved.get(name), expected.get(name)
        if a == b:
            continue
        if a is None:
            lines.append(f"{name}: not in the checkpoint (this config has {b[0]} {b[1]})")
        elif b is None:
            lines.append(f"{name}: only in the checkpoint ({a[0]} {a[1]})")
        else:
            lines.append(f"{name}: checkpoint {a[0]} {a[1]}, this config {b[0]} {b[1]}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


def _without_fields_added_since(target: PyTree, path: pathlib.Path) -> tuple[PyTree, Any]:
    """A restore target for a checkpoint written before some empty state field existed.

    A dataclass state whose field is an empty dict (e.g. `TrainState.swa` with SWA off) cannot be
    restored by Orbax from a checkpoint that lacks the field (tree structures differ). Then the
    other fields are restored as a dict and put back into `target`: returns (that dict target,
    rebuild(restored dict) -> state); else (target, None).
    """
    if not dataclasses.is_dataclass(target):
        return target, None
    fields = [f.name for f in dataclasses.fields(target)]
    empty = [name for name in fields if isinstance(getattr(target, name), dict)
             and not getattr(target, name)]
    if not empty:
        return target, None
    handler = ocp.StandardCheckpointHandler()
    try:
        metadata = handler.metadata(path)
        saved = getattr(metadata, "tree", metadata)
    except Exception:  # noqa: BLE001 - the restore itself reports an unreadable checkpoint
        return target, None
    finally:
        handler.close()
    if not isinstance(saved, dict):
        return target, None
    missing = [name for name in empty if name not in saved]
    if not missing:
        return target, None
    partial = {name: getattr(target, name) for name in fields if name not in missing}
    return partial, lambda restored: target.replace(**restored)


def _data_iter_file(directory: pathlib.Path) -> pathlib.Path:
    """This process's file in a data_iter item (grain's handler naming)."""
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def _restore_resliced(directory: pathlib.Path, data_iter: IteratorState) -> str:
    """Gives process 0's saved input state to this process (another process count; see
    `Checkpointer.restore`). Returns a note for the log."""
    files = sorted(directory.glob("process_*-of-*.json"))
    if not files:
        raise FileNotFoundError(f"no input-pipeline state in {directory}")
    states = {}
    for path in files:
        try:
            states[path.name] = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"unreadable input-pipeline state {path}: {e}") from e
    first = next(iter(states.values()))
    saved_count = files[0].stem.split("-of-")[-1]
    if any(state != first for state in states.values()):
        raise CheckpointError(
            f"the per-process input-pipeline states in {directory} differ, so they cannot be "
            f"re-sliced over {jax.process_count()} process(es); resume with the process count "
            f"that wrote them ({saved_count})."
        )
    data_iter.set_state(json.dumps(first).encode())
    return (
        f"the input pipeline was saved by {saved_count} process(es) and resumes on "
        f"{jax.process_count()}: the same global batches continue, re-sliced over the processes"
    )


def _verify(manifest: dict[str, Any], where: str, out: Any,
            data_iter: IteratorState | None) -> None:
    """Compares the restored items with this process's manifest (integrity.IntegrityError)."""
    if STATE in out:
        integrity.check_arrays(manifest["arrays"].get(STATE, {}),
                               integrity.named_leaves(out[STATE]), f"{where}, {STATE}",
                               unchecked=manifest["unchecked"].get(STATE, ()))
    for name in (RNG, CONFIG):
        if name in out:
            integrity.check_value(manifest["json"].get(name), integrity.json_crc32(out[name]),
                                  where, f"the {name} item")
    if data_iter is not None and isinstance(data_iter._state, bytes):
        name = f"{DATA_ITER}/{integrity.process_file()}"
        integrity.check_value(manifest["files"].get(name), integrity.crc32(data_iter._state),
                              where, f"the input-pipeline state ({name})")


def _verify_data_iter_files(step_dir: pathlib.Path) -> None:
    """Checks every process's input-pipeline file against that process's manifest (a restore
    on another process count reads them directly)."""
    for path in sorted((step_dir / CHECKSUMS).glob("process_*-of-*.json")):
        manifest = integrity.parse_manifest(path)
        for rel, want in manifest["files"].items():
            if rel.startswith(DATA_ITER + "/"):
                file = step_dir / rel
                data = file.read_bytes() if file.is_file() else b""
                integrity.check_value(want, integrity.crc32(data), f"checkpoint {step_dir}",
                                      f"the input-pipeline state ({rel})")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
