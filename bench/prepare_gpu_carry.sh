#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the pure-Python wheels the GPU machine (Python 3.12, no package index)
# lacks: diffusers with importlib_metadata and zipp, a wheel of this tree (rerun after every code
# change), and in .whl/pytest/ pytest with its dependencies (installed only if the image has none).
# Carry .whl to the device run (bench/README.md). EXTRA_WHEELS="name==version ..." fetches more.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

download() {  # download DIR SPEC...: wheels for CPython 3.12 on x86-64 Linux, no dependencies
  local dir=$1; shift
  for spec in "$@"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" "$spec"
  done
}

rm -rf .whl && mkdir -p .whl/pytest
# shellcheck disable=SC2086
download .whl diffusers==0.42.1 importlib_metadata==8.7.1 zipp==4.1.2 ${EXTRA_WHEELS:-}
download .whl/pytest pytest==9.0.3 pluggy==1.6.0 iniconfig==2.3.0 packaging==26.0 pygments==2.19.2
"$PY" -m pip wheel -q --no-deps -w .whl .  # build isolation: works without the `wheel` package
ls -l .whl .whl/pytest && du -sh .whl
