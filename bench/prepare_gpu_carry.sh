#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what the GPU machine lacks, for its Python 3.12, on THIS machine:
#   .whl/*.whl         diffusers 0.42.1 (the CIFAR-10 UNet), importlib_metadata + zipp (its
#                      dependencies that the GPU image does not have; huggingface_hub and
#                      safetensors are there), and a wheel of this project (ddpm_engine) built
#                      from the working tree: rerun this script after every code change.
#   .whl/pytest/*.whl  pytest and its pure-Python dependencies, installed on the device only if
#                      the image has no pytest (an installed pytest's plugins stay compatible).
# All are pure-Python wheels (they match any platform). The GPU machine has no package index,
# so they travel with the working tree: pass carry=[".whl"] to the device run.
#
# The device command is in README.md ("GPU verification"): pip install --upgrade --no-compile
# into /tmp/site (a warm rerun replaces the old ddpm_engine), then bench.gpu_check under `timeout`;
# it writes $OUT/gpu_check.json and $OUT/gpu_check.log only.
# Extra wheels (e.g. EXTRA_WHEELS="requests==2.32.3 certifi==2025.8.3") are fetched the same way.
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
