"""``ram`` and ``ramplus_tl``: Reinforced Agent Merging (mergekit 0.1.5 semantics).

With δ_i = x_i − b, n_ij = [|δ_ij| > ε] and c_j = Σ_i n_ij (how many inputs change entry j):

* ``ram``:  y = b + Σ_i n_i ⊙ δ_i ⊙ (1 where c = 1, 1/c where c > 1)
  (an entry changed by one input takes its full change; shared entries are averaged);
* ``ramplus_tl``: input i's unique entries are further scaled by
  λ_i = 1 + r · clamp(ρ_i, 0, α), ρ_i = #{j: n_ij, c_j > 1} / max(#{j: n_ij, c_j = 1}, ε).

Plain torch, one input at a time (a count tensor and the accumulator; no K×N stack).
Reference: https://arxiv.org/abs/2601.13572
"""

from __future__ import annotations

import torch

from ..ops._common import accum_dtype
from . import _common as M
from .registry import BASE_REQUIRED, SHARED, Group, Method, Parameter, register


def _changed(x, base, epsilon):
    return M.delta(x, base).abs() > epsilon


def _merge(group: Group, epsilon: float, r: float | None, alpha: float | None) -> torch.Tensor:
    base, xs = group.base, group.non_base
    if not xs:
        return base.to(group.out_dtype)
    counts = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
    for x in xs:
        counts += _changed(x, base, epsilon)
    unique, shared = counts == 1, counts > 1
    share = 1.0 / counts.clamp(min=1).to(accum_dtype(base.dtype))
    acc = accum_dtype(base.dtype)
    out = base.to(acc, copy=True)
    for x in xs:
        changed = _changed(x, base, epsilon)
        lam = 1.0
        if r is not None:
            rho = int((changed & shared).sum()) / max(int((changed & unique).sum()), epsilon)
            lam = 1.0 + r * min(max(rho, 0.0), alpha)
        factor = torch.where(unique, lam, share) * changed
        out += M.delta(x, base).to(acc) * factor
    return out.to(group.out_dtype)


def merge_ram(group: Group, *, epsilon: float) -> torch.Tensor:
    return _merge(group, epsilon, None, None)


def merge_ramplus_tl(group: Group, *, r: float, alpha: float, epsilon: float) -> torch.Tensor:
    return _merge(group, epsilon, r, alpha)


EPSILON = Parameter("epsilon", float, SHARED, default=1e-5, low=0.0, doc="|δ| above which an entry counts as changed")
register(Method(
    name="ram", merge=merge_ram, parameters=(EPSILON,), base=BASE_REQUIRED,
    summary="unique changes kept, shared changes averaged", reference="https://arxiv.org/abs/2601.13572",
))
register(Method(
    name="ramplus_tl", merge=merge_ramplus_tl,
    parameters=(
        Parameter("r", float, SHARED, default=0.1, low=0.0, doc="boost rate of unique changes"),
        Parameter("alpha", float, SHARED, default=0.2, low=0.0, doc="cap of the overlap ratio"),
        EPSILON,
    ),
    base=BASE_REQUIRED,
    summary="RAM with unique changes boosted by the overlap ratio (tensor-local)",
    reference="https://arxiv.org/abs/2601.13572",
))
