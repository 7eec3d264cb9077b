"""The cpp backend: hands flat CPU tensors to the C++ kernels of fusion_engine._C.

Each function has the kernel-level signature of its op's ``*_reference`` (fusion_engine/ops) and
returns ``(out, nonfinite)``. Threads: ``torch.get_num_threads()`` (results do not depend on it).
"""

from __future__ import annotations

import torch

from .. import _C
from ..ops.philox import keep_threshold
from ._marshal import CONSENSUS_CODES, RESCALE_CODES, code, empty_like_flat, ptrs


def _threads() -> int:
    return torch.get_num_threads()


def linear_merge(tensors, coeffs, *, out_dtype):
    out = empty_like_flat(tensors[0], out_dtype)
    bad = _C.linear_merge(out.data_ptr(), code(out_dtype), ptrs(tensors), code(tensors[0].dtype), out.numel(),
                          list(coeffs), _threads())
    return out, bad


def task_arithmetic(base, tensors, coeffs, *, out_dtype):
    out = empty_like_flat(base, out_dtype)
    bad = _C.task_arithmetic(out.data_ptr(), code(out_dtype), base.data_ptr(), ptrs(tensors), code(base.dtype),
                             out.numel(), list(coeffs), _threads())
    return out, bad


def magnitude_mask(x, k, *, tie):
    out = torch.empty(x.numel(), dtype=torch.bool)
    bad = _C.magnitude_mask(out.data_ptr(), x.data_ptr(), code(x.dtype), x.numel(), int(k), tie == "index", _threads())
    return out, bad


def ties_merge(base, tensors, weights, ks, *, sign, sign_on, divisor, normalize, lam, rescale, tie, out_dtype):
    out = empty_like_flat(base, out_dtype)
    bad = _C.ties_merge(out.data_ptr(), code(out_dtype), base.data_ptr(), ptrs(tensors), code(base.dtype), out.numel(),
                        list(weights), list(ks), CONSENSUS_CODES[sign], sign_on == "weighted", divisor == "weights",
                        normalize, lam, rescale == "l1", tie == "index", _threads())
    return out, bad


def dare_merge(base, tensors, weights, densities, *, seed, stream, offset, consensus, sign_on, divisor, rescale,
               normalize, lam, out_dtype):
    out = empty_like_flat(base, out_dtype)
    bad = _C.dare_merge(out.data_ptr(), code(out_dtype), base.data_ptr(), ptrs(tensors), code(base.dtype), out.numel(),
                        list(weights), list(densities), [keep_threshold(d) for d in densities], seed, stream, offset,
                        RESCALE_CODES[rescale], CONSENSUS_CODES[consensus], sign_on == "weighted",
                        divisor == "weights", normalize, lam, _threads())
    return out, bad


def fisher_merge(tensors, fishers, weights, *, eps, out_dtype):
    out = empty_like_flat(tensors[0], out_dtype)
    bad = _C.fisher_merge(out.data_ptr(), code(out_dtype), ptrs(tensors), ptrs(fishers), code(tensors[0].dtype),
                          code(fishers[0].dtype), out.numel(), list(weights), eps, _threads())
    return out, bad
