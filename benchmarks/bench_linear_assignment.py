"""linear_assignment: fusion_engine (C++, scipy's assignment; batch over threads) vs scipy, side by side.

Run: pytest benchmarks/bench_linear_assignment.py   (benchmarks/alignment_ops_report.py prints the table)

Each case is a batch of B cost matrices, timed end to end from the torch tensor to the assignments:

* ``neuron-*``: weight-matching costs C = −A·Bᵀ between the n neurons of two layers, with
  B = P·A + σ·noise (A [n, d] standard normal, P a random permutation): σ = 1 ("neuron-close",
  the permutation dominates) and σ = 8 ("neuron-far", many near-ties between neurons);
* ``uniform``: i.i.d. uniform costs (the classic hard random instance);
* ``ties``: i.i.d. whole numbers in [0, 10) (a huge number of optimal assignments: the solver runs
  scipy's own algorithm to return scipy's one).

Providers: ``fusion_engine-cpp`` (one call on the batch), ``scipy`` (``linear_sum_assignment`` per
problem, in a loop, as users call it), ``scipy-threads`` (the same, spread over a thread pool of
torch.get_num_threads() workers: what scipy reaches with threads, where it releases the GIL).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

from fusion_engine.ops import linear_assignment

BATCH = 8
SIZES = (1024, 2048)
KINDS = ("neuron-close", "neuron-far", "uniform", "ties")
FEATURES = 512   # d: fan-in of the matched neurons
NOISE = {"neuron-close": 1.0, "neuron-far": 8.0}


@dataclass
class AssignmentCase:
    kind: str
    n: int
    batch: int
    cost: torch.Tensor
    providers: dict[str, Callable[[], object]] = field(default_factory=dict)


def neuron_costs(batch: int, n: int, d: int, noise: float, seed: int = 0) -> torch.Tensor:
    """[batch, n, n] fp32 costs −A·Bᵀ with B = P·A + noise·N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(batch, n, n)
    for b in range(batch):
        a = torch.randn(n, d, generator=gen)
        perm = torch.randperm(n, generator=gen)
        w = a[perm] + noise * torch.randn(n, d, generator=gen)
        out[b] = -(a @ w.T)
    return out


def make_case(kind: str, n: int, batch: int = BATCH) -> AssignmentCase:
    if kind == "uniform":
        cost = torch.rand(batch, n, n, generator=torch.Generator().manual_seed(1))
    elif kind == "ties":
        cost = torch.randint(0, 10, (batch, n, n), generator=torch.Generator().manual_seed(2)).float()
    else:
        cost = neuron_costs(batch, n, FEATURES, NOISE[kind])
    case = AssignmentCase(kind, n, batch, cost)
    case.providers["fusion_engine-cpp"] = lambda: linear_assignment(cost, backend="cpp")
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        return case
    problems = [c.numpy() for c in cost]
    case.providers["scipy"] = lambda: [linear_sum_assignment(p) for p in problems]

    def scipy_threads():
        with ThreadPoolExecutor(max_workers=torch.get_num_threads()) as pool:
            return list(pool.map(linear_sum_assignment, problems))

    case.providers["scipy-threads"] = scipy_threads
    return case


def optimal_total(case: AssignmentCase) -> float:
    rows, cols = linear_assignment(case.cost)
    return float(sum(case.cost[b].double()[rows[b], cols[b]].sum() for b in range(case.batch)))


_CACHE: dict = {}


@pytest.mark.parametrize("provider", ("fusion_engine-cpp", "scipy", "scipy-threads"))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SIZES)
def test_linear_assignment(benchmark, n, kind, provider):
    key = (kind, n)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = make_case(kind, n)
    case = _CACHE[key]
    fn = case.providers.get(provider)
    if fn is None:
        pytest.skip(f"{provider} is not available")
    slow = provider != "fusion_engine-cpp"
    benchmark.pedantic(fn, rounds=1 if slow else 3, iterations=1, warmup_rounds=0 if slow else 1)
    benchmark.extra_info.update(op="linear_assignment", kind=kind, n=n, batch=case.batch,
                                threads=torch.get_num_threads())
