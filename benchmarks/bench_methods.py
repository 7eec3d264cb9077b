"""Every merge method: fusion_engine.merge_tensors vs mergekit 0.1.5's merge_tensors, side by side.

Run: pytest benchmarks/bench_methods.py   (FE_BENCH_METHODS_N sets the tensor size, default 4M entries;
K = 3 fine-tuned fp32 tensors plus a base where the method takes one)
"""

import os

import pytest
import torch

import fusion_engine as fe

N = int(os.environ.get("FE_BENCH_METHODS_N", 4 * 1024 * 1024))
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


@pytest.fixture(scope="module")
def tensors():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(ROWS, N // ROWS, generator=gen)
    return [base] + [base + 0.01 * torch.randn(base.shape, generator=gen) for _ in range(3)]


@pytest.mark.parametrize("provider", ["fusion_engine", "mergekit"])
@pytest.mark.parametrize("method", list(CASES))
def test_method(benchmark, tensors, method, provider):
    count, base_index, params = CASES[method]
    inputs = tensors[:count]
    if provider == "mergekit":
        api = pytest.importorskip("mergekit.merge_methods.api")
        fn = lambda: api.merge_tensors(inputs, method, parameters=params, base_index=base_index)  # noqa: E731
    else:
        fn = lambda: fe.merge_tensors(inputs, method, parameters=params, base_index=base_index,  # noqa: E731
                                      name="bench.weight")
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(method=method, N=N, inputs=count)
