"""The cpp backend: hands flat CPU tensors to the C++ kernels of fusion_engine._C.

Each function has the kernel-level signature of its op's ``*_reference`` (fusion_engine/ops) and
calls the binding by keyword (csrc/python/bind_*.cpp). Threads: ``torch.get_num_threads()``
(results do not depend on it). Importing this module checks the extension's enum codes.
"""

from __future__ import annotations

import torch

from .. import _C
from ._marshal import CONSENSUS_CODES, RESCALE_CODES, check_codes, code, empty_like_flat, keep_threshold, ptrs

check_codes(_C)

SERIAL_BELOW = 1 << 16   # elements: below this an OpenMP team costs more than it saves (and, on an
                         # oversubscribed machine, its barrier can wait a whole time slice)


def _threads(numel: int | None = None) -> int:
    """torch's intra-op thread count; 1 for elementwise kernels on fewer than SERIAL_BELOW elements."""
    return 1 if numel is not None and numel < SERIAL_BELOW else torch.get_num_threads()


def linear_merge(tensors, coeffs, *, out_dtype):
    out = empty_like_flat(tensors[0], out_dtype)
    bad = _C.linear_merge(out=out.data_ptr(), out_dtype=code(out_dtype), inputs=ptrs(tensors),
                          dtype=code(tensors[0].dtype), n=out.numel(), coeffs=list(coeffs),
                          threads=_threads(out.numel()))
    return out, bad


def task_arithmetic(base, tensors, coeffs, *, out_dtype):
    out = empty_like_flat(base, out_dtype)
    bad = _C.task_arithmetic(out=out.data_ptr(), out_dtype=code(out_dtype), base=base.data_ptr(),
                             inputs=ptrs(tensors), dtype=code(base.dtype), n=out.numel(), coeffs=list(coeffs),
                             threads=_threads(out.numel()))
    return out, bad


def magnitude_mask(x, k, *, tie):
    out = torch.empty(x.numel(), dtype=torch.bool)
    bad = _C.magnitude_mask(out=out.data_ptr(), x=x.data_ptr(), dtype=code(x.dtype), n=x.numel(), k=int(k),
                            tie_index=tie == "index", threads=_threads(x.numel()))
    return out, bad


def ties_merge(base, tensors, weights, ks, *, sign, sign_on, divisor, normalize, lam, rescale, tie, out_dtype):
    out = empty_like_flat(base, out_dtype)
    bad = _C.ties_merge(out=out.data_ptr(), out_dtype=code(out_dtype), base=base.data_ptr(), inputs=ptrs(tensors),
                        dtype=code(base.dtype), n=out.numel(), weights=list(weights), ks=list(ks),
                        consensus=CONSENSUS_CODES[sign], sign_weighted=sign_on == "weighted",
                        divisor_weights=divisor == "weights", normalize=normalize, lam=lam,
                        rescale_l1=rescale == "l1", tie_index=tie == "index", threads=_threads(out.numel()))
    return out, bad


def dare_merge(base, tensors, weights, densities, *, seed, stream, offset, consensus, sign_on, divisor, rescale,
               normalize, lam, out_dtype):
    out = empty_like_flat(base, out_dtype)
    bad = _C.dare_merge(out=out.data_ptr(), out_dtype=code(out_dtype), base=base.data_ptr(), inputs=ptrs(tensors),
                        dtype=code(base.dtype), n=out.numel(), weights=list(weights), densities=list(densities),
                        thresholds=[keep_threshold(d) for d in densities], seed=seed, stream=stream, offset=offset,
                        rescale=RESCALE_CODES[rescale], consensus=CONSENSUS_CODES[consensus],
                        sign_weighted=sign_on == "weighted", divisor_weights=divisor == "weights",
                        normalize=normalize, lam=lam, threads=_threads(out.numel()))
    return out, bad


def fisher_merge(tensors, fishers, weights, *, eps, out_dtype):
    out = empty_like_flat(tensors[0], out_dtype)
    bad = _C.fisher_merge(out=out.data_ptr(), out_dtype=code(out_dtype), inputs=ptrs(tensors),
                          fishers=ptrs(fishers), dtype=code(tensors[0].dtype), fisher_dtype=code(fishers[0].dtype),
                          n=out.numel(), weights=list(weights), eps=eps, threads=_threads(out.numel()))
    return out, bad


def philox_words(n, *, seed, stream, model, offset, device):
    """The Philox words of entries offset … offset+n−1 of model ``model`` (AVX-512 where available)."""
    words = torch.empty(n, dtype=torch.int32)
    if n:
        _C.philox_words(out=words.data_ptr(), n=n, offset=offset, model=model, stream=stream, seed=seed,
                        threads=_threads())
    return words.to(torch.int64) & 0xFFFFFFFF


def inner_products(tensors, base=None):
    """The K×K float64 Gram matrix and the non-finite flag (fp32 lane sums per 512-entry block, fp64
    across blocks, in a fixed order: independent of the thread count)."""
    gram = torch.empty(len(tensors), len(tensors), dtype=torch.float64)
    bad = _C.inner_products(gram=gram.data_ptr(), inputs=ptrs(tensors), base=0 if base is None else base.data_ptr(),
                            dtype=code(tensors[0].dtype), n=tensors[0].numel(), threads=_threads())
    return gram, bad


def any_nonfinite(tensors):
    """Whether a tensor holds NaN/Inf: the flag of the inner-products kernel, one read per tensor."""
    return any(bool(inner_products([t])[1]) for t in tensors if t.numel())


def sinkhorn(cost, a, b, f, g, *, reg, max_iter, tol, check_every, with_plan):
    """Log-domain Sinkhorn (see fusion_engine.ops.sinkhorn.sinkhorn_reference for the contract)."""
    batch, n, m = cost.shape
    f, g = f.clone(), g.clone()  # starting potentials in, results out: the caller's stay untouched
    plan = torch.empty(batch, n, m, dtype=cost.dtype) if with_plan else None
    n_iter = torch.zeros(batch, dtype=torch.int64)
    err = torch.zeros(batch, dtype=cost.dtype)
    _C.sinkhorn(cost=cost.data_ptr(), a=a.data_ptr(), b=b.data_ptr(), f=f.data_ptr(), g=g.data_ptr(),
                plan=plan.data_ptr() if plan is not None else 0, n_iter=n_iter.data_ptr(), err=err.data_ptr(),
                batch=batch, n=n, m=m, dtype=code(cost.dtype), reg=float(reg), tol=float(tol),
                max_iter=int(max_iter), check_every=int(check_every), threads=_threads())
    return plan, f, g, n_iter, err


def linear_assignment(cost, *, maximize):
    """cost [B, n, m] on the CPU (any float dtype, any strides: read in place) → (row_ind, col_ind, bad)
    as :func:`fusion_engine.ops.linear_assignment.linear_assignment_reference`; the batch is spread
    over threads with the GIL released."""
    batch, n, m = cost.shape
    k = min(n, m)
    row_ind = torch.empty((batch, k), dtype=torch.int64)
    col_ind = torch.empty((batch, k), dtype=torch.int64)
    stride_batch, stride_row, stride_col = cost.stride()
    bad = _C.linear_assignment(cost=cost.data_ptr(), dtype=code(cost.dtype), batch=batch, n=n, m=m,
                               stride_batch=stride_batch, stride_row=stride_row, stride_col=stride_col,
                               maximize=bool(maximize), row_ind=row_ind.data_ptr(), col_ind=col_ind.data_ptr(),
                               threads=_threads())
    return row_ind, col_ind, bad
