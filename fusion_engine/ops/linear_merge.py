"""Weighted average of same-shape tensors (model soups, linear merge).

.. math::  y = \\sum_i c_i x_i, \\qquad c_i = w_i / \\sum_j w_j \\text{ if normalize else } w_i
"""

from __future__ import annotations

import torch

from .._dispatch import cpp_launchers, cuda_launchers, register, triton_kernels
from ..errors import ConfigError
from . import _common as C


def linear_merge(tensors, weights=None, *, normalize: bool = True, out_dtype=None,
                 check_finite: bool = True, backend: str | None = None) -> torch.Tensor:
    """Weighted sum (or average) of K same-shape tensors.

    .. math::  y = \\sum_{i=1}^{K} c_i x_i, \\quad c_i = \\frac{w_i}{\\sum_j w_j} \\text{ (normalize) or } w_i

    Parameters
    ----------
    tensors : list of K tensors, one shape, dtype and device
    weights : K floats, or a scalar, or None (all 1)
    normalize : divide the weights by their sum (mergekit ``linear``'s default)
    out_dtype : dtype of the result (default: the inputs' dtype)
    check_finite : raise :class:`NonFiniteError` naming the tensor when an input holds NaN/Inf
    backend : ``"cpp"``, ``"triton"``, ``"cuda"``, ``"torch"`` or None (automatic)

    Returns
    -------
    The merged tensor, shape of the inputs, accumulated in fp32 (fp64 for fp64).

    Example
    -------
    >>> linear_merge([torch.ones(3), torch.zeros(3)], [3.0, 1.0])
    tensor([0.7500, 0.7500, 0.7500])
    """
    op = "linear_merge"
    tensors = C.tensor_list(op, tensors)
    named = [(f"tensors[{i}]", t) for i, t in enumerate(tensors)]
    shape, dtype, device = C.check_tensors(op, named)
    w = C.per_model_floats(op, "weights", weights, len(tensors), default=1.0)
    if normalize:
        total = sum(w)
        if abs(total) < 1e-12:
            raise ConfigError(f"{op}: the weights sum to {total}; with normalize=True they must not sum to 0 "
                              f"(pass normalize=False for a plain weighted sum)")
        w = [wi / total for wi in w]
    out_dtype = C.out_dtype_of(op, out_dtype, dtype)
    return C.run(op, named, shape, dtype, device, backend, check_finite,
                 ([C.flat(t) for t in tensors], w), dict(out_dtype=out_dtype))


def linear_merge_reference(tensors: list[torch.Tensor], coeffs: list[float], *, out_dtype: torch.dtype):
    """Kernel-level oracle: flat contiguous tensors, final coefficients c_i.

    Returns ``(y, nonfinite)`` with y = Σ c_i x_i accumulated in fp32 (fp64 for fp64 inputs).
    """
    acc_dtype = C.accum_dtype(tensors[0].dtype)
    acc = torch.zeros(tensors[0].shape, dtype=acc_dtype, device=tensors[0].device)
    for c, x in zip(coeffs, tensors):
        acc += torch.tensor(c, dtype=acc_dtype) * x.to(acc_dtype)
    return acc.to(out_dtype), C.any_nonfinite_reference(tensors)


register("linear_merge", torch=linear_merge_reference,
         cpp=lambda: cpp_launchers().linear_merge,
         triton=lambda: triton_kernels().linear_merge.linear_merge,
         cuda=lambda: cuda_launchers().linear_merge)
