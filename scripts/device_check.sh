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
# --no-index --no-deps --target), adds the wheel from .whl/fallback/ for each preinstalled package
# whose version misses the project's pins or a carried package's requirement, makes the working tree's isic_jax importable
# (configs/ as isic_jax.configs, as the wheel lays it out) without building anything, and runs
# scripts/device_check.py. Its report files go to $OUT when that is set. Made for the Python 3.12
# image with jax + the CUDA plugin preinstalled (scripts/device_image_packages.txt); with no .whl/
# it uses the environment as it is (a machine where `pip install -e '.[cuda12]'` was run).
set -uo pipefail
cd "$(dirname "$0")/.."

# Config files (space-separated), each trained briefly after configs/default.py from random
# weights (no network there for its timm weights; the step is the same): a new-backbone preset,
# EfficientNet-B3 at 384 px, by default. EXTRA_PRESETS="" skips it.
EXTRA_PRESETS="${EXTRA_PRESETS-configs/efficientnet_b3.py}"
PYTHON="${PYTHON:-python3}"
SITE="${SITE:-/tmp/isic_jax_site}"  # carried wheels go here, fallbacks to ${SITE}_fallback
PROJECT="${PROJECT:-/tmp/isic_jax_project}"  # the working tree's package, laid out as installed
export DEVICE_CHECK_BUDGET_S="${DEVICE_CHECK_BUDGET_S:-480}"  # all of it; one call allows 600
export EXTRA_PRESETS

# Install .whl/ (auto: yes, except for --dry-run, which uses the environment as it is).
INSTALL_WHEELS="${INSTALL_WHEELS:-auto}"
if [ "$INSTALL_WHEELS" = auto ]; then
  INSTALL_WHEELS=1
  for arg in "$@"; do [ "$arg" = --dry-run ] && INSTALL_WHEELS=0; done
fi

start=$(date +%s)
if [ "$INSTALL_WHEELS" = 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
  # Fresh folders: pip --target --upgrade replaces a whole top-level folder, and namespace
  # packages share one (google/ of protobuf and of googleapis-common-protos): the fallbacks get a
  # folder of their own, first on the path.
  rm -rf "$SITE" "${SITE}_fallback"
  echo "[device_check.sh] installing $(ls .whl/*.whl | wc -l) carried wheels into $SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --disable-pip-version-check --target "$SITE" .whl/*.whl || echo "[device_check.sh] wheel install FAILED"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  # A fallback from .whl/fallback/ for each preinstalled package whose version misses the
  # project's pins or a carried package's requirement; the rest of what is unmet is printed.
  fallbacks=$("$PYTHON" - "$SITE" <<'EOF'
import glob, importlib.metadata as md, os, sys, tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
with open("pyproject.toml", "rb") as f:
    wanted = [(Requirement(r), "isic-jax") for r in tomllib.load(f)["project"]["dependencies"]]
for dist in md.distributions(path=[sys.argv[1]]):
    wanted += [(Requirement(r), dist.metadata["Name"]) for r in dist.requires or []]
wheels = {parse_wheel_filename(os.path.basename(w))[0]: w for w in glob.glob(".whl/fallback/*.whl")}
install = set()
for req, by in wanted:
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    name = canonicalize_name(req.name)
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    if have is None or not req.specifier.contains(have, prereleases=True):
        if name in wheels:
            install.add(wheels[name])
        else:
            print(f"[device_check.sh] unmet: {by} needs {req}, found {have}", file=sys.stderr)
print(" ".join(sorted(install)))
EOF
)
  if [ -n "$fallbacks" ]; then
    echo "[device_check.sh] preinstalled versions miss a requirement; installing:" $fallbacks
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --disable-pip-version-check --target "${SITE}_fallback" $fallbacks \
      || echo "[device_check.sh] fallback install FAILED"
    export PYTHONPATH="${SITE}_fallback:$PYTHONPATH"
  fi
fi
# The working tree's package, importable without an install: isic_jax/ with configs/ inside.
rm -rf "$PROJECT" && mkdir -p "$PROJECT"
cp -r isic_jax "$PROJECT/" && cp -r configs "$PROJECT/isic_jax/configs"
export PYTHONPATH="$PROJECT${PYTHONPATH:+:$PYTHONPATH}"
echo "[device_check.sh] set-up took $(( $(date +%s) - start )) s"
export DEVICE_CHECK_BUDGET_S=$(( DEVICE_CHECK_BUDGET_S - ($(date +%s) - start) ))
exec "$PYTHON" scripts/device_check.py "$@"
