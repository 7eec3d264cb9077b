"""Fisher-weighted averaging (Matena & Raffel, 2022).

.. math::  y = \\frac{\\sum_i w_i F_i \\odot x_i}{\\sum_i w_i F_i + \\varepsilon}
"""

from __future__ import annotations

import torch

from .._dispatch import cpp_launchers, cuda_launchers, register, triton_kernels
from . import _common as C


def fisher_merge(tensors, fishers, weights=None, *, eps: float = 1e-8, out_dtype=None,
                 check_finite: bool = True, backend: str | None = None) -> torch.Tensor:
    """Elementwise Fisher-weighted average of K tensors.

    .. math::  y_j = \\frac{\\sum_i w_i F_{ij} x_{ij}}{\\sum_i w_i F_{ij} + \\varepsilon}

    where F_i is the diagonal Fisher information of model i (same shape as x_i), w_i the model
    weights and ε a small constant that keeps entries with zero Fisher finite.

    Parameters
    ----------
    tensors : list of K tensors x_i
    fishers : list of K tensors F_i, shaped like the x_i; the same dtype as them or float32
    weights : K floats (or a scalar, or None for all 1)
    eps : ε ≥ 0
    out_dtype, check_finite, backend : as in :func:`linear_merge`

    Example
    -------
    >>> fisher_merge([torch.zeros(2), torch.ones(2)], [torch.ones(2), 3 * torch.ones(2)], eps=0.0)
    tensor([0.7500, 0.7500])

    Reference: Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022.
    """
    op = "fisher_merge"
    tensors = C.tensor_list(op, tensors)
    fishers = C.tensor_list(op, fishers, "fishers")
    if len(fishers) != len(tensors):
        raise C.ConfigError(f"{op}: got {len(fishers)} fishers for {len(tensors)} tensors; give one per tensor")
    named_x = [(f"tensors[{i}]", t) for i, t in enumerate(tensors)]
    named_f = [(f"fishers[{i}]", f) for i, f in enumerate(fishers)]
    shape, dtype, device = C.check_tensors(op, named_x)
    fshape, fdtype, fdevice = C.check_tensors(op, named_f)
    if fshape != shape:
        raise C.ShapeMismatchError(f"{op}: fishers have shape {tuple(fshape)} but tensors have {tuple(shape)}")
    if fdevice != device:
        raise C.DeviceMismatchError(f"{op}: fishers are on {fdevice} but tensors on {device}")
    if fdtype not in (dtype, torch.float32):
        raise C.DTypeMismatchError(f"{op}: fishers have dtype {fdtype}; use the tensors' dtype ({dtype}) or float32")
    w = C.per_model_floats(op, "weights", weights, len(tensors), default=1.0)
    if not eps >= 0:
        raise C.ConfigError(f"{op}: eps={eps} must be >= 0")
    out_dtype = C.out_dtype_of(op, out_dtype, dtype)
    return C.run(op, named_x + named_f, shape, dtype, device, backend, check_finite,
                 ([C.flat(t) for t in tensors], [C.flat(f) for f in fishers], w),
                 dict(eps=float(eps), out_dtype=out_dtype))


def fisher_merge_reference(tensors: list[torch.Tensor], fishers: list[torch.Tensor], weights: list[float], *,
                           eps: float, out_dtype: torch.dtype):
    """Kernel-level oracle. Returns ``(y, nonfinite)``."""
    acc_dtype = C.accum_dtype(tensors[0].dtype)
    num = torch.zeros(tensors[0].shape, dtype=acc_dtype, device=tensors[0].device)
    den = torch.zeros_like(num)
    for w, x, f in zip(weights, tensors, fishers):
        wf = torch.tensor(w, dtype=acc_dtype) * f.to(acc_dtype)
        num += wf * x.to(acc_dtype)
        den += wf
    return (num / (den + torch.tensor(eps, dtype=acc_dtype))).to(out_dtype), C.any_nonfinite_reference([*tensors, *fishers])


register("fisher_merge", torch=fisher_merge_reference,
         cpp=lambda: cpp_launchers().fisher_merge,
         triton=lambda: triton_kernels().fisher_merge.fisher_merge,
         cuda=lambda: cuda_launchers().fisher_merge)
