#!/usr/bin/env bash
# Build llama.cpp's llama-server from the llama.cpp that llama-cpp-python vendors, so the
# benchmark (scripts/bench.py) compares edgellm with the exact same inference code.
#
#   scripts/build_llama_server.sh            # prints the path of the binary on its last line
#
# Everything goes into a cache folder outside the repository (never commit the binary):
#   ${EDGELLM_BENCH_CACHE:-~/.cache/edgellm-bench}/llama-cpp-python-<version>/build/bin/llama-server
# Re-running is a no-op once the binary exists. Needs cmake, a C++ compiler and pip.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${EDGELLM_BENCH_CACHE:-$HOME/.cache/edgellm-bench}"
PIP="${PIP:-$(dirname "$0")/../.venv/bin/pip}"
[ -x "$PIP" ] || PIP="pip"
JOBS="${JOBS:-$(nproc)}"

SRC="$CACHE/llama-cpp-python-$VERSION"
BIN="$SRC/build/bin/llama-server"

if [ -x "$BIN" ]; then
    echo "$BIN"
    exit 0
fi

mkdir -p "$CACHE"
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
    echo "downloading the llama-cpp-python $VERSION source distribution..." >&2
    "$PIP" download --no-deps --no-binary :all: --dest "$CACHE" "llama-cpp-python==$VERSION" >&2
    tar -xzf "$CACHE/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE" 2>/dev/null \
        || tar -xzf "$CACHE/llama-cpp-python-$VERSION.tar.gz" -C "$CACHE"
    [ -d "$SRC" ] || mv "$CACHE/llama_cpp_python-$VERSION" "$SRC"
fi

GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
echo "configuring llama.cpp (vendored by llama-cpp-python $VERSION)..." >&2
cmake -S "$SRC/vendor/llama.cpp" -B "$SRC/build" "${GEN[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TESTS=OFF >&2
echo "building llama-server with $JOBS jobs (takes a few minutes)..." >&2
nice -n 10 cmake --build "$SRC/build" --target llama-server -j "$JOBS" >&2
[ -x "$BIN" ] || { echo "build finished but $BIN is missing" >&2; exit 1; }
echo "$BIN"
