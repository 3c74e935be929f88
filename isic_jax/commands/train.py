"""`isic-jax train --config configs/X.py --workdir DIR [--config.a.b=value ...]`.

Trains with the config file's `get_config()` plus command-line overrides; a second run on the same
workdir resumes from its latest checkpoint. Exit status: 0 done, 2 bad config (the message names
the key), 3 the loss became NaN/Inf (the latest checkpoint is the last good one).
"""

from __future__ import annotations

import sys

from isic_jax import config_utils

# Before jax is imported: the fast XLA:CPU fusion flags (DESIGN.md), unless XLA_FLAGS is set.
config_utils.set_default_xla_flags()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Python config file with get_config(), e.g. configs/default.py.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run folder: config.json, checkpoints/, tensorboard/, eval/ (resumed if any)."
)
flags.mark_flags_as_required(["config", "workdir"])
config_utils.friendly_override_errors(_CONFIG)

EXIT_CONFIG = 2
EXIT_NON_FINITE = 3


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from isic_jax import train
    from isic_jax.checkpointing import quiet_orbax_logging

    quiet_orbax_logging()
    config = _CONFIG.value
    try:
        config_utils.validate_config(config)
    except OSError as e:  # the config file could not be loaded (ml_collections defers it)
        print(f"isic-jax train: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        sys.exit(EXIT_CONFIG)
    except config_utils.ConfigError as e:
        print(f"isic-jax train: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_CONFIG)
    try:
        train.train_and_evaluate(config, _WORKDIR.value)
    except config_utils.ConfigError as e:
        print(f"isic-jax train: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_CONFIG)
    except train.NonFiniteError as e:
        print(f"isic-jax train: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_NON_FINITE)


if __name__ == "__main__":
    app.run(main)
