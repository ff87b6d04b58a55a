#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the pure-Python wheels the GPU machine (Python 3.12, no package
# index) lacks: diffusers 0.42.1 with importlib_metadata and zipp, a wheel of this working tree
# (rerun after every code change), and in .whl/pytest/ pytest with its dependencies (installed
# there only if the image has none). Pass carry=[".whl"] to the device run; the command is in
# bench/README.md. EXTRA_WHEELS="name==version ..." fetches more the same way.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WHEELS=(diffusers==0.42.1 importlib_metadata==8.7.1 zipp==4.1.2)
PYTEST_WHEELS=(pytest==9.0.3 pluggy==1.6.0 iniconfig==2.3.0 packaging==26.0 pygments==2.19.2)

download() {  # download DIR SPEC...: wheels for CPython 3.12 on x86-64 Linux, no dependencies
  local dir=$1; shift
  for spec in "$@"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$dir" "$spec"
  done
}

rm -rf .whl
mkdir -p .whl/pytest
download .whl "${WHEELS[@]}"
# shellcheck disable=SC2206
[ -n "${EXTRA_WHEELS:-}" ] && download .whl ${EXTRA_WHEELS}
download .whl/pytest "${PYTEST_WHEELS[@]}"
"$PY" -m pip wheel -q --no-deps -w .whl .  # build isolation: works without the `wheel` package
ls -l .whl .whl/pytest
du -sh .whl
