"""The CUDA C++ backend: kernel-level functions over flat CUDA tensors, run by fusion_engine._C_cuda.

Each function has the signature of its op's ``*_reference`` (the spec) and returns
``(out, nonfinite)``. The kernels run on the tensors' device and torch's current stream there; the
call returns once they are done (it reads back the non-finite flag). This module is imported only
when the cuda backend is chosen.
"""

from __future__ import annotations

import torch

from .. import _C_cuda
from ._marshal import CONSENSUS_CODES, RESCALE_CODES, check_codes, code, empty_like_flat, keep_threshold, ptrs

check_codes(_C_cuda)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """The kernels read n contiguous elements from data_ptr() (a no-op for the ops' flat views)."""
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)


def _launch(kernel, device: torch.device, **arguments) -> bool:
    """Run a keyword-only binding on ``device``'s current stream; returns its non-finite flag."""
    with torch.cuda.device(device):
        return bool(kernel(**arguments, stream=torch.cuda.current_stream(device).cuda_stream))


def linear_merge(tensors: list[torch.Tensor], coeffs: list[float], *, out_dtype: torch.dtype):
    tensors = [_flat(t) for t in tensors]
    first = tensors[0]
    out = empty_like_flat(first, out_dtype)
    if out.numel() == 0:
        return out, False
    nonfinite = _launch(_C_cuda.linear_merge, first.device, inputs=ptrs(tensors), coeffs=[float(c) for c in coeffs],
                        n=first.numel(), dtype=code(first.dtype), out=out.data_ptr(), out_dtype=code(out_dtype))
    return out, nonfinite


def task_arithmetic(base: torch.Tensor, tensors: list[torch.Tensor], coeffs: list[float], *,
                    out_dtype: torch.dtype):
    base = _flat(base)
    tensors = [_flat(t) for t in tensors]
    out = empty_like_flat(base, out_dtype)
    if out.numel() == 0:
        return out, False
    nonfinite = _launch(_C_cuda.task_arithmetic, base.device, base=base.data_ptr(), inputs=ptrs(tensors),
                        coeffs=[float(c) for c in coeffs], n=base.numel(), dtype=code(base.dtype), out=out.data_ptr(),
                        out_dtype=code(out_dtype))
    return out, nonfinite


def magnitude_mask(x: torch.Tensor, k: int, *, tie: str):
    x = _flat(x)
    out = torch.empty(x.numel(), dtype=torch.bool, device=x.device)
    if out.numel() == 0:
        return out, False
    nonfinite = _launch(_C_cuda.magnitude_mask, x.device, x=x.data_ptr(), n=x.numel(), dtype=code(x.dtype), k=int(k),
                        tie_index=tie == "index", out=out.data_ptr())
    return out, nonfinite


def ties_merge(base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float], ks: list[int], *,
               sign: str, sign_on: str, divisor: str, normalize: bool, lam: float, rescale: str | None,
               tie: str, out_dtype: torch.dtype):
    base = _flat(base)
    tensors = [_flat(t) for t in tensors]
    out = empty_like_flat(base, out_dtype)
    if out.numel() == 0:
        return out, False
    nonfinite = _launch(_C_cuda.ties_merge, base.device, base=base.data_ptr(), inputs=ptrs(tensors),
                        weights=[float(w) for w in weights], ks=[int(k) for k in ks], n=base.numel(),
                        dtype=code(base.dtype), rescale_l1=rescale == "l1", tie_index=tie == "index",
                        consensus=CONSENSUS_CODES[sign], sign_weighted=sign_on == "weighted",
                        divisor_weights=divisor == "weights", normalize=bool(normalize), lam=float(lam),
                        out=out.data_ptr(), out_dtype=code(out_dtype))
    return out, nonfinite


def dare_merge(base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float], densities: list[float], *,
               seed: int, stream: int, offset: int, consensus: str | None, sign_on: str, divisor: str,
               rescale: str | None, normalize: bool, lam: float, out_dtype: torch.dtype):
    base = _flat(base)
    tensors = [_flat(t) for t in tensors]
    out = empty_like_flat(base, out_dtype)
    if out.numel() == 0:
        return out, False
    densities = [float(d) for d in densities]
    nonfinite = _launch(_C_cuda.dare_merge, base.device, base=base.data_ptr(), inputs=ptrs(tensors),
                        weights=[float(w) for w in weights], densities=densities,
                        thresholds=[keep_threshold(d) for d in densities], n=base.numel(), dtype=code(base.dtype),
                        seed=int(seed), stream_id=int(stream), offset=int(offset), rescale=RESCALE_CODES[rescale],
                        consensus=CONSENSUS_CODES[consensus], sign_weighted=sign_on == "weighted",
                        divisor_weights=divisor == "weights", normalize=bool(normalize), lam=float(lam),
                        out=out.data_ptr(), out_dtype=code(out_dtype))
    return out, nonfinite


def fisher_merge(tensors: list[torch.Tensor], fishers: list[torch.Tensor], weights: list[float], *, eps: float,
                 out_dtype: torch.dtype):
    tensors = [_flat(t) for t in tensors]
    fishers = [_flat(f) for f in fishers]
    first = tensors[0]
    out = empty_like_flat(first, out_dtype)
    if out.numel() == 0:
        return out, False
    nonfinite = _launch(_C_cuda.fisher_merge, first.device, inputs=ptrs(tensors), fishers=ptrs(fishers),
                        weights=[float(w) for w in weights], n=first.numel(), dtype=code(first.dtype),
                        fisher_dtype=code(fishers[0].dtype), eps=float(eps), out=out.data_ptr(),
                        out_dtype=code(out_dtype))
    return out, nonfinite
