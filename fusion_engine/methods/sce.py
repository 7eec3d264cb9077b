"""``sce``: Select, Calculate, Erase (FuseChat 2.0), mergekit 0.1.5 semantics.

With task vectors δ_i = x_i − b:

1. **Select** (``select_topk`` = τ < 1): σ² = the per-entry variance of the δ_i over the inputs
   (population variance); keep the k = int(τ · #{σ² ≠ 0}) entries of largest σ², m = that mask,
   v_i = m ⊙ δ_i (τ ≥ 1: v_i = δ_i; τ ≤ 0: v_i = 0).
2. **Calculate**: c_i = mean(v_i²) / Σ_j mean(v_j²) (uniform 1/K when the sum is below 1e-6).
3. **Erase**: s = sign(Σ_i v_i) (unweighted), a_i = [sign(v_i) = s];
   y = b + Σ_i a_i c_i v_i / Σ_i a_i c_i (an entry where no input agrees keeps b).

Runs on the fused ties_merge op (``sign_on="unweighted"``): directly on the inputs when τ ≥ 1,
on the selected task vectors otherwise. The variance is accumulated one input at a time (two
passes, no K×N stack). mergekit clamps the divisor at 1e-6 rather than replacing 0 by 1: the two
differ only where the agreeing inputs' c_i sum to less than 1e-6.

Reference: Wan et al., "FuseChat: Knowledge Fusion of Chat Models", 2024 (https://arxiv.org/abs/2408.07990).
"""

from __future__ import annotations

import torch

from ..ops import magnitude_mask, ties_merge
from ..ops._common import accum_dtype
from . import _common as M
from .registry import BASE_REQUIRED, SHARED, Group, Method, Parameter, register


def variance_keep(group: Group, density: float) -> torch.Tensor:
    """Bool mask of the int(τ · #nonzero σ²) entries of largest variance across the task vectors."""
    base, xs = group.base, group.non_base
    acc = accum_dtype(base.dtype)
    mean = torch.zeros(base.shape, dtype=acc, device=base.device)
    for x in xs:
        mean += M.task_vector(x, base).to(acc)
    mean /= len(xs)
    var = torch.zeros_like(mean)
    for x in xs:
        var += (M.task_vector(x, base).to(acc) - mean).square()
    var /= len(xs)
    k = int(int(torch.count_nonzero(var)) * density)
    return magnitude_mask(var, k=k, check_finite=False, backend=group.backend)


def merge_sce(group: Group, *, int8_mask: bool, select_topk: float) -> torch.Tensor:
    base, xs = group.base, group.non_base
    if not xs:
        return base.to(group.out_dtype)
    if M.exact_path(group):
        return sce_exact(group, select_topk)
    if select_topk < 1:
        keep = (variance_keep(group, select_topk) if select_topk > 0
                else torch.zeros(base.shape, dtype=torch.bool, device=base.device))
        kept = [M.task_vector(x, base) * keep.to(base.dtype) for x in xs]
    else:
        kept = None
    acc = accum_dtype(base.dtype)
    gram, _ = M.inner_products(kept, None, group.backend) if kept is not None else \
        M.inner_products(xs, base, group.backend)  # one read of every input; the diagonal is used
    energies = [gram[i][i] / max(1, base.numel()) for i in range(len(xs))]
    total = sum(energies)
    weights = [1.0 / len(xs)] * len(xs) if abs(total) < 1e-6 else [e / total for e in energies]
    options = dict(sign="sum", sign_on="unweighted", divisor="weights", normalize=True, lam=1.0, tie="index")
    if kept is None:
        return ties_merge(base, xs, weights, 1.0, **options, **group.ops_kwargs)
    mixed = ties_merge(torch.zeros_like(base), kept, weights, 1.0, **options, out_dtype=acc,
                       check_finite=group.check_finite, backend=group.backend)
    return mixed.view(base.shape).add_(base).to(group.out_dtype)


def sce_exact(group: Group, select_topk: float) -> torch.Tensor:
    """SCE in plain torch, differentiable as mergekit's: the selection and sign masks are constant;
    c_i = mean(v_i²) / Σ_j mean(v_j²) carries gradients through its numerators (mergekit divides by
    the sum as a number), and the divisor is clamped at 1e-6 as in mergekit."""
    base = group.base
    v = torch.stack([M.task_vector(x, base) for x in group.non_base])
    if select_topk < 1:
        with torch.no_grad():
            keep = (variance_keep(group, select_topk) if select_topk > 0
                    else torch.zeros(base.shape, dtype=torch.bool, device=base.device))
        v = v * keep.to(v.dtype)
    energies = v.square().reshape(len(v), -1).mean(dim=1)
    total = float(energies.detach().sum())
    weights = torch.full_like(energies, 1.0 / len(v)) if abs(total) < 1e-6 else energies / total
    majority = torch.where(v.detach().sum(0) >= 0, 1.0, -1.0).to(v.dtype)
    agree = weights.view(-1, *[1] * (v.dim() - 1)) * (v.detach().sign() == majority).to(v.dtype)
    return (base + (v * agree).sum(0) / agree.sum(0).clamp(min=1e-6)).to(group.out_dtype)


SCE = register(Method(
    name="sce",
    merge=merge_sce,
    parameters=(
        Parameter("int8_mask", bool, SHARED, default=False, doc="accepted for mergekit; no numerical effect"),
        Parameter("select_topk", float, SHARED, default=1.0, low=0.0, high=1.0,
                  doc="τ, fraction of high-variance entries kept"),
    ),
    base=BASE_REQUIRED, differentiable=True,
    summary="select by variance, weight by energy, erase minority signs",
    reference="https://arxiv.org/abs/2408.07990",
))
