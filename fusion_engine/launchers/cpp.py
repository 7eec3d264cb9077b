"""The cpp backend: hands flat CPU tensors to the C++ kernels of fusion_engine._C.

Each function has the kernel-level signature of its op's ``*_reference`` (fusion_engine/ops) and
returns ``(out, nonfinite)``. Threads: ``torch.get_num_threads()`` (results do not depend on it).
"""

from __future__ import annotations

import torch

from .. import _C
from ..ops.philox import keep_threshold
from ._marshal import CONSENSUS_CODES, RESCALE_CODES, code, empty_like_flat, ptrs


SERIAL_BELOW = 1 << 16   # elements: below this an OpenMP team costs more than it saves (and, on an
                         # oversubscribed machine, its barrier can wait a whole time slice)


def _threads(numel: int | None = None) -> int:
    """torch's intra-op thread count; 1 for elementwise kernels on fewer than SERIAL_BELOW elements."""
    return 1 if numel is not None and numel < SERIAL_BELOW else torch.get_num_threads()


def linear_merge(tensors, coeffs, *, out_dtype):
    out = empty_like_flat(tensors[0], out_dtype)
    bad = _C.linear_merge(out.data_ptr(), code(out_dtype), ptrs(tensors), code(tensors[0].dtype), out.numel(),
                          list(coeffs), _threads(out.numel()))
    return out, bad


def task_arithmetic(base, tensors, coeffs, *, out_dtype):
    out = empty_like_flat(base, out_dtype)
    bad = _C.task_arithmetic(out.data_ptr(), code(out_dtype), base.data_ptr(), ptrs(tensors), code(base.dtype),
                             out.numel(), list(coeffs), _threads(out.numel()))
    return out, bad


def magnitude_mask(x, k, *, tie):
    out = torch.empty(x.numel(), dtype=torch.bool)
    bad = _C.magnitude_mask(out.data_ptr(), x.data_ptr(), code(x.dtype), x.numel(), int(k), tie == "index",
                            _threads(x.numel()))
    return out, bad


def ties_merge(base, tensors, weights, ks, *, sign, sign_on, divisor, normalize, lam, rescale, tie, out_dtype):
    out = empty_like_flat(base, out_dtype)
    bad = _C.ties_merge(out.data_ptr(), code(out_dtype), base.data_ptr(), ptrs(tensors), code(base.dtype), out.numel(),
                        list(weights), list(ks), CONSENSUS_CODES[sign], sign_on == "weighted", divisor == "weights",
                        normalize, lam, rescale == "l1", tie == "index", _threads(out.numel()))
    return out, bad


def dare_merge(base, tensors, weights, densities, *, seed, stream, offset, consensus, sign_on, divisor, rescale,
               normalize, lam, out_dtype):
    out = empty_like_flat(base, out_dtype)
    bad = _C.dare_merge(out.data_ptr(), code(out_dtype), base.data_ptr(), ptrs(tensors), code(base.dtype), out.numel(),
                        list(weights), list(densities), [keep_threshold(d) for d in densities], seed, stream, offset,
                        RESCALE_CODES[rescale], CONSENSUS_CODES[consensus], sign_on == "weighted",
                        divisor == "weights", normalize, lam, _threads(out.numel()))
    return out, bad


def fisher_merge(tensors, fishers, weights, *, eps, out_dtype):
    out = empty_like_flat(tensors[0], out_dtype)
    bad = _C.fisher_merge(out.data_ptr(), code(out_dtype), ptrs(tensors), ptrs(fishers), code(tensors[0].dtype),
                          code(fishers[0].dtype), out.numel(), list(weights), eps,
                          _threads(out.numel()))
    return out, bad


def inner_products(tensors, base=None):
    """The K×K float64 Gram matrix ⟨x_i − b, x_j − b⟩ (⟨x_i, x_j⟩ without a base) of flat contiguous
    CPU tensors of one dtype, and whether any input held NaN/Inf (a private helper of the methods:
    see fusion_engine.methods._common.inner_products)."""
    gram = torch.empty(len(tensors), len(tensors), dtype=torch.float64)
    bad = _C.inner_products(gram.data_ptr(), ptrs(tensors), 0 if base is None else base.data_ptr(),
                            code(tensors[0].dtype), tensors[0].numel(), _threads())
    return gram, bad


def sinkhorn(cost, a, b, f, g, *, reg, max_iter, tol, check_every, with_plan):
    """Log-domain Sinkhorn (see fusion_engine.ops.sinkhorn.sinkhorn_reference for the contract)."""
    B, n, m = cost.shape
    f, g = f.clone(), g.clone()  # starting potentials in, results out: the caller's stay untouched
    plan = torch.empty(B, n, m, dtype=cost.dtype) if with_plan else None
    n_iter = torch.zeros(B, dtype=torch.int64)
    err = torch.zeros(B, dtype=cost.dtype)
    _C.sinkhorn(cost.data_ptr(), a.data_ptr(), b.data_ptr(), f.data_ptr(), g.data_ptr(),
                plan.data_ptr() if plan is not None else 0, n_iter.data_ptr(), err.data_ptr(), B, n, m,
                code(cost.dtype), float(reg), float(tol), int(max_iter), int(check_every), _threads())
    return plan, f, g, n_iter, err


def linear_assignment(cost, *, maximize):
    """cost [B, n, m] on the CPU (any float dtype, any strides: read in place) → (row_ind, col_ind, bad)
    as :func:`fusion_engine.ops.linear_assignment.linear_assignment_reference`; the batch is spread
    over threads with the GIL released."""
    batch, n, m = cost.shape
    k = min(n, m)
    row_ind = torch.empty((batch, k), dtype=torch.int64)
    col_ind = torch.empty((batch, k), dtype=torch.int64)
    bad = _C.linear_assignment(cost.data_ptr(), code(cost.dtype), batch, n, m, *cost.stride(), bool(maximize),
                               row_ind.data_ptr(), col_ind.data_ptr(), _threads())
    return row_ind, col_ind, bad
