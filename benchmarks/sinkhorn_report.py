"""sinkhorn side by side: fusion_engine vs POT (ot.bregman.sinkhorn_log on numpy, ot.batch.solve_batch)
and the eager torch reference, on the same problems at the same tolerance; prints a markdown table.

    python benchmarks/sinkhorn_report.py [--B 16] [--n 512] [--reg 0.05] [--tol 1e-9] [--quick] [--device cuda]

On a GPU the POT providers are POT's own solvers given torch CUDA tensors (``ot.sinkhorn(...,
method="sinkhorn_log")`` per problem, and ``ot.batch.solve_batch``).

The problems: B cost matrices C_q = squared Euclidean distances between n and m points drawn
uniformly in [0, 1]², uniform marginals, fp64 on the CPU (the dtype POT uses; fp32 on a GPU, where
the triton kernel runs). For each provider: the best wall time, the problem-iterations it ran, and
the achieved GB/s of reading the cost (two passes per iteration: each iteration needs the whole
cost matrix twice, once per half-iteration) against the floor = those bytes ÷ the copy bandwidth
measured in the same run. POT's sinkhorn_log agrees with ours on the iteration count; solve_batch
stops on its own criterion (max over the batch of the row-marginal error), so it may run a
different number of iterations.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _cases import copy_bandwidth, timed  # noqa: E402

import fusion_engine as fe  # noqa: E402
from fusion_engine.ops import sinkhorn  # noqa: E402

SLOW = ("torch-reference", "POT sinkhorn_log", "POT solve_batch", "POT sinkhorn_log (GPU)", "POT solve_batch (GPU)")


@dataclass
class SinkhornCase:
    B: int
    n: int
    m: int
    reg: float
    tol: float
    dtype: torch.dtype
    device: str
    max_iter: int = 1000
    # each provider returns the number of problem-iterations it ran
    providers: dict[str, Callable[[], int]] = field(default_factory=dict)

    def bytes_per_problem_iteration(self) -> int:
        return 2 * self.n * self.m * torch.finfo(self.dtype).bits // 8


def make_sinkhorn_case(B=16, n=512, m=512, reg=0.05, tol=1e-9, device="cpu", max_iter=1000, seed=0) -> SinkhornCase:
    dtype = torch.float64 if device == "cpu" else torch.float32
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(B, n, 2, generator=gen, dtype=torch.float64)
    y = torch.rand(B, m, 2, generator=gen, dtype=torch.float64)
    cost64 = torch.cdist(x, y) ** 2
    cost = cost64.to(dtype).to(device)
    case = SinkhornCase(B, n, m, reg, tol, dtype, device, max_iter)
    kw = dict(reg=reg, tol=tol, max_iter=max_iter)
    usable = {name: s.usable for name, s in fe.backends().items()}
    for backend in (("cpp",) if device == "cpu" else ("triton",)):
        if usable[backend]:
            case.providers[f"fusion_engine-{backend}"] = (
                lambda backend=backend: int(sinkhorn(cost, backend=backend, **kw).n_iter.sum()))
    case.providers["torch-reference"] = lambda: int(sinkhorn(cost, backend="torch", **kw).n_iter.sum())
    try:
        import ot
    except ImportError:
        return case
    if device == "cuda":  # POT's own solvers on the same GPU, given torch tensors (its torch backend)
        a = torch.full((n,), 1.0 / n, dtype=dtype, device=device)
        b = torch.full((m,), 1.0 / m, dtype=dtype, device=device)
        return _add_pot(case, lambda *args, **kw: ot.sinkhorn(*args, method="sinkhorn_log", **kw), cost, a, b,
                        " (GPU)")
    return _add_pot(case, ot.bregman.sinkhorn_log, cost64.numpy(), np.full(n, 1.0 / n), np.full(m, 1.0 / m), "")


def _add_pot(case: SinkhornCase, sinkhorn_log, costs, a, b, suffix: str) -> SinkhornCase:
    """POT's log-domain solver problem by problem, and its batched ``ot.batch.solve_batch``, on
    ``costs`` (numpy or torch, as POT takes either), same reg, tolerance and iteration cap."""

    def pot_sinkhorn_log() -> int:
        total = 0
        for q in range(case.B):
            _, log = sinkhorn_log(a, b, costs[q], case.reg, numItermax=case.max_iter, stopThr=case.tol, log=True,
                                  warn=False)
            total += int(log["niter"]) + 1
        return total

    case.providers[f"POT sinkhorn_log{suffix}"] = pot_sinkhorn_log
    try:
        from ot.batch import solve_batch
    except ImportError:
        return case

    def pot_solve_batch() -> int:
        res = solve_batch(costs, case.reg, max_iter=case.max_iter, tol=case.tol, method="log_sinkhorn")
        return case.B * (int(res.log["n_iter"]) + 1)

    case.providers[f"POT solve_batch{suffix}"] = pot_solve_batch
    return case


def run_provider(fn, device: str, repeats: int) -> tuple[float, int]:
    """(best wall time, problem-iterations) over `repeats` runs after one warm-up."""
    iterations = fn()
    best = min(timed(fn, device) for _ in range(repeats))
    return best, iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--B", type=int, default=16)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--m", type=int, default=None, help="columns (default: n)")
    parser.add_argument("--reg", type=float, default=0.05)
    parser.add_argument("--tol", type=float, default=1e-9)
    parser.add_argument("--max-iter", type=int, default=1000)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="one timed run per provider")
    args = parser.parse_args()
    case = make_sinkhorn_case(args.B, args.n, args.m or args.n, args.reg, args.tol, args.device, args.max_iter)
    bandwidth = copy_bandwidth(device=args.device)
    ours = next((p for p in case.providers if p.startswith("fusion_engine")), None)
    results = {}
    for provider, fn in case.providers.items():
        repeats = 1 if args.quick or provider in SLOW else 3
        results[provider] = run_provider(fn, args.device, repeats)
        t, its = results[provider]
        print(f"{provider:22s} {t * 1e3:10.1f} ms  {its:7d} problem-iterations", flush=True)

    simd = fe._C.simd_level() if fe.backends()["cpp"].usable else "n/a"
    machine = (torch.cuda.get_device_name() if args.device == "cuda"
               else f"{os.cpu_count()} cores, {torch.get_num_threads()} threads, cpp SIMD clone `{simd}`")
    lines = [
        f"### sinkhorn: B={case.B}, n={case.n}, m={case.m}, reg={case.reg}, tol={case.tol:g}, "
        f"{str(case.dtype).replace('torch.', '')}",
        "",
        f"Command: `python benchmarks/sinkhorn_report.py {' '.join(sys.argv[1:])}`; machine: {machine}; "
        f"torch {torch.__version__}; date {datetime.date.today().isoformat()}; copy bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s.",
        "",
        "GB/s = 2 passes × problem-iterations × n·m·element size ÷ time; floor = those bytes ÷ copy bandwidth.",
        "",
        f"| provider | time (ms) | problem-iterations | GB/s of cost read | × floor | speed-up of {ours} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    mine = results[ours][0] if ours else None
    for provider, (t, its) in results.items():
        nbytes = its * case.bytes_per_problem_iteration()
        floor = nbytes / bandwidth
        speedup = f"{t / mine:.1f}×" if mine and provider != ours else ""
        lines.append(f"| {provider} | {t * 1e3:.1f} | {its} | {nbytes / t / 1e9:.1f} | {t / floor:.1f} | {speedup} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
