"""``ram`` and ``ramplus_tl``: Reinforced Agent Merging (mergekit 0.1.5 semantics).

With δ_i = x_i − b, n_ij = [|δ_ij| > ε] and c_j = Σ_i n_ij (how many inputs change entry j):

* ``ram``:  y = b + Σ_i n_i ⊙ δ_i ⊙ (1 where c = 1, 1/c where c > 1)
  (an entry changed by one input takes its full change; shared entries are averaged);
* ``ramplus_tl``: input i's unique entries are further scaled by
  λ_i = 1 + r · clamp(ρ_i, 0, α), ρ_i = #{j: n_ij, c_j > 1} / max(#{j: n_ij, c_j = 1}, ε).

Both are computed as y = b + S ⊙ f with S = Σ_i n_i ⊙ δ_i (fp32, fp64 for fp64 inputs) and
f = 1/max(c, 1), except f = λ_i on input i's unique entries (there S = δ_i), in plain torch on
cache-sized steps (:func:`_common.cache_chunks`): ``ram`` reads every input once and writes the
result; ``ramplus_tl`` (whose λ_i need every entry's count first) keeps S, c and the owner of
each unique entry for a second pass over those.
Reference: https://arxiv.org/abs/2601.13572
"""

from __future__ import annotations

import torch

from ..ops._common import accum_dtype, flat
from . import _common as M
from .registry import BASE_REQUIRED, SHARED, Group, Method, Parameter, register


class _Changes:
    """Per step: δ_i, n_i = [|δ_i| > ε] and S += n_i ⊙ δ_i, c += n_i, in reused buffers."""

    def __init__(self, group: Group, epsilon: float):
        base = group.base
        self.base, self.inputs = flat(base), [flat(x) for x in group.non_base]
        self.epsilon, self.acc = epsilon, accum_dtype(base.dtype)
        size = min(self.base.numel(), M.CACHE_CHUNK)
        new = lambda dtype: torch.empty(size, dtype=dtype, device=base.device)  # noqa: E731
        self.delta, self.magnitude = new(base.dtype), new(base.dtype)
        self.masks = [new(torch.bool) for _ in self.inputs]
        self.count_dtype = torch.uint8 if len(self.inputs) < 256 else torch.int32

    def accumulate(self, s: int, e: int, total: torch.Tensor, counts: torch.Tensor) -> list[torch.Tensor]:
        """Fill total (S) and counts (c) of entries s … e−1; returns the masks n_i of the step."""
        m, b = e - s, self.base[s:e]
        total.zero_()
        counts.zero_()
        masks = [mask[:m] for mask in self.masks]
        for x, changed in zip(self.inputs, masks):
            d = torch.sub(x[s:e], b, out=self.delta[:m])  # the task vector in the working dtype
            torch.gt(torch.abs(d, out=self.magnitude[:m]), self.epsilon, out=changed)
            total += d.mul_(changed)  # δ ⊙ n (NaN ⊙ 0 stays NaN, as in mergekit)
            counts += changed
        return masks


