"""One thin module per `isic-jax` subcommand: absl flags + a `main(argv)` that calls the library.

Helpers shared by the commands live here (absl only: importing this package must not import jax,
whose XLA flags the commands set first).
"""

from __future__ import annotations

import sys
from typing import NoReturn, TypeVar

from absl import app, flags

_T = TypeVar("_T")


def underscore_alias(holder: flags.FlagHolder[_T]) -> flags.FlagHolder[_T]:
    """Also accept `--a_b` for the dashed flag `--a-b` (the docs spell the dashed name).

    Usage: `_DATA_DIR = underscore_alias(flags.DEFINE_string("data-dir", ...))`.
    """
    name = holder.name
    # absl files a flag under the module that defines it and `isic-jax CMD --help` lists that
    # module's flags: file the alias with its flag, not under this package.
    module_name = flags.FLAGS.find_module_defining_flag(name)
    flags.DEFINE_alias(name.replace("-", "_"), name, module_name=module_name)
    return holder


def no_arguments(argv: list[str]) -> None:
    """Raise app.UsageError when `argv` (as absl.app.run passes it) has positional arguments."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")


def checkpoint_flag_value(value: str) -> str:
    """The value of a `--checkpoint latest|best|STEP` flag, checked; raises app.UsageError."""
    if value not in ("latest", "best") and not value.isdigit():
        raise app.UsageError(f"--checkpoint must be latest, best or a step number, got {value!r}")
    return value


def fail(command: str, error: object, status: int) -> NoReturn:
    """Print `isic-jax COMMAND: error` on stderr and exit with `status`."""
    print(f"isic-jax {command}: {error}", file=sys.stderr, flush=True)
    sys.exit(status)
