"""sinkhorn: fusion_engine (cpp) vs POT (ot.bregman.sinkhorn_log numpy, ot.batch.solve_batch) and the
eager torch reference, side by side on B=16 problems of 512×512, reg=0.05, tol=1e-9, fp64.

Run: pytest benchmarks/bench_sinkhorn.py   (benchmarks/sinkhorn_report.py prints the markdown table)
Smaller problems: SINKHORN_BENCH="B,n,reg", e.g. SINKHORN_BENCH=2,64,0.1
"""

import os

import pytest

from sinkhorn_report import SLOW, make_sinkhorn_case

PROVIDERS = ("fusion_engine-cpp", "torch-reference", "POT sinkhorn_log", "POT solve_batch")
_CASE = {}


def _case():
    if not _CASE:
        B, n, reg = os.environ.get("SINKHORN_BENCH", "16,512,0.05").split(",")
        _CASE["case"] = make_sinkhorn_case(B=int(B), n=int(n), m=int(n), reg=float(reg))
    return _CASE["case"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_sinkhorn(benchmark, copy_bytes_per_s, provider):
    case = _case()
    fn = case.providers.get(provider)
    if fn is None:
        pytest.skip(f"{provider} is not available")
    iterations = fn()
    slow = provider in SLOW
    benchmark.pedantic(fn, rounds=1 if slow else 3, iterations=1, warmup_rounds=0)
    seconds = benchmark.stats.stats.min
    nbytes = iterations * case.bytes_per_problem_iteration()
    benchmark.extra_info.update(
        op="sinkhorn", B=case.B, n=case.n, m=case.m, reg=case.reg, tol=case.tol, dtype=str(case.dtype),
        problem_iterations=iterations, gb_per_s=nbytes / seconds / 1e9,
        floor_ratio=seconds / (nbytes / copy_bytes_per_s), copy_gb_per_s=copy_bytes_per_s / 1e9,
    )
