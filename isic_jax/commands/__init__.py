"""One thin module per `isic-jax` subcommand: absl flags + a `main(argv)` that calls the library.

Helpers shared by the commands live here (absl only: importing this package must not import jax,
whose XLA flags the commands set first).
"""

from __future__ import annotations

import enum
import sys
from typing import Any, NoReturn, TypeVar

from absl import app, flags

from isic_jax import config_utils

_T = TypeVar("_T")


class ExitCode(enum.IntEnum):
    """The exit status of every `isic-jax` command (docs/cli.md lists the same table)."""

    OK = 0
    # absl's own status for a flag it cannot parse (an unknown flag, a `--config.a.b` override
    # of an unknown key or of the wrong type).
    FLAGS = 1
    # Bad arguments or config values, a bad distributed setup, a workdir of the wrong kind.
    USAGE = 2
    # The training loss became NaN/Inf.
    NON_FINITE = 3
    # The data is missing or unusable: a dataset not prepared, a download no release matches.
    DATA = 4
    # A workdir's checkpoints cannot be used (another model's, none readable).
    CHECKPOINT = 5
    # Pretrained weights (config.model.init_from) cannot be read or do not fit the model.
    WEIGHTS = 6
    # `export --verify`: the exported program's outputs differ from the model's.
    MISMATCH = 7
    # A checkpoint or export whose content differs from the checksums saved with it (`train`
    # sets such a checkpoint aside and goes on from the previous one instead).
    DAMAGED = 8
    # Stopped by SIGTERM/SIGINT after saving a checkpoint (EX_TEMPFAIL: run it again to resume).
    PREEMPTED = 75


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


def refuse_pretraining_workdir(command: str, workdir: str | None) -> None:
    """Exit USAGE when `workdir` is a self-supervised pretraining workdir (it has no classifier
    to evaluate or export)."""
    if workdir is None:
        return
    import pathlib

    # Imported here: it imports jax, whose XLA flags the commands set first.
    from isic_jax.training.weight_sources import PRETRAIN_RECORD_FILE

    if (pathlib.Path(workdir) / PRETRAIN_RECORD_FILE).is_file():
        fail(command, f"{workdir} is a self-supervised pretraining workdir: it has no classifier "
             f"(its k-NN probe is in {PRETRAIN_RECORD_FILE}); fine-tune it with `isic-jax train "
             f"--config.model.init_from={workdir}` and {command} that run", ExitCode.USAGE)


def validated_config(command: str, config_flag: flags.FlagHolder[Any]) -> Any:
    """The `--config` flag's ConfigDict, checked by `config_utils.validate_config`; a config file
    that cannot be loaded or a bad key or value exits with USAGE, naming it."""
    try:
        config = config_flag.value
        config_utils.validate_config(config)
    except OSError as e:  # the config file could not be loaded (ml_collections defers it)
        fail(command, " ".join(str(e).split()), ExitCode.USAGE)
    except config_utils.ConfigError as e:
        fail(command, e, ExitCode.USAGE)
    return config


def fail(command: str, error: object, status: ExitCode) -> NoReturn:
    """Print `isic-jax COMMAND: error` on stderr and exit with `status`."""
    print(f"isic-jax {command}: {error}", file=sys.stderr, flush=True)
    sys.exit(int(status))