def ram_exact(group: Group, epsilon: float, unique_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = b + Σ_i (n_i ⊙ δ_i ⊙ [c = 1] · s_i + n_i ⊙ δ_i ⊙ [c > 1] / max(c, 1)) in plain torch,
    differentiable as mergekit's (the masks and counts are constant; s_i = λ_i for ramplus_tl, else 1)."""
    base = group.base
    tv = torch.stack([M.task_vector(x, base).reshape(-1) for x in group.non_base])
    changed = tv.detach().abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    kept = tv * changed
    unique = kept * (counts == 1)
    if unique_scale is not None:
        unique = unique * unique_scale.view(-1, 1)
    merged = (unique + kept * (counts > 1) / counts.clamp(min=1)).sum(dim=0)
    return (base + merged.reshape(base.shape)).to(group.out_dtype)


def merge_ram(group: Group, *, epsilon: float) -> torch.Tensor:
    base = group.base
    if not group.non_base:
        return base.to(group.out_dtype)
    if M.exact_path(group):
        return ram_exact(group, epsilon)
    steps = _Changes(group, epsilon)
    out = torch.empty(base.shape, dtype=group.out_dtype, device=base.device)
    fo, size = out.view(-1), min(base.numel(), M.CACHE_CHUNK)
    total = torch.empty(size, dtype=steps.acc, device=base.device)
    counts = torch.empty(size, dtype=steps.count_dtype, device=base.device)
    for s, e in M.cache_chunks(base.numel(), base.device):
        m = e - s
        steps.accumulate(s, e, total[:m], counts[:m])
        fo[s:e] = total[:m].div_(counts[:m].clamp_(min=1)).add_(steps.base[s:e])  # f = 1/max(c, 1)
    return out


def merge_ramplus_tl(group: Group, *, r: float, alpha: float, epsilon: float) -> torch.Tensor:
    base, xs = group.base, group.non_base
    if not xs:
        return base.to(group.out_dtype)
    if M.exact_path(group):
        with torch.no_grad():
            tv = torch.stack([M.task_vector(x, base).reshape(-1) for x in xs])
            changed = tv.abs() > epsilon
            counts = changed.sum(dim=0)
            shared, unique = (changed & (counts > 1)).sum(dim=1), (changed & (counts == 1)).sum(dim=1)
            rho = shared / unique.clamp(min=epsilon)  # shared / unique changes per input
            scale = 1 + r * rho.clamp(min=0, max=alpha)
        return ram_exact(group, epsilon, scale.to(accum_dtype(base.dtype)))
    steps = _Changes(group, epsilon)
    n, device = base.numel(), base.device
    total = torch.empty(n, dtype=steps.acc, device=device)
    counts = torch.empty(n, dtype=steps.count_dtype, device=device)
    owner = torch.zeros(n, dtype=steps.count_dtype, device=device)  # i + 1 where only input i changed
    n_changed = torch.zeros(len(xs), dtype=torch.int64, device=device)
    n_unique = torch.zeros(len(xs), dtype=torch.int64, device=device)
    for s, e in M.cache_chunks(n, device):
        masks = steps.accumulate(s, e, total[s:e], counts[s:e])
        unique = counts[s:e] == 1
        for i, changed in enumerate(masks):
            n_changed[i] += changed.sum()
            changed &= unique
            n_unique[i] += changed.sum()
            owner[s:e].masked_fill_(changed, i + 1)
    lam = [1.0]
    for changed_count, unique_count in zip(n_changed.tolist(), n_unique.tolist()):
        rho = (changed_count - unique_count) / max(unique_count, epsilon)  # shared / unique changes
        lam.append(1.0 + r * min(max(rho, 0.0), alpha))
    lam_table = torch.tensor(lam, dtype=steps.acc, device=device)
    out = torch.empty(base.shape, dtype=group.out_dtype, device=device)
    fo = out.view(-1)
    for s, e in M.cache_chunks(n, device):
        owners = owner[s:e]
        share = counts[s:e].clamp(min=1).to(steps.acc).reciprocal_()
        factor = torch.where(owners > 0, torch.index_select(lam_table, 0, owners.long()), share)
        fo[s:e] = total[s:e].mul_(factor).add_(steps.base[s:e])
    return out


EPSILON = Parameter("epsilon", float, SHARED, default=1e-5, low=0.0, doc="|δ| above which an entry counts as changed")
register(Method(
    name="ram", merge=merge_ram, parameters=(EPSILON,), base=BASE_REQUIRED, differentiable=True,
    summary="unique changes kept, shared changes averaged", reference="https://arxiv.org/abs/2601.13572",
))
register(Method(
    name="ramplus_tl", merge=merge_ramplus_tl,
    parameters=(
        Parameter("r", float, SHARED, default=0.1, low=0.0, doc="boost rate of unique changes"),
        Parameter("alpha", float, SHARED, default=0.2, low=0.0, doc="cap of the overlap ratio"),
        EPSILON,
    ),
    base=BASE_REQUIRED, differentiable=True,
    summary="RAM with unique changes boosted by the overlap ratio (tensor-local)",
    reference="https://arxiv.org/abs/2601.13572",
))
