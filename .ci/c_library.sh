#!/usr/bin/env bash
# CI of the C/C++ library (libfusion_engine), from a clean checkout, in temporary directories:
#   1. the normal build (CPU, -O3) and its ctest suite
#   2. install to a temporary prefix; the example built against it with find_package and run;
#      a C program built with the pkg-config file
#   3. the ctest suite under AddressSanitizer + UndefinedBehaviorSanitizer
#   4. the CUDA build (-DFUSION_ENGINE_CUDA=ON, sm_80 + sm_90) and its ctest suite (CPU paths, and the
#      device tests of csrc/tests/test_cuda.cpp, skipped with the reason printed when no GPU is usable),
#      when nvcc is present (FE_CI_CUDA=0 skips it)
#   5. the libFuzzer harness (clang) for FUZZ_SECONDS (default 60) from the seed corpus, then a
#      replay of fuzz/regressions and fuzz/corpus; a crash is saved to fuzz/regressions/ and fails
#      the run (commit it with the fix: ctest replays it from then on)
# Installs what it needs with apt when missing (cmake, ninja, g++, clang, libclang-rt, pkg-config).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$PWD"
JOBS="$(nproc 2>/dev/null || echo 2)"
FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS
step() { echo; echo "== $* ($((SECONDS - START)) s)"; }

# --- tools -------------------------------------------------------------------------------------
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
  echo "error: need root (or sudo) to install: ${*: -1}" >&2; exit 1; fi; }
apt_install() {
  echo "installing with apt: $*"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v ninja >/dev/null || missing+=(ninja-build)
command -v g++ >/dev/null || missing+=(g++)
command -v pkg-config >/dev/null || missing+=(pkg-config)
CLANGXX="$(command -v clang++ || ls /usr/bin/clang++-[0-9]* 2>/dev/null | sort -V | tail -1 || true)"
[ -n "$CLANGXX" ] || missing+=(clang)
if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
CLANGXX="$(command -v clang++ || ls /usr/bin/clang++-[0-9]* | sort -V | tail -1)"
CLANG="${CLANGXX/clang++/clang}"
# libFuzzer ships in libclang-rt-<major>-dev on Debian/Ubuntu
printf '#include <stddef.h>\n#include <stdint.h>\nint LLVMFuzzerTestOneInput(const uint8_t* d, size_t n) { return 0; }\n' > "$WORK/probe.c"
if ! "$CLANG" -fsanitize=fuzzer "$WORK/probe.c" -o "$WORK/probe" 2>/dev/null; then
  major="$("$CLANG" --version | sed -n 's/.*clang version \([0-9]*\).*/\1/p' | head -1)"
  apt_install "libclang-rt-${major}-dev"
fi
GEN=(-G Ninja)
echo "cmake $(cmake --version | head -1 | awk '{print $3}'), $(g++ --version | head -1), $("$CLANGXX" --version | head -1), $JOBS jobs"

# --- 1. normal build ---------------------------------------------------------------------------
step "1. build (Release, CPU) + ctest"
cmake -S . -B "$WORK/build" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$WORK/build" --parallel "$JOBS"
ctest --test-dir "$WORK/build" --output-on-failure

# --- 2. install + example ----------------------------------------------------------------------
step "2. install, the example against the installed package, pkg-config"
PREFIX="$WORK/prefix"
cmake --install "$WORK/build" --prefix "$PREFIX" >/dev/null
cmake -S examples/cpp -B "$WORK/example" "${GEN[@]}" -DCMAKE_PREFIX_PATH="$PREFIX" >/dev/null
cmake --build "$WORK/example"
mkdir -p "$WORK/demo"
"$WORK/example/merge_adapters" --make-demo "$WORK/demo"
"$WORK/example/merge_adapters" "$WORK/demo/base.safetensors" "$WORK/demo/merged.safetensors" ties \
  "lora:$WORK/demo/lora_a.safetensors:1.0:0.5:2.0" "lora:$WORK/demo/lora_b.safetensors:0.5:0.5:2.0"
export PKG_CONFIG_PATH="$PREFIX/lib/pkgconfig"
echo "pkg-config: $(pkg-config --modversion fusion_engine): $(pkg-config --cflags --libs fusion_engine)"
# shellcheck disable=SC2046
cc -std=c99 -Wall -Wextra -pedantic -Werror csrc/tests/test_c_header.c $(pkg-config --cflags --libs fusion_engine) \
  -Wl,-rpath,"$PREFIX/lib" -o "$WORK/c_header_pkgconfig"
"$WORK/c_header_pkgconfig"

# --- 3. sanitizers -----------------------------------------------------------------------------
step "3. AddressSanitizer + UndefinedBehaviorSanitizer build + ctest"
cmake -S . -B "$WORK/asan" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Debug -DFUSION_ENGINE_SANITIZE=ON >/dev/null
cmake --build "$WORK/asan" --parallel "$JOBS"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir "$WORK/asan" --output-on-failure

# --- 4. CUDA -----------------------------------------------------------------------------------
if [ "${FE_CI_CUDA:-1}" != 0 ] && command -v nvcc >/dev/null; then
  step "4. CUDA build (sm_80, sm_90) + ctest (device tests skip without a GPU)"
  cmake -S . -B "$WORK/cuda" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DFUSION_ENGINE_CUDA=ON >/dev/null
  cmake --build "$WORK/cuda" --parallel "$JOBS"
  ctest --test-dir "$WORK/cuda" --output-on-failure
else
  step "4. CUDA build skipped (no nvcc, or FE_CI_CUDA=0)"
fi

# --- 5. fuzzing --------------------------------------------------------------------------------
step "5. libFuzzer: fuzz_safetensors for ${FUZZ_SECONDS} s, then the regressions"
cmake -S . -B "$WORK/fuzz" "${GEN[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFUSION_ENGINE_FUZZ=ON \
  -DCMAKE_C_COMPILER="$CLANG" -DCMAKE_CXX_COMPILER="$CLANGXX" >/dev/null
cmake --build "$WORK/fuzz" --target fuzz_safetensors --parallel "$JOBS"
FUZZER="$WORK/fuzz/fuzz_safetensors"
mkdir -p "$WORK/corpus" "$WORK/artifacts"
if ! "$FUZZER" "$WORK/corpus" fuzz/corpus -max_total_time="$FUZZ_SECONDS" -dict=fuzz/safetensors.dict \
     -artifact_prefix="$WORK/artifacts/" -print_final_stats=1 >"$WORK/fuzz.log" 2>&1; then
  tail -40 "$WORK/fuzz.log"
  mkdir -p fuzz/regressions
  for f in "$WORK"/artifacts/*; do
    [ -e "$f" ] || continue
    cp "$f" "fuzz/regressions/$(basename "$f")"
    echo "saved fuzz/regressions/$(basename "$f")"
  done
  echo "error: the fuzzer found a crash; fix it and commit the files above (ctest replays them)" >&2
  exit 1
fi
grep -E "^(Done|stat::number_of_executed_units|stat::average_exec_per_sec|stat::new_units_added)" "$WORK/fuzz.log"
"$FUZZER" -runs=0 fuzz/corpus fuzz/regressions >"$WORK/replay.log" 2>&1 || { tail -40 "$WORK/replay.log"; exit 1; }
echo "replayed fuzz/corpus ($(find fuzz/corpus -type f | wc -l) files) and fuzz/regressions" \
     "($(find fuzz/regressions -type f ! -name 'README*' | wc -l) crash files): no crash"

step "C library CI passed in $((SECONDS - START)) s"
