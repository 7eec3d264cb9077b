"""Every merge method: fusion_engine.merge_tensors vs mergekit 0.1.5's merge_tensors, side by side.

Run: pytest benchmarks/bench_methods.py   (FE_BENCH_METHODS_N sets the tensor size, default 4M entries;
FE_BENCH_METHODS_DTYPES the dtypes, default "float32,bfloat16"; K = 3 fine-tuned tensors plus a base
where the method takes one)

Or, for a plain table (ours ms, mergekit ms, ratio; the two timed alternately, best of R rounds):
    python benchmarks/bench_methods.py [method,method,...]     (env R, default 4)
"""

import os
import sys
import time

import pytest
import torch

import fusion_engine as fe

N = int(os.environ.get("FE_BENCH_METHODS_N", 4 * 1024 * 1024))
DTYPES = os.environ.get("FE_BENCH_METHODS_DTYPES", "float32,bfloat16").split(",")
ROWS = 1024

CASES = {  # method: (inputs incl. base, base_index, parameters)
    "linear": (3, None, {"weight": [0.3, 1.0, 0.5]}),
    "task_arithmetic": (4, 0, {"weight": [0.3, 1.0, 0.5]}),
    "ties": (4, 0, {"weight": [0.3, 1.0, 0.5], "density": 0.2}),
    "dare_ties": (4, 0, {"weight": [0.3, 1.0, 0.5], "density": 0.2}),
    "dare_linear": (4, 0, {"weight": [0.3, 1.0, 0.5], "density": 0.2}),
    "breadcrumbs": (4, 0, {"weight": [0.3, 1.0, 0.5], "density": 0.2}),
    "breadcrumbs_ties": (4, 0, {"weight": [0.3, 1.0, 0.5], "density": 0.2}),
    "della": (4, 0, {"weight": [0.3, 1.0, 0.5], "density": 0.4}),
    "della_linear": (4, 0, {"weight": [0.3, 1.0, 0.5], "density": 0.4}),
    "sce": (4, 0, {"select_topk": 0.5}),
    "slerp": (2, 0, {"t": 0.3}),
    "nuslerp": (3, 0, {"weight": [0.3, 0.7]}),
    "multislerp": (4, 0, {"weight": [0.3, 1.0, 0.5]}),
    "karcher": (3, None, {}),
    "model_stock": (4, 0, {}),
    "nearswap": (2, 0, {"t": 0.01}),
    "ram": (4, 0, {}),
    "ramplus_tl": (4, 0, {}),
    "arcee_fusion": (2, 0, {}),
}


def make_tensors(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(ROWS, N // ROWS, generator=gen)
    return [t.to(dtype) for t in [base] + [base + 0.01 * torch.randn(base.shape, generator=gen) for _ in range(3)]]


def merge_call(provider: str, method: str, tensors: list[torch.Tensor]):
    count, base_index, params = CASES[method]
    inputs = tensors[:count]
    if provider == "mergekit":
        from mergekit.merge_methods import api

        return lambda: api.merge_tensors(inputs, method, parameters=params, base_index=base_index)
    return lambda: fe.merge_tensors(inputs, method, parameters=params, base_index=base_index, name="bench.weight")


@pytest.fixture(scope="module", params=DTYPES)
def tensors(request):
    return make_tensors(getattr(torch, request.param))


@pytest.mark.parametrize("provider", ["fusion_engine", "mergekit"])
@pytest.mark.parametrize("method", list(CASES))
def test_method(benchmark, tensors, method, provider):
    if provider == "mergekit":
        pytest.importorskip("mergekit.merge_methods.api")
    benchmark.pedantic(merge_call(provider, method, tensors), rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(method=method, N=N, inputs=CASES[method][0], dtype=str(tensors[0].dtype))


def main(methods: list[str]) -> None:
    rounds = int(os.environ.get("R", 4))
    print(f"N = {N}, K = 3, best of {rounds}; torch threads {torch.get_num_threads()}")
    print(f"{'dtype':9s} {'method':18s} {'ours ms':>9s} {'mergekit ms':>12s} {'ratio':>7s}")
    for dtype in DTYPES:
        tensors = make_tensors(getattr(torch, dtype))
        for method in methods:
            ours, theirs = merge_call("fusion_engine", method, tensors), merge_call("mergekit", method, tensors)
            ours(), theirs()
            times = {ours: [], theirs: []}
            for _ in range(rounds):  # alternate, so that load changes hit both alike
                for fn in (ours, theirs):
                    start = time.perf_counter()
                    fn()
                    times[fn].append(time.perf_counter() - start)
            a, b = min(times[ours]) * 1e3, min(times[theirs]) * 1e3
            print(f"{dtype:9s} {method:18s} {a:9.1f} {b:12.1f} {b / a:6.2f}x", flush=True)


if __name__ == "__main__":
    main(sys.argv[1].split(",") if len(sys.argv) > 1 else list(CASES))
