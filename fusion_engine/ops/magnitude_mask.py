"""Exact top-k by magnitude: the trim step of TIES and breadcrumbs.

.. math::  m_j = [\\,|x_j| \\text{ is among the } k = \\lfloor \\rho n \\rfloor \\text{ largest}\\,]
"""

from __future__ import annotations

import torch

from .._dispatch import cpp_launchers, cuda_launchers, register, triton_kernels
from . import _common as C

TIES_MODES = ("index", "threshold")


def magnitude_mask(x, density=None, *, k: int | None = None, tie: str = "index", check_finite: bool = True,
                   backend: str | None = None) -> torch.Tensor:
    """Boolean mask of the k = floor(density · n) entries of largest |x| (or of ``k`` entries).

    Let T be the k-th largest |x_j|. ``tie="index"`` keeps every entry with |x_j| > T and, of the
    entries with |x_j| = T, the lowest indices, so that exactly k survive. ``tie="threshold"``
    keeps every entry with |x_j| ≥ T (the TIES reference code's behaviour; may keep more than k).
    k = 0 keeps nothing. Kernels select T exactly by a radix histogram over the float bits of |x|
    (one 2^15-bin pass for fp16/bf16, two passes for fp32), never by sorting.

    Parameters
    ----------
    x : tensor of any shape (fp16, bf16, fp32, fp64)
    density : ρ ∈ [0, 1], the fraction of entries kept
    k : the number of entries kept, in [0, n] (instead of ``density``)
    tie : ``"index"`` or ``"threshold"``

    Returns
    -------
    A bool tensor shaped like ``x``.

    Example
    -------
    >>> magnitude_mask(torch.tensor([0.1, -3.0, 2.0, 2.0]), 0.5)
    tensor([False,  True,  True, False])
    """
    op = "magnitude_mask"
    shape, dtype, device = C.check_tensors(op, [("x", x)])
    (k,) = C.keep_counts(op, density, k, 1, x.numel())
    C.choice(op, "tie", tie, TIES_MODES)
    return C.run(op, [("x", x)], shape, dtype, device, backend, check_finite,
                 (C.flat(x), k), dict(tie=tie))


def topk_magnitude_reference(values: torch.Tensor, k: int, tie: str) -> torch.Tensor:
    """The oracle of every selection: a stable descending sort of |values| (lowest index first
    among equals) and its first k entries; or, for ``tie="threshold"``, all ≥ the k-th."""
    n = values.numel()
    mask = torch.zeros(n, dtype=torch.bool, device=values.device)
    if k <= 0 or n == 0:
        return mask
    magnitude = values.abs()
    order = torch.sort(magnitude, descending=True, stable=True).indices
    if tie == "index":
        mask[order[:k]] = True
    else:
        mask = magnitude >= magnitude[order[k - 1]]
    return mask


def magnitude_mask_reference(x: torch.Tensor, k: int, *, tie: str):
    """Kernel-level oracle: flat x, keep count k. Returns ``(mask, nonfinite)``."""
    return topk_magnitude_reference(x, k, tie), C.any_nonfinite_reference([x])


register("magnitude_mask", torch=magnitude_mask_reference,
         cpp=lambda: cpp_launchers().magnitude_mask,
         triton=lambda: triton_kernels().magnitude_mask.magnitude_mask,
         cuda=lambda: cuda_launchers().magnitude_mask)
