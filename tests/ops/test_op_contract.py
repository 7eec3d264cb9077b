"""The contract every elementwise op shares, table-driven: every op × every usable backend × dtype ×
shape (0, 1, odd, not a multiple of the block size, multi-dimensional) × layout (non-contiguous
included).

* compiled backends (cpp, triton, cuda) against the torch reference (``*_reference`` in the op's
  module), through :func:`utils.check_call` (which also checks determinism, untouched inputs, the
  output's shape, dtype and device);
* the torch backend against an **independent** float64 oracle written here in numpy, straight from
  each op's formula (so the reference is not only compared with itself). The oracle's exact result
  is rounded once to the output dtype; the reference accumulates in fp32, so the tolerance is one
  ulp of the output dtype plus fp32 accumulation error relative to the largest summand.

Data are integer-valued and weights dyadic where an op elects signs or selects by magnitude, so
those discrete decisions are exact in every dtype and every implementation must take the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch

from conftest import backend_params
from fusion_engine.ops import (any_nonfinite, dare_merge, fisher_merge, inner_products, linear_merge, magnitude_mask,
                               task_arithmetic, ties_merge)
from fusion_engine.ops.philox import random_words_reference
from utils import (DTYPE_IDS, FLOAT_DTYPES, LAYOUTS, assert_verbose_allclose, check_call, device_for, make_inputs,
                   max_abs, skip_large, skip_unless_dtype, tolerance, with_layout)

SHAPES = [(0,), (1,), (7,), (1025,), (5, 123), (3, 7, 11)]
LARGE = (100_003,)                  # crosses OpenMP thread chunks: compiled backends only (skip_large)
K = 3
WEIGHTS = [0.5, -1.25, 2.0]          # dyadic: weighted sums of integer data are exact
DENSITIES = [0.5, 0.25, 1.0]         # 1/ρ dyadic too: DARE's rescaled values stay exact
FP32_EPS = 2.0**-23


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().reshape(-1).numpy()


def _round(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Round float64 values once to ``dtype`` (as a stored tensor is) and back to float64."""
    return _np(torch.from_numpy(values).to(dtype))


def _deltas(base, tensors):
    """δ_i = x_i − b, the exact difference rounded once to the inputs' dtype."""
    return [_round(_np(x) - _np(base), base.dtype) for x in tensors]


def _top_k(values: np.ndarray, k: int) -> np.ndarray:
    """The k entries of largest |value|, lowest index first among equals."""
    keep = np.zeros(values.size, dtype=bool)
    keep[np.argsort(-np.abs(values), kind="stable")[:k]] = True
    return keep


def _combine(base, kept, weights, consensus, normalize, lam) -> np.ndarray:
    """b + λ N/D of the TIES/DARE combine step, in float64 (see ops._common.combine_reference)."""
    w = np.asarray(weights)[:, None]
    v = np.stack(kept) if kept[0].size else np.zeros((len(kept), 0))
    if consensus is None:
        num, den = (w * v).sum(0), w.sum() if abs(w.sum()) >= 1e-8 else 1.0
    else:
        total = (w * v).sum(0)
        majority = np.where(total >= 0, 1.0, -1.0)
        agree = np.sign(w * v) == majority
        num, den = (w * v * agree).sum(0), (w * agree).sum(0)
        den = np.where(den == 0, 1.0, den)
    return _np(base) + lam * (num / den if normalize else num)


@dataclass
class Case:
    """One op of the table: how to call it on prepared inputs, and its float64 oracle."""

    op: str
    call: Callable              # (inputs) -> (fn, args, kwargs, named)
    oracle: Callable            # (inputs) -> np.ndarray (float64) or bool
    exact: bool = False         # discrete output: bit-exact on every backend
    scale: Callable = lambda inputs: max(1.0, inputs.scale())


def _linear(inp):
    return linear_merge, (inp.tensors, WEIGHTS), dict(normalize=False), [n for n in inp.named[1:]]


def _task_arithmetic(inp):
    return task_arithmetic, (inp.base, inp.tensors, WEIGHTS), dict(lam=0.75), inp.named


