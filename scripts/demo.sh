#!/usr/bin/env bash
# The main job on a fresh machine: sets up .venv, then `isic-jax demo`, which generates a
# synthetic ISIC 2020-style dataset, prepares it with the TFDS builder, trains a small ResNet on
# the CPU for a few minutes, evaluates it and prints where metrics and checkpoints are.
# Extra arguments go to `isic-jax demo` (e.g. --workdir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e .
isic-jax demo "$@"
