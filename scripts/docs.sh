#!/usr/bin/env bash
# Builds the documentation in docs/ (Markdown, Sphinx + MyST) into docs/_build/html, with every
# warning an error, as CI does. Sets up .venv with the docs extra first if needed.
# VENV picks the environment folder (default .venv), PYTHON the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
if ! python -c "import sphinx, myst_parser, sphinx_book_theme" 2>/dev/null; then
  python -m pip install --quiet -e ".[docs]"
fi
rm -rf docs/_build
python -m sphinx -W --keep-going -b html docs docs/_build/html "$@"
echo "open docs/_build/html/index.html"
