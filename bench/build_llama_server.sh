#!/usr/bin/env bash
# Build llama.cpp's llama-server, the peer of `python -m bench compare`, and its llama-quantize
# (bench.kquant_shape), from the llama.cpp that the llama-cpp-python sdist vendors (a pinned, known
# version), under ~/.cache/lmserve-bench.
# Idempotent: each step is skipped when its result exists. Nothing lands in the repository.
#   bash bench/build_llama_server.sh            # prints the binary's path at the end
#   JOBS=4 LMSERVE_BENCH_CACHE=/tmp/lb bash bench/build_llama_server.sh
set -euo pipefail

VERSION=0.3.36
CACHE="${LMSERVE_BENCH_CACHE:-$HOME/.cache/lmserve-bench}"
BIN="$CACHE/build/bin/llama-server"
SDIST="$CACHE/llama_cpp_python-$VERSION.tar.gz"
SRC="$CACHE/llama_cpp_python-$VERSION"

if [ -x "$BIN" ] && [ -x "$CACHE/build/bin/llama-quantize" ]; then
    echo "$BIN"
    exit 0
fi

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
command -v cmake >/dev/null || { echo "cmake is required (apt-get install cmake, or pip install cmake)" >&2; exit 1; }

# CPUID and XCR0 can advertise AMX that the hypervisor will not run (seen on Firecracker VMs with
# Sapphire Rapids hosts): a -march=native build then dies with SIGILL in ggml's AMX matmul during
# load. Probe one real tile instruction; when it fails, build without AMX, everything else native.
no_amx_flags() {
    echo | "${CC:-cc}" -march=native -dM -E - | grep -q __AMX_TILE__ || return 0  # no AMX at all
    local probe
    probe="$(mktemp -d)"
    cat > "$probe/amx.c" <<'C'
#include <immintrin.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    unsigned char config[64];
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */)) return 1;
    memset(config, 0, sizeof config);
    config[0] = 1; config[16] = 64; config[48] = 16;  /* palette 1, tile 0: 16 rows of 64 bytes */
    __asm__ volatile("" : : "r"(config) : "memory");  /* else GCC drops the stores ldtilecfg reads */
    _tile_loadconfig(config);
    _tile_zero(0);
    _tile_release();
    return 0;
}
C
    if ! { "${CC:-cc}" -O2 -mamx-tile -o "$probe/amx" "$probe/amx.c" && ( "$probe/amx" ); } >/dev/null 2>&1; then
        echo "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # explicit -mno-* win over -march=native
    fi
    rm -rf "$probe"
}

mkdir -p "$CACHE"
if [ ! -f "$SDIST" ]; then
    # --no-binary: we want the source distribution (it carries vendor/llama.cpp), not a wheel.
    "$PYTHON" -m pip download --disable-pip-version-check --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$CACHE"
fi
[ -d "$SRC/vendor/llama.cpp" ] || tar -xzf "$SDIST" -C "$CACHE"

# GCC 12's _tile_loadconfig tells the compiler that ldtilecfg reads 8 bytes, so the tile rows ggml
# writes into its stack config before it can be dropped, and its first tile instruction then faults
# (SIGILL in tinygemm_kernel_amx): a compiler barrier before the load keeps them. Idempotent.
MMQ="$SRC/vendor/llama.cpp/ggml/src/ggml-cpu/amx/mmq.cpp"
if [ -f "$MMQ" ] && ! grep -q "lmserve-bench: barrier" "$MMQ"; then
    sed -i 's|^    _tile_loadconfig(&tc);|    __asm__ volatile("" : : "r"(\&tc) : "memory");  /* lmserve-bench: barrier */\n    _tile_loadconfig(\&tc);|' "$MMQ"
fi

# Native CPU kernels; no curl/OpenSSL (the server only ever loads a local file), no tests.
EXTRA_FLAGS="$(no_amx_flags)"
[ -z "$EXTRA_FLAGS" ] || echo "AMX advertised but not executable here: building with $EXTRA_FLAGS" >&2
cmake -S "$SRC/vendor/llama.cpp" -B "$CACHE/build" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF \
    -DCMAKE_C_FLAGS="$EXTRA_FLAGS" -DCMAKE_CXX_FLAGS="$EXTRA_FLAGS"
cmake --build "$CACHE/build" --target llama-server llama-quantize -j"${JOBS:-2}"
echo "$BIN"
