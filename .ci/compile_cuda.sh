#!/usr/bin/env bash
# CUDA compile check (no GPU needed): every csrc/cuda/*.cu with nvcc for sm_80 and sm_90, warnings
# as errors; the pybind11 binding csrc/python/bind_cuda.cpp with the host compiler (when pybind11
# is importable); then a link of all objects into one shared object and a check that no fe::
# symbol is left undefined. Skipped (exit 0) when nvcc is not on PATH. Run from anywhere; PYTHON
# picks the interpreter whose pybind11 and headers are used (default: python3).
set -euo pipefail

if ! command -v nvcc >/dev/null 2>&1; then
  echo "nvcc not found; skipping CUDA compile check"
  exit 0
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# the toolkit nvcc really runs from (nvcc on PATH may be a wrapper script)
CUDA_HOME="${CUDA_HOME:-$(dirname "$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p')")}"
[ -f "$CUDA_HOME/include/cuda_runtime_api.h" ] || CUDA_HOME=/usr/local/cuda
PYTHON="${PYTHON:-python3}"
CXX="${CXX:-g++}"
JOBS="$(nproc 2>/dev/null || echo 2)"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

NVCC_FLAGS=(-c -O3 -std=c++17 -Xcompiler -fPIC -Icsrc/core -Icsrc/cuda -Icsrc/include
            -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90
            -Xcompiler -Wall,-Wextra -Werror all-warnings)
export OUT
export NVCC_FLAGS_STR="${NVCC_FLAGS[*]}"

# The binding needs pybind11's headers; CI's fresh venv has them only if the test extra lists
# pybind11 (the build itself runs isolated), so without them that one step is skipped, loudly.
PYBIND11_INCLUDE="$("$PYTHON" -c 'import pybind11; print(pybind11.get_include())' 2>/dev/null || true)"
PYTHON_INCLUDE="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null || true)"

start=$SECONDS
echo "nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'): csrc/cuda/*.cu for sm_80 and sm_90 ($JOBS jobs)"
bind_pid=""
if [ -n "$PYBIND11_INCLUDE" ] && [ -n "$PYTHON_INCLUDE" ]; then
  echo "  csrc/python/bind_cuda.cpp ($CXX)"
  "$CXX" -c -O1 -std=c++17 -fPIC -Wall -Wextra -Werror -fvisibility=hidden \
    -Icsrc/core -Icsrc/cuda -Icsrc/include -I"$CUDA_HOME/include" \
    -isystem "$PYBIND11_INCLUDE" -isystem "$PYTHON_INCLUDE" \
    csrc/python/bind_cuda.cpp -o "$OUT/bind_cuda.o" &
  bind_pid=$!
else
  echo "WARNING: pybind11 is not importable by $PYTHON: csrc/python/bind_cuda.cpp NOT checked" \
       "(pip install pybind11, or set PYTHON)"
fi
# one nvcc per file, largest (slowest) first, in parallel; xargs fails if any of them fails
ls -S csrc/cuda/*.cu | xargs -P "$JOBS" -I{} sh -c 'echo "  {}"; nvcc $NVCC_FLAGS_STR "{}" -o "$OUT/$(basename "{}").o"'
if [ -n "$bind_pid" ]; then wait "$bind_pid"; fi

echo "  linking"
"$CXX" -shared -o "$OUT/_C_cuda.so" "$OUT"/*.o -L"$CUDA_HOME/lib64" -lcudart
undefined="$(nm -C -u "$OUT/_C_cuda.so" | grep ' fe::' || true)"
if [ -n "$undefined" ]; then
  echo "error: undefined fe:: symbols:" >&2
  echo "$undefined" >&2
  exit 1
fi
echo "CUDA compile check passed in $((SECONDS - start)) s"
