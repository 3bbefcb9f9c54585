#!/usr/bin/env bash
# The chat benchmark on an NVIDIA GPU (issue 12, point 6): builds llama.cpp with CUDA from the sources
# that llama-cpp-python 0.3.36 vendors (the shared libraries its Python package loads, and
# llama-server), then runs scripts/bench.py with every layer on the GPU for both edgellm and
# llama-server, on the same GPU, and writes the "## Chat on a GPU" section of BENCHMARKS.md
# (the CPU sections stay).
#
#   scripts/bench_gpu.sh build      # configure and build (a few minutes with many cores)
#   scripts/bench_gpu.sh bench      # waits for the build, then runs the benchmark
#   scripts/bench_gpu.sh all        # both, one after the other
#
# The llama_cpp Python package comes from the same source tree (PYTHONPATH) and loads the CUDA
# libraries through LLAMA_CPP_LIB_PATH, so the venv's own llama-cpp-python (a CPU build) is not used.
# Python: $PYTHON, else .venv/bin/python, else python3 (it needs edgellm's dependencies).
#
# On a GPU machine with no network, in two steps (the build runs in the background in between):
#   scripts/bench_gpu.sh bundle DIR          # here: DIR/a (sources, half the model), DIR/b (the
#                                            # other half, Python 3.12 wheels of edgellm's dependencies)
#   scripts/bench_gpu.sh start-build DIR/a   # there: unpacks, starts the build with setsid, returns
#   scripts/bench_gpu.sh bench DIR/b         # there: joins the model, installs the wheels into
#                                            # $CACHE/site, waits for the build, runs the benchmark
#
# Settings (environment):
#   CUDA_ARCH    CMAKE_CUDA_ARCHITECTURES (default native; 90 for an H100)
#   GPU_CMAKE    the CUDA part of the cmake flags; set it empty for a CPU-only build, which rehearses
#                the whole flow on a machine without a GPU (the benchmark then runs on the CPU)
#   CPU_CMAKE    the CPU part (default: GGML_NATIVE off, AVX2/FMA/F16C/BMI2 on)
#   JOBS         build jobs (default: all cores)
#   N_GPU_LAYERS (default 99: all), THREADS (default 8, both servers), CONCURRENCY (1,4,8,16),
#   TOKENS (128), ROUNDS (4), BENCH_EXTRA (more scripts/bench.py arguments)
#   EDGELLM_BENCH_CACHE  where sources, build, logs and wheels go (default ~/.cache/edgellm-bench)
#   OUT          where the results are copied (default bench-out/gpu): BENCHMARKS.md with the GPU
#                section, gpu-section.md, bench.log, build-log.txt, server-logs.txt, gpu.txt
#   BUILD_WAIT   seconds `bench` waits for a build still running (default 1800)
set -euo pipefail
export PYTHONUNBUFFERED=1

REPO="${EDGELLM_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
SELF="$REPO/scripts/bench_gpu.sh"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${EDGELLM_BENCH_CACHE:-$HOME/.cache/edgellm-bench}"
SRC="$CACHE/llama-cpp-python-$VERSION"
BUILD="$CACHE/build-gpu"
BUILD_LOG="$CACHE/build-gpu.log"
BUILD_RC="$CACHE/build-gpu.rc"
BUILD_CMD="$CACHE/build-gpu.cmake"
TIMES="$CACHE/gpu-times.txt"
CUDA_ARCH="${CUDA_ARCH:-native}"
GPU_CMAKE="${GPU_CMAKE--DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH -DGGML_CUDA_FA_ALL_QUANTS=OFF -DGGML_CUDA_NCCL=OFF}"
CPU_CMAKE="${CPU_CMAKE:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON}"
JOBS="${JOBS:-$(nproc)}"
MODEL_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL="${MODEL:-$REPO/models/$MODEL_NAME}"
OUT="${OUT:-$REPO/bench-out/gpu}"
WHEELS="pyzmq==27.3.0 werkzeug==3.1.9 markupsafe==3.0.4 waitress==3.0.2 sqlite-vec==0.1.9 apsw==3.54.1.0
        diskcache==5.6.3 typing-extensions==4.16.0 jinja2==3.1.6"

stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }
# "phase seconds" lines, gathered into gpu.txt
timed() { local name="$1" t0; shift; t0=$(date +%s); "$@"; echo "$name $(( $(date +%s) - t0 )) s" >>"$TIMES"; }

python_bin() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"
    elif [ -x "$REPO/.venv/bin/python" ]; then echo "$REPO/.venv/bin/python"
    else command -v python3; fi
}

# The CUDA toolkit's cuBLAS, else the one a Python package ships (nvidia-cublas: nvidia/cu13/...),
# and the driver library; prints extra cmake flags. Some images have nvcc and the runtime only.
cuda_extra_flags() {
    local nvcc home inc lib drv dep flags=()
    nvcc="$(command -v nvcc || true)"
    [ -x /usr/local/cuda/bin/nvcc ] && nvcc=/usr/local/cuda/bin/nvcc
    [ -n "$nvcc" ] || { echo "nvcc not found: install the CUDA toolkit or put nvcc on PATH" >&2; return 1; }
    flags+=("-DCMAKE_CUDA_COMPILER=$nvcc")
    home="$(cd "$(dirname "$nvcc")/.." && pwd)"
    if [ ! -e "$home/include/cublas_v2.h" ] || ! ls "$home"/lib64/libcublas.so* >/dev/null 2>&1; then
        # torch's CUDA wheels: site-packages/nvidia/cu13/{include,lib}
        inc="$(for d in $("$(python_bin)" -c 'import nvidia; print(*nvidia.__path__)' 2>/dev/null); do
                   ls "$d"/*/include/cublas_v2.h 2>/dev/null; done | head -1)"
        [ -n "$inc" ] || inc="$(find /opt /usr/local/lib /usr/lib -maxdepth 10 -path '*nvidia/*' -name cublas_v2.h \
                                2>/dev/null | head -1)"
        [ -n "$inc" ] || { echo "cuBLAS not found (no cublas_v2.h in $home/include nor in a Python nvidia package)" >&2; return 1; }
        inc="$(dirname "$inc")"
        lib="$(dirname "$inc")/lib"
        dep="$CACHE/cublas"  # only the cuBLAS headers, so the package's other headers do not shadow nvcc's
        rm -rf "$dep"; mkdir -p "$dep/include" "$dep/lib"
        ln -s "$inc"/cublas*.h "$dep/include/"
        ln -s "$lib"/libcublas*.so* "$dep/lib/"  # the versioned names, which the built libraries need at run time
        [ -e "$dep/lib/libcublas.so" ] || ln -s "$(ls "$lib"/libcublas.so.* | head -1)" "$dep/lib/libcublas.so"
        [ -e "$dep/lib/libcublasLt.so" ] || ln -s "$(ls "$lib"/libcublasLt.so.* | head -1)" "$dep/lib/libcublasLt.so"
        flags+=("-DCUDA_cublas_LIBRARY=$dep/lib/libcublas.so" "-DCUDA_cublasLt_LIBRARY=$dep/lib/libcublasLt.so"
                "-DCMAKE_CUDA_FLAGS=-I$dep/include" "-DCMAKE_CXX_FLAGS=-I$dep/include")
        echo "using cuBLAS from $lib" >&2
    fi
    if [ ! -e "$home/lib64/libcuda.so" ] && [ ! -e "$home/lib64/stubs/libcuda.so" ]; then
        drv="$(ldconfig -p 2>/dev/null | awk '/libcuda\.so.*x86-64/ {print $NF; exit}')"
        [ -n "$drv" ] || drv="$(for d in ${LD_LIBRARY_PATH//:/ } /usr/local/nvidia/lib64 /usr/local/nvidia/lib \
                                    /usr/lib/x86_64-linux-gnu /usr/lib64; do ls "$d"/libcuda.so* 2>/dev/null; done | head -1)"
        if [ -n "$drv" ]; then flags+=("-DCUDA_cuda_driver_LIBRARY=$drv"); echo "using the driver library $drv" >&2
        else flags+=("-DGGML_CUDA_NO_VMM=ON"); echo "no libcuda found: building with GGML_CUDA_NO_VMM" >&2; fi
    fi
    printf '%s\n' "${flags[@]}"
}

ensure_source() {
    [ -d "$SRC/vendor/llama.cpp" ] && return
    mkdir -p "$CACHE"
    local pip="$REPO/.venv/bin/pip"; [ -x "$pip" ] || pip="pip"
    stamp "downloading the llama-cpp-python $VERSION source distribution"
    "$pip" download --no-deps --no-binary :all: --dest "$CACHE" "llama-cpp-python==$VERSION"
    tar -xzf "$CACHE/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE"
    [ -d "$SRC" ] || mv "$CACHE/llama_cpp_python-$VERSION" "$SRC"
}

do_build() {
    local t0 rc=0 extra=()
    t0=$(date +%s)
    local flags=""
    rm -f "$BUILD_RC"
    ensure_source || { echo 1 >"$BUILD_RC"; return 1; }
    if [ -n "$GPU_CMAKE" ]; then
        flags="$(cuda_extra_flags)" || { stamp "build failed: no usable CUDA toolkit"; echo 1 >"$BUILD_RC"; return 1; }
        mapfile -t extra <<<"$flags"
    fi
    # shellcheck disable=SC2206
    local gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
    local cmd=(cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release
               -DBUILD_SHARED_LIBS=ON -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON
               -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_APP=OFF
               -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF $CPU_CMAKE $GPU_CMAKE "${extra[@]}")
    stamp "$(cmake --version | head -n 1); ninja $(ninja --version 2>&1); $(nvcc --version 2>&1 | tail -n 1)"
    printf '%q ' "${cmd[@]}" >"$BUILD_CMD"; echo >>"$BUILD_CMD"
    echo "cmake --build $BUILD --target llama llama-server -j $JOBS" >>"$BUILD_CMD"
    stamp "configure: $(cat "$BUILD_CMD")"
    "${cmd[@]}" || rc=$?
    if [ $rc -eq 0 ]; then
        stamp "build: llama (the libraries llama_cpp loads) and llama-server, $JOBS jobs"
        cmake --build "$BUILD" --target llama llama-server -j "$JOBS" || rc=$?
    fi
    if [ $rc -eq 0 ] && [ ! -x "$BUILD/bin/llama-server" -o ! -e "$BUILD/bin/libllama.so" ]; then
        echo "the build finished but $BUILD/bin lacks llama-server or libllama.so"; rc=1
    fi
    echo "build $(( $(date +%s) - t0 )) s (rc $rc)" >>"$TIMES"
    stamp "build finished: rc $rc after $(( $(date +%s) - t0 )) s"
    echo $rc >"$BUILD_RC"
    return $rc
}

start_build() {
    local a="${1:-}"
    mkdir -p "$CACHE"
    : >"$TIMES"
    if [ -n "$a" ]; then
        stamp "unpacking $a/src.tar.xz into $CACHE"
        # tar needs xz for .xz; Python's tarfile does not
        timed unpack tar -xJf "$a/src.tar.xz" -C "$CACHE" 2>/dev/null \
            || timed unpack "$(python_bin)" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
                "$a/src.tar.xz" "$CACHE"
        [ -e "$a/model.part1" ] && cp "$a/model.part1" "$CACHE/model.part1"
    fi
    # the background build runs a copy of this script: the working tree may be replaced meanwhile
    cp "$SELF" "$CACHE/bench_gpu.sh"
    rm -f "$BUILD_RC"
    EDGELLM_REPO="$REPO" EDGELLM_BENCH_CACHE="$CACHE" setsid nohup bash "$CACHE/bench_gpu.sh" _build-from "$REPO" >"$BUILD_LOG" 2>&1 </dev/null &
    echo $! >"$CACHE/build-gpu.pid"
    stamp "build started in the background (pid $!), log $BUILD_LOG"
    # START_WAIT seconds at most: until cmake has configured (or failed), to show that it did
    local waited=0
    while [ $waited -lt "${START_WAIT:-0}" ] && [ ! -s "$BUILD_RC" ] && ! grep -q '^\[.*\] build: ' "$BUILD_LOG"; do
        sleep 2; waited=$((waited + 2))
    done
    [ "${START_WAIT:-0}" -gt 0 ] && { stamp "after ${waited}s the build log ends:"; tail -n 25 "$BUILD_LOG"; }
    [ ! -s "$BUILD_RC" ] || [ "$(cat "$BUILD_RC")" = 0 ] || { stamp "THE BUILD FAILED"; return 1; }
}

wait_build() {
    local waited=0 limit="${BUILD_WAIT:-1800}"
    if [ ! -e "$BUILD_LOG" ]; then
        stamp "no build was started here ($BUILD_LOG is missing): run 'build' or 'start-build' first (on a lent" \
              "machine: was it given back between the two steps?)"; return 1
    fi
    while [ ! -s "$BUILD_RC" ]; do
        if [ -s "$CACHE/build-gpu.pid" ] && ! kill -0 "$(cat "$CACHE/build-gpu.pid")" 2>/dev/null && [ ! -s "$BUILD_RC" ]; then
            stamp "the build process is gone without a result; its log ends:"; tail -n 40 "$BUILD_LOG"; return 1
        fi
        if [ $waited -ge "$limit" ]; then
            stamp "the build did not finish within ${limit}s; its log ends:"; tail -n 40 "$BUILD_LOG"; return 1
        fi
        [ $((waited % 30)) -eq 0 ] && stamp "waiting for the build: $(tail -n 1 "$BUILD_LOG" 2>/dev/null | cut -c1-160)"
        sleep 5; waited=$((waited + 5))
    done
    if [ "$(cat "$BUILD_RC")" != 0 ]; then
        stamp "THE BUILD FAILED (rc $(cat "$BUILD_RC")); its log ends:"; tail -n 60 "$BUILD_LOG"; return 1
    fi
    echo "waited for the build ${waited} s" >>"$TIMES"
    stamp "build ok"
}

prepare_offline() {  # bench DIR/b: the model's second half and the wheels
    local b="$1" py="$2"
    if [ -e "$b/model.part2" ]; then
        [ -e "$CACHE/model.part1" ] || { stamp "$CACHE/model.part1 is missing: run start-build DIR/a first (on a" \
                                              "lent machine: was it given back between the two steps?)"; return 1; }
        mkdir -p "$(dirname "$MODEL")"
        cat "$CACHE/model.part1" "$b/model.part2" >"$MODEL.tmp" || return 1
        if [ "$(sha256sum "$MODEL.tmp" | cut -d' ' -f1)" != "$(cat "$b/model.sha256")" ]; then
            stamp "the joined model's sha256 differs from $b/model.sha256"; return 1
        fi
        mv "$MODEL.tmp" "$MODEL"
        stamp "model joined: $MODEL"
    fi
    if ls "$b"/whl/*.whl >/dev/null 2>&1; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$CACHE/site" \
            "$b"/whl/*.whl || return 1
        stamp "wheels installed into $CACHE/site"
    fi
}

collect() {  # everything that matters, into $OUT (at most 8 files)
    mkdir -p "$OUT"
    { [ -e "$BUILD_CMD" ] && { echo "== cmake"; cat "$BUILD_CMD"; }
      echo "== build log (last 400 lines)"; tail -n 400 "$BUILD_LOG" 2>/dev/null; } >"$OUT/build-log.txt" || true
    for f in "$CACHE"/logs/edgellm-p*.log "$CACHE"/logs/llama-server-p*.log; do
        [ -e "$f" ] || continue
        if [ "$(wc -l <"$f")" -le 80 ]; then echo "== $f"; cat "$f"
        else echo "== $f (first 50 and last 30 lines)"; head -n 50 "$f"; echo "[...]"; tail -n 30 "$f"; fi
    done >"$OUT/server-logs.txt" 2>&1 || true
    { echo "== nvidia-smi"; nvidia-smi 2>&1 || true
      echo "== nvcc"; nvcc --version 2>&1 | tail -n 2 || true
      echo "== GPU processes during the bench (nvidia-smi every 5 s: pid, name, GPU memory)"
      cat "$CACHE/gpu-apps.csv" 2>/dev/null
      echo "== timings"; cat "$TIMES" 2>/dev/null
      echo "== uname"; uname -a; nproc; } >"$OUT/gpu.txt" 2>&1 || true
}

do_bench() {
    local b="${1:-}" py t0 rc=0
    py="$(python_bin)"
    mkdir -p "$CACHE" "$OUT"
    touch "$TIMES"
    t0=$(date +%s)
    { [ -z "$b" ] || prepare_offline "$b" "$py"; } || { collect; return 1; }
    echo "prepare $(( $(date +%s) - t0 )) s" >>"$TIMES"
    if [ -n "$b" ] && [ -s "$b/commit" ]; then export EDGELLM_COMMIT="$(cat "$b/commit")"; fi
    wait_build || { collect; return 1; }
    # llama_cpp from the built source tree, its libraries from the build; the wheels' packages after
    mkdir -p "$CACHE/py"; ln -sfn "$SRC/llama_cpp" "$CACHE/py/llama_cpp"
    export PYTHONPATH="$CACHE/py:$CACHE/site${PYTHONPATH:+:$PYTHONPATH}"
    export LLAMA_CPP_LIB_PATH="$BUILD/bin"
    local cudalib="$BUILD/bin:$CACHE/cublas/lib"  # where the toolkit's runtime is not in ld.so's cache
    [ -d /usr/local/cuda/lib64 ] && cudalib="$cudalib:/usr/local/cuda/lib64"
    export LD_LIBRARY_PATH="$cudalib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export EDGELLM_BENCH_CACHE="$CACHE"
    "$py" -c 'import llama_cpp, sys; print("llama_cpp", llama_cpp.__version__, "from", llama_cpp.__file__,
               "gpu offload:", bool(llama_cpp.llama_supports_gpu_offload()), "python", sys.version.split()[0])' \
        || { stamp "llama_cpp does not import with the built libraries"; collect; return 1; }
    local ngl="${N_GPU_LAYERS:-99}" model="$MODEL"
    cd "$REPO"
    case "$model" in "$REPO"/*) model="${model#"$REPO"/}" ;; esac
    # the GPU section's build line (an environment variable keeps it out of the section's command line)
    export EDGELLM_GPU_BUILD="llama.cpp from llama-cpp-python $VERSION's vendored sources (the shared libraries \
that llama_cpp loads through LLAMA_CPP_LIB_PATH, and llama-server), nvcc $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' | \
cut -d' ' -f2); reproduce with \`CUDA_ARCH=$CUDA_ARCH THREADS=${THREADS:-8} ROUNDS=${ROUNDS:-4}${BENCH_EXTRA:+ BENCH_EXTRA=\"$BENCH_EXTRA\"} scripts/bench_gpu.sh all\`; \
configured with \`$(head -n 1 "$BUILD_CMD" | sed "s|$CACHE|\$CACHE|g; s/ *$//")\`"
    [ -e "$REPO/BENCHMARKS.md" ] && cp "$REPO/BENCHMARKS.md" "$OUT/BENCHMARKS.md"
    rm -f "$CACHE"/logs/edgellm-p*.log "$CACHE"/logs/llama-server-p*.log
    stamp "bench: $ngl layers on the GPU"
    rm -f "$CACHE/gpu-apps.csv"
    local smi=""  # which processes hold GPU memory while the servers run: both should
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-compute-apps=timestamp,pid,process_name,used_memory --format=csv,noheader -l 5 \
            >"$CACHE/gpu-apps.csv" 2>&1 &
        smi=$!
    fi
    t0=$(date +%s)
    # shellcheck disable=SC2086
    "$py" scripts/bench.py --model "$model" --only edgellm,llama-server \
        --llama-server "$BUILD/bin/llama-server" --n-gpu-layers "$ngl" \
        --threads "${THREADS:-8}" --tokens "${TOKENS:-128}" --concurrency "${CONCURRENCY:-1,4,8,16}" \
        --rounds "${ROUNDS:-4}" --retries 0 --quiet-wait 5 --start-timeout 180 \
        --out "$OUT/BENCHMARKS.md" ${BENCH_EXTRA:-} || rc=$?
    [ -z "$smi" ] || kill "$smi" 2>/dev/null || true
    echo "bench $(( $(date +%s) - t0 )) s (rc $rc)" >>"$TIMES"
    stamp "bench finished: rc $rc after $(( $(date +%s) - t0 )) s"
    "$py" - "$OUT/BENCHMARKS.md" "$OUT/gpu-section.md" <<'EOF' || true
import sys
text = open(sys.argv[1]).read().splitlines(keepends=True)
start = next((i for i, ln in enumerate(text) if ln.startswith("## Chat on a GPU")), None)
if start is not None:
    end = next((j for j in range(start + 1, len(text)) if text[j].startswith("## ")), len(text))
    open(sys.argv[2], "w").write("".join(text[start:end]))
EOF
    collect
    return $rc
}

bundle() {  # DIR/a: sources + model part 1; DIR/b: model part 2 + wheels for Python 3.12 x86-64
    local dir="$1" tmp half
    ensure_source
    [ -e "$MODEL" ] || { echo "no model at $MODEL (scripts/prepare_models.py)"; return 1; }
    rm -rf "$dir/a" "$dir/b"; mkdir -p "$dir/a" "$dir/b/whl"
    tmp="$(mktemp -d)"
    # what the build needs: no models/ (vocab files), docs, tests, examples, web UI sources, nor the
    # other GPU backends (CMake adds a backend's folder only when it is enabled)
    (cd "$CACHE" && tar -cf "$tmp/src.tar" \
        --exclude='__pycache__' --exclude="llama-cpp-python-$VERSION/llama_cpp/lib" \
        --exclude="llama-cpp-python-$VERSION/vendor/llama.cpp/tools/ui/*/*" \
        --exclude="llama-cpp-python-$VERSION/vendor/llama.cpp/ggml/src/ggml-"{cann,et,hexagon,hip,metal,musa,opencl,openvino,sycl,virtgpu,vulkan,webgpu,zdnn,zendnn} \
        "llama-cpp-python-$VERSION/llama_cpp" \
        "llama-cpp-python-$VERSION/vendor/llama.cpp/"{CMakeLists.txt,LICENSE,cmake,common,ggml,include,src,vendor,tools,app,licenses} \
        "llama-cpp-python-$VERSION/vendor/llama.cpp/scripts/ui-assets.cmake")
    xz -T0 -6 -c "$tmp/src.tar" >"$dir/a/src.tar.xz"
    rm -rf "$tmp"
    half=$(( ($(stat -c %s "$MODEL") + 1) / 2 ))
    head -c "$half" "$MODEL" >"$dir/a/model.part1"
    tail -c +"$((half + 1))" "$MODEL" >"$dir/b/model.part2"
    sha256sum "$MODEL" | cut -d' ' -f1 >"$dir/b/model.sha256"
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$dir/b/whl" $WHEELS
    git -C "$REPO" rev-parse --short HEAD >"$dir/b/commit" 2>/dev/null || true
    du -sh "$dir/a" "$dir/b"
}

case "${1:-}" in
    build) mkdir -p "$CACHE"; : >"$TIMES"; do_build ;;
    _build-from) echo $$ >"$CACHE/build-gpu.pid"; do_build ;;  # start-build's background copy
    start-build) start_build "${2:-}" ;;
    bench) mkdir -p "$OUT"; set -o pipefail; do_bench "${2:-}" 2>&1 | tee "$OUT/bench.log" ;;
    all) mkdir -p "$OUT" "$CACHE"; : >"$TIMES"; set -o pipefail; { do_build && do_bench; } 2>&1 | tee "$OUT/bench.log" ;;
    bundle) bundle "${2:?bundle DIR}" ;;
    *) sed -n '2,35p' "$SELF" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
