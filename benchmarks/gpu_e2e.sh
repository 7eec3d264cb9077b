#!/usr/bin/env bash
# Whole merges on the GPU (issue 13), one device call of about 7 minutes on an H200:
#
#   run(command="bash benchmarks/gpu_e2e.sh", carry=[".whl"], timeout_s=540)     # alone
#   GPU_E2E=1 bash benchmarks/gpu_suite.sh                                        # as the suite's last stage
#
# Stages, each under its own timeout, logs in $OUT as they run:
#   setup.txt        the package: the suite's installed one (FE_INSTALLED=1), else pip install of the
#                    checkout (C++ extension; FUSION_ENGINE_CUDA=$E2E_CUDA_EXT, default 0: the GPU merge then
#                    runs the triton / torch backends), or the checkout as is (SKIP_BUILD=1)
#   ctest_cuda.txt   the C library with -DFUSION_ENGINE_CUDA=ON, sm_90: ctest -R cuda (ops and the LoRA merger
#                    on device buffers vs host buffers)
#   pytest_gpu.txt   the @gpu tests of the executor, torchrun, CLI, alignment and data-aware modules
#   RESULTS_gpu_e2e.md  benchmarks/gpu_e2e_report.py: 1.1 B Llama, 3 fine-tunes + base, --device cuda vs the
#                    I/O floor vs mergekit-yaml --cuda (ties, dare_ties, slerp, della, model_stock), peak RSS,
#                    and torchrun --nproc-per-node 2 checked byte for byte against one process
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
RUN="$(mktemp -d)"   # scratch working directory: the checkout never shadows an installed package
cd "$RUN" || exit 1
read -r -a PYCMD <<<"${PY:-python3 -P}"

if [ "${FE_INSTALLED:-0}" != 1 ]; then
  if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site "$REPO"/.whl/*.whl \
      >>"$OUT/setup.txt" 2>&1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if [ "${SKIP_BUILD:-0}" = 1 ]; then
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    PYCMD=(python3)
  else
    timeout 200 env FUSION_ENGINE_CUDA="${E2E_CUDA_EXT:-0}" FUSION_ENGINE_CUDA_ARCHS=90 \
      FUSION_ENGINE_BUILD_JOBS="$(nproc)" python3 -m pip install --no-build-isolation --no-deps --no-cache-dir \
      "$REPO" 2>&1 | tail -3 | tee -a "$OUT/setup.txt"
  fi
fi
"${PYCMD[@]}" -c "import fusion_engine, torch; print(fusion_engine.__file__, fusion_engine.backends(), torch.cuda.get_device_name())" \
  2>&1 | tee -a "$OUT/setup.txt"

if command -v nvcc >/dev/null && command -v cmake >/dev/null; then
  timeout 150 bash -c "cmake -S '$REPO' -B build_cuda -DCMAKE_BUILD_TYPE=Release -DFUSION_ENGINE_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null && cmake --build build_cuda --target test_cuda -j $(nproc) >/dev/null \
    && ctest --test-dir build_cuda -R '^cuda\$' -V" 2>&1 | tail -15 | tee "$OUT/ctest_cuda.txt"
fi

timeout 120 "${PYCMD[@]}" -m pytest -p no:cacheprovider -q -rfEs -m gpu "$REPO/tests/io/test_staged_executor.py" \
  "$REPO/tests/io/test_distributed_merge.py" "$REPO/tests/cli/test_cli_merge.py" \
  "$REPO/tests/alignment/test_alignment_on_cuda.py" "$REPO/tests/data_aware/test_data_aware_on_cuda.py" 2>&1 \
  | tail -25 | tee "$OUT/pytest_gpu.txt"

timeout 330 "${PYCMD[@]}" "$REPO/benchmarks/gpu_e2e_report.py" --size 1b --models 3 --device cuda \
  --mergekit-timeout "${MERGEKIT_TIMEOUT:-30}" --workdir "${FE_BENCH_DIR:-/tmp}" --out "$OUT/RESULTS_gpu_e2e.md" \
  2>&1 | tail -30
echo "gpu_e2e done in ${SECONDS}s; logs in $OUT"
