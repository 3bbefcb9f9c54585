#!/usr/bin/env bash
# Installs everything (scripts/setup.sh) and starts edgellm on the default models at
# http://localhost:8080/v1 (and its chat page at http://localhost:8080/). Extra arguments go to
# edgellm, e.g. scripts/serve.sh --port 9000
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/edgellm --config edgellm.toml "$@"
