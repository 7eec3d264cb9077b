"""Task arithmetic: add a weighted sum of task vectors to the base model.

.. math::  y = b + \\lambda \\sum_i w_i\\, \\delta_i, \\qquad \\delta_i = x_i - b
"""

from __future__ import annotations

import torch

from .._dispatch import cpp_launchers, cuda_launchers, register, triton_kernels
from . import _common as C


def task_arithmetic(base, tensors, weights=None, *, lam: float = 1.0, out_dtype=None,
                    check_finite: bool = True, backend: str | None = None) -> torch.Tensor:
    """Base plus λ times the weighted sum of task vectors (Ilharco et al., 2023).

    .. math::  y = b + \\lambda \\sum_{i=1}^{K} w_i (x_i - b)

    where b is the base tensor, x_i the fine-tuned tensors, w_i their weights and λ the scaling.
    Each task vector δ_i = x_i − b is rounded to the inputs' dtype (as a checkpoint stores it) and
    accumulated in fp32 (fp64 for fp64).

    Parameters
    ----------
    base : tensor, the pre-trained weights
    tensors : list of K tensors shaped like ``base``
    weights : K floats, a scalar, or None (all 1)
    lam : λ, scales the summed task vectors (mergekit's ``lambda``)
    out_dtype, check_finite, backend : as in :func:`linear_merge`

    Example
    -------
    >>> task_arithmetic(torch.zeros(2), [torch.ones(2), 2 * torch.ones(2)], [0.5, 0.5])
    tensor([1.5000, 1.5000])

    Reference: Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.
    """
    op = "task_arithmetic"
    tensors = C.tensor_list(op, tensors)
    named = [("base", base)] + [(f"tensors[{i}]", t) for i, t in enumerate(tensors)]
    shape, dtype, device = C.check_tensors(op, named)
    w = C.per_model_floats(op, "weights", weights, len(tensors), default=1.0)
    coeffs = [float(lam) * wi for wi in w]
    out_dtype = C.out_dtype_of(op, out_dtype, dtype)
    return C.run(op, named, shape, dtype, device, backend, check_finite,
                 (C.flat(base), [C.flat(t) for t in tensors], coeffs), dict(out_dtype=out_dtype))


def task_arithmetic_reference(base: torch.Tensor, tensors: list[torch.Tensor], coeffs: list[float], *,
                              out_dtype: torch.dtype):
    """Kernel-level oracle: y = b + Σ c_i δ_i with c_i = λ w_i; returns ``(y, nonfinite)``."""
    acc_dtype = C.accum_dtype(base.dtype)
    acc = torch.zeros(base.shape, dtype=acc_dtype, device=base.device)
    for c, x in zip(coeffs, tensors):
        acc += torch.tensor(c, dtype=acc_dtype) * C.task_vector(x, base).to(acc_dtype)
    return (base.to(acc_dtype) + acc).to(out_dtype), C.any_nonfinite_reference([base, *tensors])


register("task_arithmetic", torch=task_arithmetic_reference,
         cpp=lambda: cpp_launchers().task_arithmetic,
         triton=lambda: triton_kernels().task_arithmetic.task_arithmetic,
         cuda=lambda: cuda_launchers().task_arithmetic)
