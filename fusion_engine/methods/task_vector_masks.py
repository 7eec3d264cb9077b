"""Merges that choose, entry by entry, which task vectors survive: ``magmax``, ``consensus`` (TALL
masks) and ``pcb`` (parameter competition balancing). τ_i = x_i − b, K task vectors, all
arithmetic in float32 (float64 for float64 inputs), the result rounded once.

* ``magmax`` (Marczak et al., 2024): per entry the τ_i of largest magnitude, a later task winning
  ties (``>=``, as the authors' ``merge_max_abs``): y = b + λ · τ_{i*(j)}[j].
* ``consensus`` (Wang et al., 2024, task-arithmetic variant of the authors' ``tall_masks`` code):
  with the multi-task vector τ_MT = Σ_i τ_i, task t's TALL mask is
  m_t = |θ_0 − θ_t| > λ_tall · |θ_MT − θ_t| = |τ_t| > λ_tall · |τ_MT − τ_t| (strict); entries in at
  least k masks are kept: y = b + λ · τ_MT ⊙ [Σ_t m_t ≥ k].
* ``pcb`` (Du et al., 2024, the authors' ``pcb-merging.py`` applied per tensor, d entries):

  1. clamp |τ_i| to its order statistics [a_i, z_i] = [|τ_i|_(⌊10⁻⁴ d⌋), |τ_i|_(⌊(1 − 10⁻⁴) d − 1⌋)]
     (0-based, ascending), c_i = sign(τ_i) · clamp(|τ_i|, a_i, z_i);
  2. intra-balancing exp(K · ((clamp(|τ_i|) − a_i)/(z_i − a_i))²), inter-balancing tanh(τ_i ⊙ Σ_j τ_j),
     score β_i = their product;
  3. keep the top ``ratio``: with q_i = β_i,(⌊(1 − ratio) d⌋) and M_i = max β_i,
     w_i = (clamp(β_i, q_i, M_i) − q_i)/(M_i − q_i) (0 at and below the quantile);
  4. y = b + λ · Σ_i w_i c_i / max(Σ_i w_i, 10⁻¹²).

  A min–max normalisation of a constant row (z_i = a_i or M_i = q_i, e.g. an all-zero task vector)
  gives 0 here, where the reference divides 0 by 0.

MagMax and consensus stream over cache-sized slices of the inputs (no K × N temporary); PCB needs
each task vector's order statistics, so it holds the K task vectors of one tensor.

References: Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning",
ECCV 2024 (https://arxiv.org/abs/2407.06322); Wang et al., "Localizing Task Information for
Improved Model Merging and Compression", ICML 2024 (https://arxiv.org/abs/2405.07813); Du et al.,
"Parameter Competition Balancing for Model Merging", NeurIPS 2024 (https://arxiv.org/abs/2410.02396).
"""

from __future__ import annotations

import torch

from ..ops._common import accum_dtype, flat
from . import _common as M
from .registry import BASE_REQUIRED, SHARED, Group, Method, Parameter, register
from .subspace import LAMBDA

PCB_CLAMP_RATIO = 1e-4  # the authors' min_ratio = max_ratio of the magnitude clamp


def _slices(group: Group):
    """(start, end, b, [τ_i]) over cache-sized slices of the inputs, in the accumulation dtype
    (``b`` may be a view of the base: never written)."""
    base = flat(group.base)
    xs = [flat(x) for x in group.non_base]
    acc = accum_dtype(base.dtype)
    for s, e in M.cache_chunks(base.numel(), base.device):
        b = base[s:e].to(acc)
        yield s, e, b, [x[s:e].to(acc) - b for x in xs]


def _output(group: Group) -> torch.Tensor:
    return torch.empty(group.base.numel(), dtype=group.out_dtype, device=group.base.device)


