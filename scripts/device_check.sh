#!/usr/bin/env bash
# The device check: on a bare machine with a CUDA GPU and no network, one command measures this
# project's training there (ResNet-50 img/s: bare step, real loop, input pipeline, default config)
# and prints one table last. scripts/device_check.py says what each stage runs.
#
#   bash scripts/fetch_device_wheels.sh     # here, once, with network: the missing packages -> .whl/
#   bash scripts/device_check.sh            # there, in the repository root, with .whl/ carried
#   bash scripts/device_check.sh --dry-run  # anywhere: the same stages, tiny, on the CPU
#   INSTALL_WHEELS=1 PYTHON=... bash scripts/device_check.sh --dry-run  # ... from .whl/ too
#
# Here it: installs .whl/*.whl into $SITE without network or dependency resolution (pip
# --no-index --no-deps --target), adds a pinned fallback from .whl/pins/ for each dependency whose
# preinstalled version is outside the project's pin, makes the working tree's isic_jax importable
# (configs/ as isic_jax.configs, as the wheel lays it out) without building anything, and runs
# scripts/device_check.py. Its report files go to $OUT when that is set. Made for the Python 3.12
# image with jax + the CUDA plugin preinstalled (scripts/device_image_packages.txt); with no .whl/
# it uses the environment as it is (a machine where `pip install -e '.[cuda12]'` was run).
set -uo pipefail
cd "$(dirname "$0")/.."

# Config files (space-separated), each trained briefly after configs/default.py, as it is: the
# hook for new backbone presets, e.g. EXTRA_PRESETS="configs/efficientnet_b0.py".
EXTRA_PRESETS="${EXTRA_PRESETS:-}"
PYTHON="${PYTHON:-python3}"
SITE="${SITE:-/tmp/isic_jax_site}"  # carried wheels are installed here
PROJECT="${PROJECT:-/tmp/isic_jax_project}"  # the working tree's package, laid out as installed
export DEVICE_CHECK_BUDGET_S="${DEVICE_CHECK_BUDGET_S:-540}"  # all stages; one call allows 600
export EXTRA_PRESETS

# Install .whl/ (auto: yes, except for --dry-run, which uses the environment as it is).
INSTALL_WHEELS="${INSTALL_WHEELS:-auto}"
if [ "$INSTALL_WHEELS" = auto ]; then
  INSTALL_WHEELS=1
  for arg in "$@"; do [ "$arg" = --dry-run ] && INSTALL_WHEELS=0; done
fi

start=$(date +%s)
if [ "$INSTALL_WHEELS" = 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
  echo "[device_check.sh] installing $(ls .whl/*.whl | wc -l) carried wheels into $SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --disable-pip-version-check --target "$SITE" .whl/*.whl || echo "[device_check.sh] wheel install FAILED"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  # Preinstalled dependencies outside the project's pins get the carried pinned version.
  fallbacks=$("$PYTHON" - <<'EOF'
import glob, importlib.metadata as md, os, tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
with open("pyproject.toml", "rb") as f:
    pins = {canonicalize_name(r.name): r for r in
            map(Requirement, tomllib.load(f)["project"]["dependencies"])}
for wheel in sorted(glob.glob(".whl/pins/*.whl")):
    name = parse_wheel_filename(os.path.basename(wheel))[0]
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    if have is None or (name in pins and not pins[name].specifier.contains(have, prereleases=True)):
        print(wheel)
EOF
)
  if [ -n "$fallbacks" ]; then
    echo "[device_check.sh] outside the pins, installing the carried ones:" $fallbacks
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --disable-pip-version-check --target "$SITE" $fallbacks || echo "[device_check.sh] pin fallback install FAILED"
  fi
fi
# The working tree's package, importable without an install: isic_jax/ with configs/ inside.
rm -rf "$PROJECT" && mkdir -p "$PROJECT"
cp -r isic_jax "$PROJECT/" && cp -r configs "$PROJECT/isic_jax/configs"
export PYTHONPATH="$PROJECT${PYTHONPATH:+:$PYTHONPATH}"
echo "[device_check.sh] set-up took $(( $(date +%s) - start )) s"
export DEVICE_CHECK_BUDGET_S=$(( DEVICE_CHECK_BUDGET_S - ($(date +%s) - start) ))
exec "$PYTHON" scripts/device_check.py "$@"
