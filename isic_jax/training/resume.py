"""Resuming a run: the newest readable checkpoint onto this run's devices, or a fresh state.

    start = restore_or_init(setup, ckpt, train_iter)   # Start(step, state, rng), printed notes

What `restore_latest_good` guarantees: interrupted saves are ignored, a damaged checkpoint (one
that cannot be read, or whose content differs from the checksums saved with it) is set aside
(`<step>.corrupt`, with the reason in its set_aside.json) for the previous one, another model's
checkpoints stop the run before anything is written, and a run never starts from scratch
silently while checkpoints exist.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from isic_jax import config_utils
from isic_jax.logging_utils import say
from isic_jax.training import checkpointing, integrity
from isic_jax.training.state import TrainState

PyTree = Any


@dataclasses.dataclass
class Start:
    """Where phase 3 begins: the step done so far, the state (one copy) and the run's key."""

    step: int
    state: TrainState
    rng: jax.Array
    # What the run resumed from (None: a fresh state): its step, checksum status, loss at save.
    restored: checkpointing.Restored | None = None


def restore_or_init(setup: Any, ckpt: checkpointing.Checkpointer, train_iter: Any) -> Start:
    """Phase 2 of the loop: `restore_latest_good`, with what changed since printed; else init.

    Args:
      setup: the loop's `Setup` (config, devices, schedule, keys).
      ckpt: the run's checkpointer.
      train_iter: the training iterator; receives the saved input-pipeline state.
    """
    restored = restore_latest_good(
        ckpt,
        abstract_state=setup.abstract_state(),
        sharding=setup.par.state_sharding(),
        train_iter=train_iter,
        config_dict=setup.config_dict,
        is_main=setup.is_main,
    )
    if restored is None:
        return Start(step=0, state=setup.init_state(), rng=setup.train_rng)
    step = restored.step
    message = f"Resuming from {ckpt.directory}/{step} ({step}/{setup.total_steps})."
    changed = config_utils.config_differences(restored.config or {}, setup.config_dict)
    if changed:
        message += " Config changed since that checkpoint:\n  " + "\n  ".join(changed)
    for note in topology_notes(restored, setup.topology, setup.config_dict):
        message += "\n  " + note
    if restored.checksums == integrity.ABSENT:
        message += "\n  " + integrity.absent_note(f"Checkpoint {step}")
    say(setup.is_main, message)
    return Start(step=step, state=restored.state,
                 rng=jax.random.wrap_key_data(jnp.asarray(restored.rng, jnp.uint32)),
                 restored=restored)