def merge_magmax(group: Group, **p) -> torch.Tensor:
    """MagMax: the largest-magnitude task vector entry, later tasks winning ties."""
    out = _output(group)
    for s, e, b, taus in _slices(group):
        best = taus[0]
        for tau in taus[1:]:
            best = torch.where(tau.abs() >= best.abs(), tau, best)
        out[s:e] = torch.add(b, best, alpha=p["lambda"])
    return out.view(group.base.shape)


def merge_consensus(group: Group, **p) -> torch.Tensor:
    """Consensus merging: the summed task vectors where at least k TALL masks agree."""
    out = _output(group)
    for s, e, b, taus in _slices(group):
        total = torch.stack(taus).sum(0)
        votes = torch.zeros(total.shape, dtype=torch.int32, device=total.device)
        for tau in taus:
            votes += tau.abs() > (total - tau).abs_().mul_(p["tall_lambda"])
        out[s:e] = torch.add(b, total.mul_(votes >= p["k"]), alpha=p["lambda"])
    return out.view(group.base.shape)


def order_statistic(x: torch.Tensor, index: int) -> torch.Tensor:
    """The entry of 0-based rank ``index`` in ascending order (one selection, no full sort)."""
    return torch.kthvalue(x, index + 1).values


def min_max_scaled(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """(clamp(x, low, high) − low) / (high − low), in place; zeros when high = low."""
    if not bool(high > low):
        return x.zero_()
    return x.clamp_(low, high).sub_(low).div_(high - low)


def merge_pcb(group: Group, **p) -> torch.Tensor:
    """PCB merging: intra/inter-task balancing scores, top ``ratio`` per task, weighted average."""
    acc = accum_dtype(group.base.dtype)
    base = flat(group.base).to(acc)
    taus = [flat(x).to(acc) - base for x in group.non_base]
    total = torch.stack(taus).sum(0)
    d, count = base.numel(), len(taus)
    low_rank, high_rank = int(d * PCB_CLAMP_RATIO), int(d * (1 - PCB_CLAMP_RATIO) - 1)
    keep_rank = int(d * (1 - p["ratio"]))
    numerator, denominator = torch.zeros_like(base), torch.zeros_like(base)
    for tau in taus:
        magnitude = tau.abs()
        low, high = order_statistic(magnitude, low_rank), order_statistic(magnitude, high_rank)
        magnitude.clamp_(low, high)
        score = min_max_scaled(magnitude.clone(), low, high).square_().mul_(count).exp_()
        score.mul_(torch.tanh(tau * total))
        weight = min_max_scaled(score, order_statistic(score, keep_rank), score.max())
        numerator.addcmul_(magnitude.mul_(torch.sign(tau)), weight)
        denominator += weight
    merged = numerator.div_(denominator.clamp_(min=1e-12))
    return torch.add(base, merged, alpha=p["lambda"]).to(group.out_dtype).view(group.base.shape)


def _register(name, merge, parameters, summary, reference):
    return register(Method(name=name, merge=merge, parameters=parameters, base=BASE_REQUIRED, min_non_base=1,
                           summary=summary, reference=reference))


_register("magmax", merge_magmax, (Parameter("lambda", float, SHARED, default=0.5, doc="λ, scales the selection"),),
          "per entry the task vector of largest magnitude", "https://arxiv.org/abs/2407.06322")
_register("consensus", merge_consensus,
          (Parameter("k", int, SHARED, default=2, low=0, doc="keep entries in at least k TALL masks"),
           Parameter("tall_lambda", float, SHARED, default=0.6, low=0.0,
                     doc="λ_tall of the TALL masks |τ_t| > λ_tall |Σ τ − τ_t|"),
           LAMBDA),
          "summed task vectors where at least k TALL masks agree", "https://arxiv.org/abs/2405.07813")
_register("pcb", merge_pcb,
          (Parameter("ratio", float, SHARED, default=0.1, low=0.0, high=1.0, low_open=True,
                     doc="fraction of entries kept per task"),
           LAMBDA),
          "intra- and inter-task balanced scores, top ratio per task, weighted average",
          "https://arxiv.org/abs/2410.02396")
