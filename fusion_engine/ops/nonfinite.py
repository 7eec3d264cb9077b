"""The non-finite check: whether any tensor holds a NaN or an Inf, in one read without a temporary.

.. math::  \\text{nonfinite} = \\exists\\, i, j:\\; x_{ij} \\notin \\mathbb{R}
"""

from __future__ import annotations

from typing import Sequence

import torch

from .._dispatch import cpp_launchers, register, resolve
from ._common import accum_dtype, any_nonfinite_reference, flat


def any_nonfinite(tensors: Sequence[torch.Tensor], backend: str | None = None) -> bool:
    """Whether any of ``tensors`` holds NaN/Inf (each may have its own dtype and device).

    On CPU the flag of the C++ inner-products kernel (one read per tensor); elsewhere a finite sum
    proves a tensor finite, and only an infinite or NaN sum (NaN/Inf entries, or an overflowing
    sum) runs the exact elementwise check.

    Example
    -------
    >>> any_nonfinite([torch.ones(3), torch.tensor([1.0, float("nan")])])
    True
    """
    for t in tensors:
        if not t.numel() or not t.is_floating_point():
            continue  # integers are always finite
        _, kernel = resolve("any_nonfinite", t.device, t.dtype, backend)
        if kernel([flat(t)]):
            return True
    return False


def any_nonfinite_torch(tensors: Sequence[torch.Tensor]) -> bool:
    """The torch kernel: a finite accumulation-dtype sum proves a tensor finite; otherwise the exact
    check of :func:`fusion_engine.ops._common.any_nonfinite_reference` decides."""
    for t in tensors:
        if not t.numel() or not t.is_floating_point():
            continue
        if not bool(torch.isfinite(t.sum(dtype=accum_dtype(t.dtype)))) and any_nonfinite_reference([t]):
            return True
    return False


register("any_nonfinite", torch=any_nonfinite_torch,
         cpp=lambda: cpp_launchers().any_nonfinite, helper=True)