def _all_processes(flag: bool) -> bool:
    """Whether `flag` holds on every process (each process restores on its own; they must agree
    on the step they continue from)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.int32(bool(flag)))
    return bool(np.all(np.asarray(flags)))


_REASON_BYTES = 1024  # per process, when the processes tell each other why a restore failed


def _failure_anywhere(reason: str | None) -> str | None:
    """None when the restore worked on every process, else the first failing process's reason
    ("on process i: ..." when it is another one). Every process gets the same answer, so they
    agree on the step they continue from (each restores and checks its own copy)."""
    if jax.process_count() == 1:
        return reason
    from jax.experimental import multihost_utils

    row = np.zeros(1 + _REASON_BYTES, np.uint8)
    if reason is not None:
        data = reason.encode()[:_REASON_BYTES]
        row[0], row[1:1 + len(data)] = 1, np.frombuffer(data, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(row)).reshape(-1, 1 + _REASON_BYTES)
    for i, other in enumerate(rows):
        if other[0]:
            text = bytes(other[1:]).rstrip(b"\0").decode(errors="replace")
            return text if i == jax.process_index() else f"on process {i}: {text}"
    return None


def _reason(error: BaseException, limit: int = 600) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) > limit:
        text = text[:limit] + " ..."
    return f"{type(error).__name__}: {text}"


def restore_latest_good(
    ckpt: checkpointing.Checkpointer,
    *,
    abstract_state: PyTree,
    sharding: jax.sharding.Sharding,
    train_iter: Any,
    config_dict: dict[str, Any],
    is_main: bool,
) -> checkpointing.Restored | None:
    """Restores the newest checkpoint that can be read; None when the folder holds none.

    - Interrupted saves (`<step>.orbax-checkpoint-tmp`) are not checkpoints: reported, and
      deleted once the run goes on (from a checkpoint or from scratch when there is none).
    - A checkpoint of another model (its state's array names/shapes/dtypes differ from this
      config's, read from its metadata only) stops the run with `CheckpointError` before
      anything is restored or written: falling back would hide a wrong --workdir.
    - A finalized checkpoint that fails to restore (truncated or missing file, missing item) or
      whose restored content differs from the checksums saved with it (bytes changed on disk;
      each process checks its own copy) is reported with its step and the reason (the array),
      and the previous one is tried. Once one restores on every process, the bad newer ones
      are renamed `<step>.corrupt` (kept, ignored by Orbax; the reason in set_aside.json) so
      that the run can write those step numbers again.
    - When none can be restored: `CheckpointError`; a run never starts from scratch silently
      while checkpoints exist.

    The state is restored into `abstract_state` placed with `sharding` (this run's devices,
    whatever the device count that wrote it); the input pipeline's state goes to `train_iter`.
    """
    for path in ckpt.found_incomplete:
        say(is_main, f"Ignoring {path}: a save that never finished (the run was killed while "
                        f"writing it); the newest complete checkpoint is used instead.")
    steps = ckpt.all_steps()
    if not steps:
        ckpt.remove_incomplete_saves()
        return None
    expected = checkpointing.state_signature(abstract_state)
    target = checkpointing.abstract_target(abstract_state, sharding)
    failures: list[tuple[int, str]] = []
    for step in reversed(steps):
        where = f"{ckpt.directory}/{step}"
        saved = error = None
        try:
            saved = ckpt.saved_state_signature(step)
        except Exception as e:  # noqa: BLE001 - any unreadable metadata means a damaged step
            error = e
        if _all_processes(error is None) and saved != expected:
            _raise_other_model(ckpt, step, saved or {}, expected, config_dict)
        if error is None:
            try:
                restored = ckpt.restore(
                    step, target, data_iter=checkpointing.IteratorState(iterator=train_iter)
                )
            except checkpointing.CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many types
                error = e
        failure = _failure_anywhere(_reason(error) if error is not None else None)
        if failure is None:
            ckpt.remove_incomplete_saves()
            for bad, why in failures:
                moved = ckpt.set_aside(bad, reason=why)
                say(is_main, f"Moved the unusable checkpoint {ckpt.directory}/{bad} to "
                                f"{moved} (kept for inspection; delete it when done).")
            return restored
        failures.append((step, failure))
        what = "is damaged" if f"{integrity.IntegrityError.__name__}:" in failure else (
            "cannot be restored")
        say(is_main, f"WARNING: checkpoint {where} {what} ({failure}). Trying the previous "
                        f"checkpoint.")
    listing = "\n  ".join(f"step {s}: {r}" for s, r in failures)
    raise checkpointing.CheckpointError(
        f"None of the {len(steps)} checkpoint(s) in {ckpt.directory} can be restored:\n  "
        f"{listing}\nNot starting from scratch over them. To train from scratch, move that "
        f"folder away or use a new --workdir; to keep the run, restore the folder from a backup."
    )


# Config keys that shape the train state; named when a workdir holds another model.
_STATE_KEYS = ("model.", "optim.name", "optim.accumulation_steps", "optim.ema_decay",
               "optim.swa_start_epoch", "finetune.", "data.task", "data.release",
               "data.image_size")


def _raise_other_model(
    ckpt: checkpointing.Checkpointer,
    step: int,
    saved: dict[str, Any],
    expected: dict[str, Any],
    config_dict: dict[str, Any],
) -> None:
    """CheckpointError for a workdir whose checkpoints hold another model's state."""
    try:
        saved_config = ckpt.restore(step, None, with_rng=False).config or {}
    except Exception:  # noqa: BLE001 - the config item is only used to explain
        saved_config = {}
    changed = [line for line in config_utils.config_differences(saved_config, config_dict)
               if line.startswith(_STATE_KEYS)]
    lines = changed or checkpointing.signature_differences(saved, expected)
    raise checkpointing.CheckpointError(
        f"{ckpt.directory} holds checkpoints of another model (step {step}), which this config "
        f"cannot resume:\n  " + "\n  ".join(lines) + "\nUse a new --workdir for this config, "
        f"or resume with the config the run was started with ({ckpt.directory.parent}/"
        f"{config_utils.CONFIG_FILENAME}). Nothing in {ckpt.directory} was changed."
    )


def topology_notes(
    restored: checkpointing.Restored, topology: dict[str, Any], config_dict: dict[str, Any]
) -> list[str]:
    """What changed in hardware since the checkpoint, and what it means for the data order."""
    notes = []
    old = restored.topology or {}
    if old and (old.get("processes"), old.get("devices")) != (
        topology["processes"], topology["devices"]
    ):
        notes.append(
            f"Written by {old.get('processes')} process(es) on {old.get('devices')} device(s), "
            f"resumed by {topology['processes']} on {topology['devices']}: the state is "
            f"re-placed on the current devices and every global batch is the same as before "
            f"(its split over devices changes, so results match up to float rounding)."
        )
    if restored.data_note:
        notes.append(restored.data_note[0].upper() + restored.data_note[1:] + ".")
    old_batch = ((restored.config or {}).get("train") or {}).get("batch_size")
    new_batch = config_dict["train"]["batch_size"]
    if old_batch is not None and old_batch != new_batch:
        notes.append(
            f"WARNING: train.batch_size changed ({old_batch} -> {new_batch}): the input state "
            f"counts global batches, so the stream resumes at example {restored.step} x "
            f"{new_batch} instead of {restored.step} x {old_batch}; examples are skipped or "
            f"repeated once."
        )
    return notes
