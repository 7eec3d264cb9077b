#!/usr/bin/env bash
# One call on a GPU machine: build with CUDA, check, and time everything; results under $OUT.
#
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh          (the device tool sets $OUT)
#
# 1. builds fusion_engine with FUSION_ENGINE_CUDA=1 (the _C_cuda extension, sm_90) into a venv
#    that reuses the image's torch/triton/peft (mergekit wheels may be carried in wheels/);
# 2. runs the whole test suite natively (triton compiled, cuda backend, @gpu tests);
# 3. measures device copy bandwidth and a bf16 GEMM rate, then times every op: triton and cuda
#    backends vs the torch reference, mergekit and PEFT on the same GPU (benchmarks/report.py);
# 4. writes $OUT/pytest.txt, $OUT/RESULTS_gpu.md, $OUT/env.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"

python3 -m venv --system-site-packages "$OUT/venv"
# shellcheck disable=SC1091
source "$OUT/venv/bin/activate"
if ls wheels/*.whl >/dev/null 2>&1; then pip install -q --no-index --find-links wheels mergekit || true; fi
FUSION_ENGINE_CUDA=1 FUSION_ENGINE_CUDA_ARCHS="90" pip install -q --no-build-isolation --no-deps . 2>&1 | tail -5

{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python -c "import fusion_engine; print(fusion_engine.backends())"
  python - <<'PY'
import torch, time
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(3): a @ b
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20): a @ b
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 20
print(f"bf16 GEMM 8192^3: {2 * 8192**3 / dt / 1e12:.0f} TFLOP/s")
PY
} 2>&1 | tee "$OUT/env.txt"

pytest -q -p no:cacheprovider 2>&1 | tail -40 | tee "$OUT/pytest.txt" || true

python benchmarks/report.py --device cuda --n $((64 * 1024 * 1024)) --ks 3,8 --out "$OUT/RESULTS_gpu.md" 2>&1 | tail -60
echo "results in $OUT"
