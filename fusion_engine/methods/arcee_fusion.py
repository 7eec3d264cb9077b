"""``arcee_fusion``: keep the other model's changes where they matter most (mergekit 0.1.5).

With a the base and x the other input, importance I = |x − a| · KL(softmax(x) ‖ softmax(a))
(softmax and KL along the last dim, probabilities + 1e-8, one KL per row), threshold
T = Q₅₀ + 1.5 (Q₇₅ − Q₂₅) over all entries of I (Q_q = the ⌊q (n−1)⌋-th smallest), and

.. math::  y = a + (x - a) \\odot [I \\ge T]

Quantiles are exact here; mergekit estimates them from 1M entries sampled with torch's RNG when
a tensor has more (so above 1M entries mergekit is random and this is not). Each is one exact
selection on the float bits (the magnitude_mask op: I ≥ 0) and one masked minimum, or
``torch.kthvalue`` where I has negative (rounding) or NaN entries.
Reference: https://arcee.ai
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ops import magnitude_mask
from ..ops._common import flat
from . import _common as M
from .registry import BASE_REQUIRED, Group, Method, register


def importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """I = |x − a| · KL(softmax(x) + 1e-8 ‖ softmax(a) + 1e-8) per row, in the working dtype, the
    temporaries reused in place (whole-tensor ops: a few large parallel passes)."""
    p = F.softmax(x, dim=-1).add_(1e-8)
    q = F.softmax(base, dim=-1).add_(1e-8)
    kl = torch.div(p, q, out=q).log_().mul_(p).sum(dim=-1, keepdim=True)
    return torch.sub(x, base, out=p).abs_().mul_(kl)


def order_index(q: float, n: int) -> int:
    """⌊q (n − 1)⌋, q in float32 as mergekit computes it."""
    return int(torch.tensor(q, dtype=torch.float32) * (n - 1))


def order_statistic(values: torch.Tensor, q: float, backend: str | None = None) -> float:
    """The ⌊q (n − 1)⌋-th smallest entry (0-based) of values ≥ 0 (no NaN): the minimum of the
    n − ⌊q (n − 1)⌋ largest, selected exactly by :func:`magnitude_mask`."""
    flat = values.reshape(-1)
    n = flat.numel()
    largest = magnitude_mask(flat, k=n - order_index(q, n), check_finite=False,
                             backend=backend)
    buffer = torch.empty(min(n, M.CACHE_CHUNK), dtype=flat.dtype, device=flat.device)
    infinity = torch.tensor(math.inf, dtype=flat.dtype, device=flat.device)
    return min(float(torch.where(largest[s:e], flat[s:e], infinity, out=buffer[:e - s]).amin())
               for s, e in M.cache_chunks(n, flat.device))


def quartiles(values: torch.Tensor, backend: str | None = None) -> list[float]:
    """Q₂₅, Q₅₀, Q₇₅ of :func:`order_statistic`."""
    low = float(values.min())
    if low >= 0:  # (a NaN minimum fails this test too)
        return [order_statistic(values, q, backend) for q in (0.25, 0.5, 0.75)]
    flat = values.reshape(-1)
    return [float(flat.kthvalue(order_index(q, flat.numel()) + 1).values) for q in (0.25, 0.5, 0.75)]


def threshold_of(scores: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """T = Q₅₀ + 1.5 (Q₇₅ − Q₂₅), in the scores' dtype."""
    q1, median, q3 = (torch.tensor(q, dtype=scores.dtype) for q in quartiles(scores, backend))
    return median + 1.5 * (q3 - q1)


def merge_arcee_fusion(group: Group) -> torch.Tensor:
    base = group.base
    (x,) = group.non_base
    if M.exact_path(group):  # differentiable as mergekit's: the mask [I ≥ T] is constant
        with torch.no_grad():
            scores = importance(x, base)
            keep = scores >= threshold_of(scores, group.backend)
        return (base + (x - base) * keep).to(group.out_dtype)
    scores = importance(x, base)
    threshold = threshold_of(scores, group.backend)
    out = torch.empty(base.shape, dtype=group.out_dtype, device=base.device)
    fo, fx, fb, fs = out.view(-1), flat(x), flat(base), scores.view(-1)
    for s, e in M.cache_chunks(fo.numel(), base.device):  # y = a + (x − a) ⊙ [I ≥ T]
        fo[s:e] = torch.sub(fx[s:e], fb[s:e]).mul_(fs[s:e] >= threshold).add_(fb[s:e])
    return out


register(Method(
    name="arcee_fusion", merge=merge_arcee_fusion, base=BASE_REQUIRED, min_inputs=2, max_inputs=2,
    differentiable=True,
    summary="keep the other model's most important changes (KL-weighted, IQR threshold)",
    reference="https://arcee.ai",
))
