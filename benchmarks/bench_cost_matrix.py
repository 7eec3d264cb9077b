"""cost_matrix: fusion_engine vs torch.cdist and the bare GEMM, per metric, side by side.

Run: pytest benchmarks/bench_cost_matrix.py   (benchmarks/alignment_ops_report.py prints the table)

Providers: ``fusion_engine-<backend>`` (ours: on CPU the torch/BLAS path that the automatic choice
takes, on CUDA the fused triton kernel as well), ``torch.cdist`` (euclidean; squared afterwards for
sqeuclidean), ``torch.mm`` (x·yᵀ alone: the compute floor of any GEMM-shaped metric, measured in the
same run). Extra info: GFLOP/s counting 2·B·n·m·d, and GB/s counting the minimum bytes (x, y read
once, C written once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

import fusion_engine as fe
from fusion_engine.ops import cost_matrix
from fusion_engine.ops.cost_matrix import METRICS

SHAPE = {"cpu": (1, 2048, 2048, 1024), "cuda": (4, 8192, 8192, 4096)}   # B, n, m, d
DTYPES = {"cpu": (torch.float32,), "cuda": (torch.float32, torch.bfloat16)}


@dataclass
class CostCase:
    metric: str
    dtype: torch.dtype
    shape: tuple[int, int, int, int]
    device: str
    providers: dict[str, Callable[[], object]] = field(default_factory=dict)

    @property
    def flops(self) -> float:
        b, n, m, d = self.shape
        return 2.0 * b * n * m * d

    @property
    def floor_bytes(self) -> int:
        b, n, m, d = self.shape
        return (b * (n + m) * d + b * n * m) * torch.empty(0, dtype=self.dtype).element_size()


def make_case(metric: str, dtype: torch.dtype, device: str = "cpu", shape=None) -> CostCase:
    b, n, m, d = shape or SHAPE[device]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, d, generator=gen).to(dtype).to(device)
    y = torch.randn(b, m, d, generator=gen).to(dtype).to(device)
    case = CostCase(metric, dtype, (b, n, m, d), device)
    usable = {name: status.usable for name, status in fe.backends().items()}
    for backend in (("triton", "torch") if device == "cuda" else ("torch",)):
        if usable[backend] and not (backend == "triton" and dtype == torch.float64):
            case.providers[f"fusion_engine-{backend}"] = lambda b_=backend: cost_matrix(x, y, metric=metric, backend=b_)
    if metric == "euclidean":
        case.providers["torch.cdist"] = lambda: torch.cdist(x, y)
    elif metric == "sqeuclidean":
        case.providers["torch.cdist"] = lambda: torch.cdist(x, y).square_()
    case.providers["torch.mm"] = lambda: torch.bmm(x, y.transpose(1, 2))
    return case


_CACHE: dict = {}


@pytest.mark.parametrize("provider", ("fusion_engine-triton", "fusion_engine-torch", "torch.cdist", "torch.mm"))
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_cost_matrix(benchmark, dtype, metric, provider):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype not in DTYPES[device]:
        pytest.skip(f"{dtype} is timed on cuda only")
    key = (metric, dtype, device)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = make_case(metric, dtype, device)
    case = _CACHE[key]
    fn = case.providers.get(provider)
    if fn is None:
        pytest.skip(f"{provider} is not available for {metric} on {device}")

    def run():
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(op="cost_matrix", metric=metric, shape=case.shape)
    if benchmark.stats is not None:  # None under --benchmark-disable
        seconds = benchmark.stats.stats.min
        benchmark.extra_info.update(gflop_per_s=case.flops / seconds / 1e9, gb_per_s=case.floor_bytes / seconds / 1e9)
