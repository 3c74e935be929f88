#!/usr/bin/env bash
# Downloads the wheels scripts/device_check.sh installs on a machine without network (Python 3.12,
# x86-64 Linux) into .whl/ (fallbacks into .whl/fallback/), from scripts/device_requirements.txt.
# Run it here, where pip reaches a package index; .whl/ is git-ignored and travels with the check.
# A package published only as a source archive is built into a pure-Python wheel here (refused if
# the build is platform-specific). Starts from an empty .whl/ (one version of each package).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64)
rm -rf .whl && mkdir -p .whl/fallback
build_dir=$(mktemp -d)
trap 'rm -rf "$build_dir"' EXIT
while read -r line; do
  spec="${line%%#*}"; spec="${spec//[[:space:]]/}"
  [ -z "$spec" ] && continue
  dest=.whl; [[ "$line" == *"# fallback"* ]] && dest=.whl/fallback
  if ! "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d "$dest" "$spec" 2>/dev/null; then
    echo "$spec: no wheel for Python 3.12 x86-64; building a pure-Python one from its source"
    "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-binary=:all: \
      -w "$build_dir" "$spec"
    built=$(ls "$build_dir"/*.whl)
    case "$built" in
      *-none-any.whl) mv "$built" "$dest/" ;;
      *) echo "$spec: the built wheel is platform-specific ($built): not usable there" >&2; exit 1 ;;
    esac
  fi
done < scripts/device_requirements.txt
count=$(find .whl -name '*.whl' | wc -l)
echo "$count wheels, $(du -sh .whl | cut -f1) in .whl/ (a call carries 64 MiB at most)"
