"""`python -m isic_jax.testing.cli COMMAND [flags]`: the `isic-jax` command line with the test
kill hooks installed (`hooks.install`), for tests that kill a CLI run at an exact place."""

from __future__ import annotations

from isic_jax import cli
from isic_jax.testing import hooks

if __name__ == "__main__":
    hooks.install()
    cli.main()
