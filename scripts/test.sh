#!/usr/bin/env bash
# Sets up a virtual environment from the project's own files (once) and runs ruff and the tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k pipeline`.
# PYTHON picks the interpreter (default python3), VENV the environment folder (default .venv),
# EXTRAS the extras installed (default test; test,interop adds torch/torchvision/timm, several GB,
# for tests/test_torch_interop.py, which skips without them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e ".[${EXTRAS:-test}]"
python --version
ruff check .
python -m pytest -q -n 2 --timeout=900 "$@"
