"""Stop cleanly on SIGTERM/SIGINT (preemption, time limits, Ctrl-C), in step on every process.

    with PreemptionGuard(sync_every=config.train.log_every) as guard:
        for step in range(start + 1, total + 1):
            state, metrics = p_train(state, batch, rng)
            if guard.should_stop(step):      # call at EVERY step, on every process
                save_checkpoint(step)        # all processes save the same step
                break

SLURM (`--signal`, scancel, time limit), Kubernetes (pod deletion, node drain) and Cloud TPU
maintenance all send SIGTERM, then SIGKILL after a grace period. The first signal lets the current
step finish, then every process saves the same step and leaves the loop. A second signal (or
SIGKILL) ends the process at once; Orbax commits a checkpoint atomically, so the last completed
checkpoint survives and a rerun resumes from it.

How processes agree on the step to stop at (`mode`):

- "local" (one process): Python handlers for SIGTERM and SIGINT set a flag; `should_stop` reads
  it. No cost.
- "jax" (several processes under `jax.distributed`, the default there): JAX's preemption service.
  `jax.distributed.initialize` installs JAX's own SIGTERM handler (a C++ notifier); the process
  that gets SIGTERM tells the coordination service, all processes agree on the step after the
  most advanced one, and `jax.experimental.multihost_utils.reached_preemption_sync_point(step)`
  turns True at that same step everywhere (Orbax's `CheckpointManager.reached_preemption(step)`
  is the same call). SIGTERM is therefore left to JAX (installing a Python SIGTERM handler would
  silence its notifier); SIGINT is forwarded to it as a SIGTERM. Cost per step: a mutex check
  in C++, no device or host sync; the stop comes ~1-2 s after the signal (the notifier polls
  every second). It must be called at every step; JAX absorbs further SIGTERMs, so a second
  SIGTERM does not kill the process (the scheduler's SIGKILL does), a second SIGINT does.
- "allgather" (several processes, JAX's preemption service disabled with
  `jax_enable_preemption_service=False`, or chosen): Python handlers as in "local"; every
  `sync_every` steps the processes all-gather their flags (`multihost_utils.process_allgather`)
  and stop if any is set. Cost: one tiny cross-process collective and a host sync every
  `sync_every` steps (it waits for the steps already queued on the devices); with sync_every
  equal to the logging interval, which syncs the host anyway, it costs next to nothing. A stop
  comes at most `sync_every` steps after the signal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

MODES = ("auto", "local", "jax", "allgather")
_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# Suggested exit status of `isic-jax train` after a signal-triggered checkpoint (EX_TEMPFAIL:
# "try again"). Not 0, so that schedulers start the run again instead of marking it complete
# (a Kubernetes Job counts a pod that exits 0 as done; scripts/launch/k8s_jobset.yaml restarts on
# 75); not 1, so that it is not mistaken for a crash.
EXIT_PREEMPTED = 75


def _say(text: str) -> None:
    # os.write, not print: a handler runs between two bytecodes of the main thread, which may be
    # inside a print to the same stream (a buffered write would raise "reentrant call").
    with contextlib.suppress(OSError):
        os.write(2, (text.rstrip("\n") + "\n").encode())


class PreemptionGuard:
    """Context manager: installs the signal handlers of its mode, restores the previous ones.

    Args:
      mode: "auto" (one process: "local"; several: "jax" when JAX's preemption service runs,
        else "allgather"), or one of "local", "jax", "allgather" (see the module docstring).
      sync_every: "allgather" only: steps between two agreements (all processes must use the
        same value and call `should_stop` at every step).
      num_processes: processes in the run (default: `jax.process_count()`).

    Attributes:
      mode: the resolved mode (after `__enter__`).
      signal_received: the first signal this process received, or None.
    """

    def __init__(self, mode: str = "auto", sync_every: int = 1, num_processes: int | None = None):
        if mode not in MODES:
            raise ValueError(f"PreemptionGuard mode must be one of {MODES}; got {mode!r}")
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1; got {sync_every}")
        self._requested_mode = mode
        self.mode = mode
        self.sync_every = int(sync_every)
        self._num_processes = num_processes
        self.signal_received: int | None = None
        self._stop_step: int | None = None
        self._previous: dict[int, Any] = {}

    # --- context ---------------------------------------------------------------------------

    def __enter__(self) -> PreemptionGuard:
        self.mode = self._resolve_mode()
        if threading.current_thread() is not threading.main_thread():
            # Python only delivers signals to the main thread: nothing to install.
            logger.warning("PreemptionGuard outside the main thread: signals are not handled.")
            return self
        handled = (signal.SIGINT,) if self.mode == "jax" else _SIGNALS
        for signum in handled:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _resolve_mode(self) -> str:
        if self._requested_mode != "auto":
            return self._requested_mode
        n = self._num_processes
        if n is None:
            import jax

            n = jax.process_count()
        if n <= 1:
            return "local"
        return "jax" if _jax_preemption_service() is not None else "allgather"

    # --- signals ---------------------------------------------------------------------------

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_received is not None:  # only reached if a handler is still ours
            self._exit_now(signum)
        self.signal_received = signum
        # From now on the kernel's default action handles these signals directly: a second
        # one ends the process at once, even while the main thread is blocked in C++ code.
        for s in self._previous:
            signal.signal(s, signal.SIG_DFL)
        if self.mode == "jax":
            _say(f"isic-jax: {name} received: telling the other processes; all will finish the "
                 f"current step, save a checkpoint and exit ({name} again exits at once).")
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's notifier, which owns SIGTERM
        else:
            _say(f"isic-jax: {name} received: finishing the current step, saving a checkpoint, "
                 f"then exiting ({name} again exits at once; the last completed checkpoint is "
                 f"kept).")

    @staticmethod
    def _exit_now(signum: int) -> None:
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)

    @property
    def requested(self) -> bool:
        """Whether this process received a stop signal (it may not have stopped yet)."""
        return self.signal_received is not None

    # --- the decision ----------------------------------------------------------------------

    def should_stop(self, step: int) -> bool:
        """Whether to save a checkpoint after `step` and stop; the same answer on every process.

        Call it once per step, at every step, on every process (after the step was dispatched).
        Once True it stays True.
        """
        if self._stop_step is not None:
            return True
        if self.mode == "local":
            stop = self.signal_received is not None
        elif self.mode == "jax":
            from jax.experimental import multihost_utils

            stop = bool(multihost_utils.reached_preemption_sync_point(int(step)))
        else:
            stop = step % self.sync_every == 0 and self._any_process_requested()
        if stop:
            self._stop_step = int(step)
            if self.mode != "local":
                _say(f"isic-jax: stop requested on some process: every process saves a "
                     f"checkpoint after step {step} and exits.")
        return stop

    def _any_process_requested(self) -> bool:
        import numpy as np
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.signal_received is not None))
        return bool(np.any(np.asarray(flags)))


def _jax_preemption_service() -> Any:
    """JAX's preemption sync manager when `jax.distributed` runs with it, else None."""
    from jax._src import distributed as jax_distributed

    state = jax_distributed.global_state
    if state.client is None:
        return None
    return getattr(state, "preemption_sync_manager", None)