def _magnitude_mask(inp):
    return magnitude_mask, (inp.tensors[0],), dict(k=inp.tensors[0].numel() // 3), [inp.named[1]]


def _ties(inp):
    return ties_merge, (inp.base, inp.tensors, WEIGHTS, DENSITIES), {}, inp.named


def _dare(inp):
    return dare_merge, (inp.base, inp.tensors, WEIGHTS, DENSITIES), dict(seed=7, stream=11, consensus="sum"), inp.named


def _fishers(inp):
    gen = torch.Generator().manual_seed(5)
    return [with_layout(torch.rand(inp.shape, generator=gen, dtype=torch.float64).to(inp.dtype).to(inp.base.device),
                        LAYOUTS[(i + 2) % len(LAYOUTS)]) for i in range(K)]


def _fisher(inp):
    fishers = _fishers(inp)
    named = inp.named[1:] + [(f"fishers[{i}]", f) for i, f in enumerate(fishers)]
    return fisher_merge, (inp.tensors, fishers, [1.0, 0.5, 2.0]), dict(eps=1e-3), named


def _ties_oracle(inp):
    deltas = _deltas(inp.base, inp.tensors)
    n = inp.base.numel()
    kept = [d * _top_k(d, int(rho * n)) for d, rho in zip(deltas, DENSITIES)]
    return _combine(inp.base, kept, WEIGHTS, "sum", True, 1.0)


def _dare_oracle(inp):
    kept = []
    for i, (d, rho) in enumerate(zip(_deltas(inp.base, inp.tensors), DENSITIES)):
        words = random_words_reference(d.size, seed=7, stream=11, model=i).numpy()
        kept.append(d * (words < int(rho * 2**32)) / rho)
    return _combine(inp.base, kept, WEIGHTS, "sum", False, 1.0)


def _fisher_oracle(inp):
    fishers = [_np(f) for f in _fishers(inp)]
    w = [1.0, 0.5, 2.0]
    num = sum(wi * f * _np(x) for wi, f, x in zip(w, fishers, inp.tensors))
    return num / (sum(wi * f for wi, f in zip(w, fishers)) + 1e-3)


CASES = [
    Case("linear_merge", _linear, lambda inp: sum(w * _np(x) for w, x in zip(WEIGHTS, inp.tensors))),
    Case("task_arithmetic", _task_arithmetic,
         lambda inp: _np(inp.base) + 0.75 * sum(w * d for w, d in zip(WEIGHTS, _deltas(inp.base, inp.tensors)))),
    Case("magnitude_mask", _magnitude_mask,
         lambda inp: _top_k(_np(inp.tensors[0]), inp.tensors[0].numel() // 3), exact=True),
    Case("ties_merge", _ties, _ties_oracle),
    Case("dare_merge", _dare, _dare_oracle, scale=lambda inp: 4 * max(1.0, inp.scale())),
    Case("fisher_merge", _fisher, _fisher_oracle),
]


# registered ops whose contract has its own shape (matrices, OT problems, random words): their files
OWN_CONTRACT = {"cost_matrix": "test_cost_matrix.py", "sinkhorn": "test_sinkhorn.py", "sinkhorn_knopp": "test_sinkhorn.py",
                "linear_assignment": "test_linear_assignment.py", "philox_words": "test_philox.py",
                "inner_products": "below", "any_nonfinite": "below"}


def test_every_registered_op_is_in_a_contract_table():
    from fusion_engine._dispatch import registered

    assert set(registered()) == {case.op for case in CASES} | set(OWN_CONTRACT)


def _contract_params():
    params = []
    for case in CASES:
        for backend in backend_params(case.op):
            params.append(pytest.param(case, backend.values[0], id=f"{case.op}-{backend.id}", marks=backend.marks))
    return params


def _inputs(backend, shape, dtype):
    layouts = [LAYOUTS[(len(shape) + i) % len(LAYOUTS)] for i in range(K + 1)]
    return make_inputs(shape, dtype, K, kind="int", layouts=layouts, seed=len(shape) + sum(shape),
                       device=device_for(backend))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SHAPES + [LARGE], ids=str)
@pytest.mark.parametrize(("case", "impl"), _contract_params())
def test_op_contract(case, impl, shape, dtype):
    backend = impl
    skip_unless_dtype(backend, dtype)
    skip_large(backend, shape)
    inp = _inputs(backend, shape, dtype)
    fn, args, kwargs, named = case.call(inp)
    actual = check_call(fn, args, kwargs, backend, named, scale=case.scale(inp), exact=case.exact,
                        expected_dtype=torch.bool if case.exact else dtype)
    if backend != "torch":
        return  # compared with the torch reference by check_call
    expected = torch.from_numpy(np.asarray(case.oracle(inp))).reshape(shape)
    what = f"{case.op} torch reference vs the float64 oracle ({DTYPE_IDS[dtype]}, shape {shape})"
    if case.exact:
        assert torch.equal(actual.cpu(), expected), what
        return
    atol, rtol = tolerance(dtype, case.scale(inp))
    atol = max(atol, 8 * K * FP32_EPS * case.scale(inp) * max(1.0, max(abs(w) for w in WEIGHTS)))
    rounded = torch.from_numpy(_round(expected.reshape(-1).numpy(), dtype)).reshape(shape)
    assert_verbose_allclose(actual.cpu().double(), rounded, atol, rtol, what=what)


# ------------------------------------------------------------------------ the helper ops (cpp and torch)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("impl", [b for b in backend_params("inner_products") if b.id in ("cpp", "torch")])
def test_inner_products_contract(impl, shape, dtype):
    backend = impl
    inp = _inputs("cpu", shape, dtype)
    gram, nonfinite = inner_products(inp.tensors, inp.base, backend=backend)
    deltas = _deltas(inp.base, inp.tensors)
    exact = np.array([[float(a @ b) for b in deltas] for a in deltas])
    scale = max(1.0, max_abs(inp.tensors)) ** 2 * max(1, inp.base.numel())
    assert not nonfinite
    assert_verbose_allclose(torch.tensor(gram, dtype=torch.float64), torch.from_numpy(exact), 4 * FP32_EPS * scale,
                            1e-6, what=f"inner_products ({backend}) vs the float64 oracle")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("impl", [b for b in backend_params("any_nonfinite") if b.id in ("cpp", "torch")])
def test_any_nonfinite_contract(impl, shape):
    backend = impl
    for dtype in FLOAT_DTYPES:
        x = _inputs("cpu", shape, dtype).tensors[0]
        assert not any_nonfinite([x], backend=backend)
        if x.numel():
            for bad in (float("nan"), float("inf"), -float("inf")):
                y = x.contiguous().clone()
                y.view(-1)[-1] = bad
                assert any_nonfinite([x, y], backend=backend), f"{bad} in {tuple(shape)} {dtype}"
