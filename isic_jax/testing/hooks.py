"""Kill points: `ISIC_JAX_TEST_KILL_AT=<point>:<step>` makes the process SIGKILL itself there.

- `during_save:<step>`: inside the background commit of that step's asynchronous save (its tmp
  folder exists, the checkpoint is not finalized; training/checkpointing.py).
- `after_step:<step>`: right after that training step, once the saves of earlier steps are
  finalized (training/loop.py).

`install()` registers the killer as an observer of `training.events` when the variable is set;
`runs.train` and `python -m isic_jax.testing.cli` (the CLI with it installed) call it. So tests
can kill a run at an exact place. Never set it outside tests.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

from isic_jax.training import events

TEST_KILL_ENV = "ISIC_JAX_TEST_KILL_AT"


def kill_point(point: str, step: int, before: Callable[[], None] | None = None) -> None:
    """SIGKILL this process if `ISIC_JAX_TEST_KILL_AT` is `<point>:<step>`; else a no-op (one
    dict lookup).

    `before` runs first, e.g. to let earlier asynchronous saves finish so that what is on disk
    at the kill does not depend on timing.
    """
    wanted = os.environ.get(TEST_KILL_ENV)
    if wanted and wanted == f"{point}:{int(step)}":
        if before is not None:
            before()
        print(f"isic-jax: test hook {TEST_KILL_ENV}={wanted}: SIGKILL", file=sys.stderr,
              flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


_installed = False


def install() -> None:
    """Registers `kill_point` with `training.events` (once) when `ISIC_JAX_TEST_KILL_AT` is
    set; otherwise nothing."""
    global _installed
    if os.environ.get(TEST_KILL_ENV) and not _installed:
        events.add_observer(kill_point)
        _installed = True
