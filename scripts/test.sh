#!/usr/bin/env bash
# Sets up .venv from the project's own files (once) and runs ruff and the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k pipeline`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e ".[test]"
ruff check .
python -m pytest -q -n 2 --timeout=900 "$@"
