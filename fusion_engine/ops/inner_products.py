"""Inner products of task vectors in one read: the Gram matrix behind SLERP, Karcher and model stock.

.. math::  G_{ij} = \\langle x_i - b,\\; x_j - b \\rangle \\qquad (\\langle x_i, x_j \\rangle \\text{ without a base})

The differences are rounded to the inputs' dtype (as a stored task vector is); dot products
accumulate in the accumulation dtype per chunk and in float64 across chunks. No full-size temporary,
no K×N stack.
"""

from __future__ import annotations

import torch

from .._dispatch import cpp_launchers, register, resolve
from . import _common as C
from .nonfinite import any_nonfinite_reference

CHUNK = 1 << 20   # elements per step of the reference


def inner_products(tensors: list[torch.Tensor], base: torch.Tensor | None = None,
                   backend: str | None = None) -> tuple[list[list[float]], bool]:
    """(G, nonfinite): the K×K Gram matrix G_ij = ⟨x_i − b, x_j − b⟩ and whether an input (or the
    base) holds NaN/Inf, in one read of each input.

    Parameters
    ----------
    tensors : K tensors of one shape, dtype and device
    base : b, shaped like them, or None (G_ij = ⟨x_i, x_j⟩)
    backend : as in :func:`fusion_engine.ops.linear_merge`

    Returns
    -------
    G as a list of K lists of floats, and the non-finite flag. On CPU the C++ kernel sums fp32 lanes
    per 512-entry block and fp64 across blocks in a fixed order (independent of the thread count).

    Example
    -------
    >>> inner_products([torch.tensor([1., 2.]), torch.tensor([0., 1.])])[0]
    [[5.0, 2.0], [2.0, 1.0]]
    """
    op = "inner_products"
    tensors = C.tensor_list(op, tensors)
    named = [(f"tensors[{i}]", t) for i, t in enumerate(tensors)] + ([] if base is None else [("base", base)])
    _, dtype, device = C.check_tensors(op, named)
    _, kernel = resolve(op, device, dtype, backend)
    gram, nonfinite = kernel([C.flat(t) for t in tensors], None if base is None else C.flat(base))
    return gram.tolist(), bool(nonfinite)


def inner_products_reference(tensors: list[torch.Tensor], base: torch.Tensor | None = None):
    """Kernel-level oracle over flat tensors: (G as a K×K float64 tensor, nonfinite). Each chunk's
    dot products in the accumulation dtype, the chunks summed in float64."""
    k = len(tensors)
    gram = torch.zeros(k, k, dtype=torch.float64)
    for s in range(0, tensors[0].numel(), CHUNK):
        e = s + CHUNK
        parts = [t[s:e] if base is None else C.task_vector(t[s:e], base[s:e]) for t in tensors]
        parts = [p.to(C.accum_dtype(p.dtype)) for p in parts]
        for i in range(k):
            for j in range(i, k):
                gram[i, j] += float(torch.dot(parts[i], parts[j]))
    gram = gram + gram.triu(1).T  # the lower triangle mirrors the upper
    nonfinite = not bool(torch.isfinite(gram).all()) and any_nonfinite_reference(
        [*tensors, *([] if base is None else [base])])
    return gram, nonfinite


register("inner_products", torch=inner_products_reference,
         cpp=lambda: cpp_launchers().inner_products, helper=True)
