"""The benchmark cases, shared by the pytest-benchmark suites (bench_<op>.py) and report.py.

Each case builds its inputs once and offers one callable per provider:
``fusion_engine-<backend>`` (ours), ``torch-reference`` (the op's eager oracle), ``mergekit``
(``merge_tensors``, 0.1.5) and ``peft`` (``peft.utils.merge_utils``, given task vectors as PEFT
users do; on a GPU also ``peft-torch.compile``, the same function under ``torch.compile``).
``floor_bytes`` is the minimum traffic of the op: every input read once per pass the algorithm
needs, the output written once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

import fusion_engine as fe
from fusion_engine.ops import dare_merge, fisher_merge, linear_merge, magnitude_mask, task_arithmetic, ties_merge

N = 16 * 1024 * 1024
DENSITY = 0.2


@dataclass
class Case:
    op: str
    dtype: torch.dtype
    K: int
    floor_bytes: int
    floor_passes: str
    providers: dict[str, Callable[[], object]] = field(default_factory=dict)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str = "cpu") -> float:
    """Wall time of one call, synchronising the GPU before reading the clock."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5, device: str = "cpu") -> float:
    """Measured device copy bandwidth in bytes/s (read + write), best of `repeats`."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(timed(lambda: dst.copy_(src), device) for _ in range(repeats))
    return 2 * nbytes / best


def _inputs(dtype, K, n=N, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(dtype)
    xs = [(base.float() + 0.01 * torch.randn(n, generator=g)).to(dtype).to(device) for _ in range(K)]
    return base.to(device), xs


def _ours(fn, **kw):
    device = next(v for v in kw.values() if isinstance(v, torch.Tensor) or isinstance(v, list))
    device = (device[0] if isinstance(device, list) else device).device.type
    usable = {name: s.usable for name, s in fe.backends().items()}
    mine = ("cpp",) if device == "cpu" else ("triton", "cuda")
    return {f"fusion_engine-{b}": (lambda b=b: fn(backend=b, **kw)) for b in mine if usable[b]}


def _reference(fn, **kw):
    return {"torch-reference": lambda: fn(backend="torch", **kw)}


def _mergekit(method, tensors, parameters, base_index):
    try:
        from mergekit.merge_methods.api import merge_tensors
    except ImportError:
        return {}
    return {"mergekit": lambda: merge_tensors(tensors, method, parameters=parameters, base_index=base_index)}


def _peft(name, base, xs, **kw):
    try:
        from peft.utils import merge_utils
    except ImportError:
        return {}
    fn = getattr(merge_utils, name)
    weights = torch.ones(len(xs), dtype=base.dtype, device=base.device)

    def merge(base, xs):
        task_vectors = [x - base for x in xs]
        return base + fn(task_vectors, weights, **kw)

    providers = {"peft": lambda: merge(base, xs)}
    if base.device.type == "cuda":  # the first (warm-up) call compiles
        compiled = torch.compile(merge)
        providers["peft-torch.compile"] = lambda: compiled(base, xs)
    return providers


def make_case(op: str, dtype: torch.dtype, K: int, n: int = N, device: str = "cpu") -> Case:
    base, xs = _inputs(dtype, K, n, device=device)
    es = base.element_size()
    w = [1.0] * K
    if op == "linear_merge":
        kw = dict(tensors=xs, weights=w)
        case = Case(op, dtype, K, (K + 1) * n * es, "1 pass")
        case.providers |= _ours(linear_merge, **kw) | _reference(linear_merge, **kw)
        case.providers |= _mergekit("linear", xs, {"weight": 1.0}, None)
    elif op == "task_arithmetic":
        kw = dict(base=base, tensors=xs, weights=w)
        case = Case(op, dtype, K, (K + 2) * n * es, "1 pass")
        case.providers |= _ours(task_arithmetic, **kw) | _reference(task_arithmetic, **kw)
        case.providers |= _mergekit("task_arithmetic", [base, *xs], {"weight": 1.0}, 0)
        case.providers |= _peft("task_arithmetic", base, xs)
    elif op == "ties_merge":
        kw = dict(base=base, tensors=xs, weights=w, density=DENSITY)
        case = Case(op, dtype, K, (2 * (K + 1) + 1) * n * es, "2 passes")
        case.providers |= _ours(ties_merge, **kw) | _reference(ties_merge, **kw)
        case.providers |= _mergekit("ties", [base, *xs], {"weight": 1.0, "density": DENSITY}, 0)
        case.providers |= _peft("ties", base, xs, density=DENSITY)
    elif op == "dare_merge":
        kw = dict(base=base, tensors=xs, weights=w, density=DENSITY, seed=0, consensus="sum")
        case = Case(op, dtype, K, (K + 2) * n * es, "1 pass")
        case.providers |= _ours(dare_merge, **kw) | _reference(dare_merge, **kw)
        case.providers |= _mergekit("dare_ties", [base, *xs], {"weight": 1.0, "density": DENSITY}, 0)
        case.providers |= _peft("dare_ties", base, xs, density=DENSITY)
    elif op == "fisher_merge":
        fishers = [x.abs() for x in xs]
        kw = dict(tensors=xs, fishers=fishers, weights=w)
        case = Case(op, dtype, K, (2 * K + 1) * n * es, "1 pass")
        case.providers |= _ours(fisher_merge, **kw) | _reference(fisher_merge, **kw)
    elif op == "magnitude_mask":
        kw = dict(x=xs[0] - base, density=DENSITY)
        case = Case(op, dtype, 1, 2 * n * es + n, "2 passes")
        case.providers |= _ours(magnitude_mask, **kw) | _reference(magnitude_mask, **kw)
    else:
        raise ValueError(op)
    return case


OPS = ("linear_merge", "task_arithmetic", "ties_merge", "dare_merge", "fisher_merge", "magnitude_mask")
DTYPES = (torch.bfloat16, torch.float32)
KS = (3, 8)
