#!/usr/bin/env bash
# One device call on a GPU machine: build with CUDA, test and time everything; logs under $OUT.
#
#   bash benchmarks/fetch_gpu_wheels.sh                       # once, here: mergekit/POT wheels -> .whl/
#   run(command="bash benchmarks/gpu_suite.sh", carry=[".whl"], timeout_s=480)
#
# Stages, each under its own `timeout` and written to $OUT as it runs (a stage cut by its timeout
# still leaves its log), the whole within SUITE_BUDGET seconds (default 420 = 7 minutes):
#   setup.txt     carried wheels, the parallel CUDA build (pip install, sm_90), versions, GPU, copy BW
#   pytest.txt    the GPU tests of the installed package: -k "triton or cuda or gpu", -n 16, --timeout 60
#   ops.md        the op table (report.py --device cuda, bf16, 64M, K = 3, 8): triton and cuda vs PEFT
#                 (eager and torch.compile), mergekit and the eager torch reference; stdout in ops.log
#   sinkhorn.md   sinkhorn B=32, n=m=1024, reg 0.05 vs POT's solvers on the same GPU
#   cost_matrix.md  cost_matrix vs torch.mm / torch.cdist
#   weight_matching.md  weight_matching on ResNet-20 ×4 and ×8 vs the torch (GPU) + scipy (host) loop (issue 20)
#   ncu.txt       Nsight Compute on the select and merge kernels of one ties_merge call
#
# The package is always the installed one: every Python stage runs from a scratch folder with
# `python3 -P`, so the checkout never shadows it. On a machine without a GPU, DEVICE=cpu runs the
# CPU-possible stages (SKIP_BUILD=1 uses the checkout's in-place build via PYTHONPATH; N=... shrinks).
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$(mktemp -d)}"
DEVICE="${DEVICE:-cuda}"
N="${N:-$((64 * 1024 * 1024))}"
SUITE_BUDGET="${SUITE_BUDGET:-420}"
JOBS="${JOBS:-$(nproc)}"
mkdir -p "$OUT"
RUN="$(mktemp -d)"   # scratch working directory: not the checkout
cd "$RUN" || exit 1
PY=(python3 -P)
export PYTHONUNBUFFERED=1

# stage NAME CAP RESERVE FILE CMD...: run CMD with timeout min(CAP, time left - RESERVE), appending
# its output to $OUT/FILE as it comes; a failure or timeout is logged and the suite goes on.
stage() {
  local name=$1 cap=$2 reserve=$3 file=$4
  shift 4
  local left=$((SUITE_BUDGET - SECONDS - reserve))
  local limit=$((cap < left ? cap : left))
  if ((limit < 5)); then
    echo "== $name: skipped, no time left (${SECONDS}s used of ${SUITE_BUDGET}s)" | tee -a "$OUT/$file"
    return
  fi
  echo "== $name (limit ${limit}s, at ${SECONDS}s)" | tee -a "$OUT/$file"
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$OUT/$file"
  local rc=${PIPESTATUS[0]}
  echo "== $name: rc=$rc$([ "$rc" = 124 ] && echo ' (timed out)') after ${SECONDS}s" | tee -a "$OUT/$file"
}

# --- setup: carried wheels, the build, versions ------------------------------------------------------
if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
  stage wheels 40 360 setup.txt python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site "$REPO"/.whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "${SKIP_BUILD:-0}" = 1 ]; then
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  PY=(python3)   # the checkout is the package here
  echo "== build skipped: using the checkout $REPO" | tee -a "$OUT/setup.txt"
else
  # the CUDA objects compile in parallel with each other and with the C++ extension (setup.py)
  stage build 200 200 setup.txt env FUSION_ENGINE_CUDA="$([ "$DEVICE" = cuda ] && echo 1 || echo 0)" \
    FUSION_ENGINE_CUDA_ARCHS=90 FUSION_ENGINE_BUILD_JOBS="$JOBS" \
    python3 -m pip install --no-build-isolation --no-deps --no-cache-dir "$REPO"
fi
stage versions 30 180 setup.txt "${PY[@]}" - "$DEVICE" <<'PY'
import sys, time
import torch, triton
import fusion_engine
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)
print("fusion_engine from", fusion_engine.__file__)
print("backends", fusion_engine.backends())
if sys.argv[1] == "cuda":
    print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory // 2**30, "GiB")
    src = torch.ones(2**28 // 4, device="cuda"); dst = torch.empty_like(src)
    for _ in range(3): dst.copy_(src)
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(20): dst.copy_(src)
    torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 20
    print(f"copy bandwidth (read + write of 256 MiB): {2 * 2**28 / dt / 1e12:.2f} TB/s")
PY

# --- the GPU tests of the installed package ---------------------------------------------------------
XDIST=()
"${PY[@]}" -c "import xdist" 2>/dev/null && XDIST=(-n "${TEST_WORKERS:-16}")
"${PY[@]}" -c "import pytest_timeout" 2>/dev/null && XDIST+=(--timeout 60)
# -v: one line per test as it finishes, so a run cut by its timeout still shows every failure so far
stage pytest 150 150 pytest.txt "${PY[@]}" -m pytest "$REPO/tests" -p no:cacheprovider -v --tb=short -rfE \
  "${XDIST[@]}" -k "${TEST_FILTER:-triton or cuda or gpu}"

# --- timings -------------------------------------------------------------------------------------------
stage ops 110 60 ops.log "${PY[@]}" "$REPO/benchmarks/report.py" --device "$DEVICE" --n "$N" --ks 3,8 \
  --dtypes bfloat16 --out "$OUT/ops.md"
stage sinkhorn 30 30 sinkhorn.md "${PY[@]}" "$REPO/benchmarks/sinkhorn_report.py" --device "$DEVICE" \
  --B "${SINKHORN_B:-32}" --n "${SINKHORN_N:-1024}" --reg 0.05 --quick
stage cost_matrix 25 20 cost_matrix.md "${PY[@]}" "$REPO/benchmarks/alignment_ops_report.py" \
  --device "$DEVICE" --ops cost_matrix --quick
stage weight_matching 40 45 weight_matching.md "${PY[@]}" "$REPO/benchmarks/bench_weight_matching.py" \
  --device "$DEVICE" --width "${WM_WIDTHS:-4,8}" --repeats 3
if [ "$DEVICE" = cuda ] && command -v ncu >/dev/null; then
  # the select passes and the merge pass of one bf16 K=8 ties_merge (after a warm-up call)
  stage ncu 45 0 ncu.txt ncu --clock-control none --target-processes all \
    --kernel-name 'regex:_level_kernel|_tie_cutoff_kernel|_ties_merge_kernel|ties|select|histogram' \
    --launch-skip 0 --launch-count 12 --section SpeedOfLight --section MemoryWorkloadAnalysis \
    "${PY[@]}" "$REPO/benchmarks/gpu_profile_target.py" --n "$N" --K 8
fi
# whole merges on the GPU (issue 13; its own budget: run it alone when this suite used its time)
[ "${GPU_E2E:-0}" = 1 ] && stage e2e 300 0 e2e.log env FE_INSTALLED=1 PY="${PY[*]}" bash "$REPO/benchmarks/gpu_e2e.sh"
echo "suite done in ${SECONDS}s; logs in $OUT: $(ls "$OUT" | tr '\n' ' ')"
