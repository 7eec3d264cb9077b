"""``arcee_fusion``: keep the other model's changes where they matter most (mergekit 0.1.5).

With a the base and x the other input, importance I = |x − a| · KL(softmax(x) ‖ softmax(a))
(softmax and KL along the last dim, probabilities + 1e-8, one KL per row), threshold
T = Q₅₀ + 1.5 (Q₇₅ − Q₂₅) over all entries of I (Q_q = the ⌊q (n−1)⌋-th smallest), and

.. math::  y = a + (x - a) \\odot [I \\ge T]

Quantiles are exact here; mergekit estimates them from 1M entries sampled with torch's RNG when
a tensor has more (so above 1M entries mergekit is random and this is not).
Reference: https://arcee.ai
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import BASE_REQUIRED, Group, Method, register


def importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    p = F.softmax(x, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    return (x - base).abs() * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)


def order_statistic(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ⌊q (n − 1)⌋-th smallest entry (0-based), q in float32 as mergekit computes it."""
    n = values.numel()
    index = int(torch.tensor(q, dtype=torch.float32) * (n - 1))
    return values.reshape(-1).kthvalue(index + 1).values


def merge_arcee_fusion(group: Group) -> torch.Tensor:
    base = group.base
    (x,) = group.non_base
    scores = importance(x, base)
    q1, median, q3 = (order_statistic(scores, q) for q in (0.25, 0.5, 0.75))
    keep = (scores >= median + 1.5 * (q3 - q1)).to(base.dtype)
    return (base + (x - base) * keep).to(group.out_dtype)


register(Method(
    name="arcee_fusion", merge=merge_arcee_fusion, base=BASE_REQUIRED, min_inputs=2, max_inputs=2,
    summary="keep the other model's most important changes (KL-weighted, IQR threshold)",
    reference="https://arcee.ai",
))
