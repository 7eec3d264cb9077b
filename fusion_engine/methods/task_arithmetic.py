"""The task-vector family, mergekit's "generalized task arithmetic": sparsify each task vector,
optionally elect a sign, and add the weighted combination to the base.

With δ_i = x_i − b (in the working dtype), v_i = sparsify(δ_i) (optionally L1-rescaled:
v_i ← v_i · ‖δ_i‖₁ / ‖v_i‖₁), and e_i = w_i v_i:

* no consensus:  y = b + λ Σ_i e_i / D,  D = Σ_i w_i if ``normalize`` (|D| < 1e-8 → 1) else 1;
* consensus "sum":  s = sign(Σ_i e_i) (+1 for 0), a_i = [sign(e_i) = s],
  y = b + λ Σ_i a_i e_i / D,  D = Σ_i a_i w_i if ``normalize`` (0 → 1) else 1.

=================  ============  ====================  =========  =======  ===================
method             sparsify      consensus             normalize  rescale  runs on
=================  ============  ====================  =========  =======  ===================
task_arithmetic    none          none                  false      false    task_arithmetic op
ties               magnitude     sum                   true       false    ties_merge op
dare_linear        random        none                  false      true     dare_merge op
dare_ties          random        sum                   false      true     dare_merge op
breadcrumbs        outliers      none                  false      false    magnitude_mask + linear_merge
breadcrumbs_ties   outliers      sum                   false      false    magnitude_mask + ties_merge
della_linear       rank-random   none                  false      true     philox mask + linear_merge
della              rank-random   sum                   true       true     philox mask + ties_merge
=================  ============  ====================  =========  =======  ===================

* magnitude (TIES): keep the k = max(1, int(ρ n)) largest |δ| for 0 < ρ < 1 (mergekit 0.1.5).
* outliers (breadcrumbs): drop the int(γ n) largest and then the smallest, keeping int(ρ n):
  the entries of ascending-|δ| rank n_bot … n_bot + int(ρ n) − 1, n_bot = max(0, n − int(ρ n) − int(γ n)).
* random (DARE): keep each entry with probability ρ.
* rank-random (DELLA, "MagPrune"): along dim 1 (a 1-D tensor is one row), the entry of ascending
  magnitude rank r among c gets keep probability p = ρ − ε + 2ε r / (c − 1).
* ρ ≥ 1 leaves δ_i untouched (no rescale); ρ ≤ 0 zeroes it.

Randomness: mergekit draws its masks from torch's global RNG. Here every random mask comes from
the counter-based Philox generator of :mod:`fusion_engine.ops.philox`, keyed by ``random_seed``
(default 0), the stream ``stream_id(name)`` of the output tensor's name (0 without a name) and the
input's position among the non-base inputs: reproducible per tensor, independent of order,
chunking or backend. The statistics (keep probabilities, L1 rescale) are mergekit's.

References: Ilharco et al. 2023 (task arithmetic), Yadav et al. 2023 (TIES), Yu et al. 2024 (DARE),
Davari & Belilovsky 2024 (breadcrumbs), Deep et al. 2024 (DELLA).
"""

from __future__ import annotations

import math
from functools import partial

import torch

from ..errors import ConfigError
from ..ops import dare_merge, linear_merge, magnitude_mask, stream_id, task_arithmetic, ties_merge
from ..ops._common import EPS_NORM, accum_dtype, combine_reference
from ..ops.magnitude_mask import topk_magnitude_reference
from ..ops.philox import keep_mask, random_words
from . import _common as M
from .registry import NON_BASE, SHARED, BASE_REQUIRED, Group, Method, Parameter, register

SEED_LIMIT = float(1 << 64)


def _parameters(normalize: bool, rescale: bool, extra: tuple[Parameter, ...] = (), randomized: bool = False):
    common = (
        Parameter("int8_mask", bool, SHARED, default=False, doc="accepted for mergekit; no numerical effect"),
        Parameter("normalize", bool, SHARED, default=normalize, doc="divide by the (agreeing) weights' sum"),
        Parameter("rescale", bool, SHARED, default=rescale, doc="L1-rescale each sparsified task vector"),
        Parameter("lambda", float, SHARED, default=1.0, doc="λ, scales the merged task vector"),
        Parameter("weight", float, NON_BASE, doc="w_i, one per non-base input"),
        Parameter("density", float, NON_BASE, default=1.0, low=0.0, high=1.0, doc="ρ_i, fraction kept"),
    )
    seed = (Parameter("random_seed", int, SHARED, default=0, low=0, high=SEED_LIMIT, high_open=True, optional=True,
                      doc="seed of the Philox masks (with the tensor name's stream); null: torch's global "
                          "generator, drawn as mergekit draws it"),) if randomized else ()
    return common + extra + seed


GAMMA = Parameter("gamma", float, NON_BASE, default=0.01, low=0.0, high=1.0, doc="γ_i, fraction of largest dropped")
EPSILON = Parameter("epsilon", float, NON_BASE, default=0.15, low=0.0, high=1.0, high_open=True,
                    doc="ε_i, keep probabilities span ρ ± ε")


def _stream(group: Group) -> int:
    return stream_id(group.name) if group.name else 0


def _no_inputs(group: Group):
    return group.base.to(group.out_dtype) if not group.non_base else None


# ---------------------------------------------------------------- fused: task arithmetic, ties, dare


def merge_task_arithmetic(group: Group, **p) -> torch.Tensor:
    """y = b + λ Σ w_i δ_i / D (task_arithmetic op; ``normalize`` pre-divides the weights)."""
    if (y := _no_inputs(group)) is not None:
        return y
    if M.exact_path(group):
        return merge_exact(None, None, group, **p)
    w = p["weight"]
    if p["normalize"]:
        total = sum(w)
        w = [wi / total for wi in w] if abs(total) >= 1e-8 else w
    return task_arithmetic(group.base, group.non_base, w, lam=p["lambda"], **group.ops_kwargs)


def merge_ties(group: Group, **p) -> torch.Tensor:
    """TIES on the fused ties_merge op with mergekit's keep count max(1, int(ρ n))."""
    if (y := _no_inputs(group)) is not None:
        return y
    if M.exact_path(group):
        return merge_exact("magnitude", "sum", group, **p)
    n = group.base.numel()
    ks = [M.mergekit_topk_count(d, n) for d in p["density"]]
    return ties_merge(group.base, group.non_base, p["weight"], k=ks, sign="sum", sign_on="weighted",
                      divisor="weights", normalize=p["normalize"], lam=p["lambda"],
                      rescale="l1" if p["rescale"] else None, tie="index", **group.ops_kwargs)


def merge_dare(consensus: str | None, group: Group, **p) -> torch.Tensor:
    """DARE on the fused dare_merge op: Philox Bernoulli(ρ) masks, mergekit's L1 rescale."""
    if (y := _no_inputs(group)) is not None:
        return y
    if M.exact_path(group, force=p["random_seed"] is None):
        return merge_exact("random", consensus, group, **p)
    return dare_merge(group.base, group.non_base, p["weight"], p["density"], seed=p["random_seed"],
                      stream=_stream(group), consensus=consensus, sign_on="weighted", divisor="weights",
                      rescale="l1" if p["rescale"] else None, normalize=p["normalize"], lam=p["lambda"],
                      **group.ops_kwargs)


# ---------------------------------------------------------------- masked task vectors, then combined


def combine(group: Group, kept: list[torch.Tensor], weights: list[float], consensus: str | None,
            normalize: bool, lam: float) -> torch.Tensor:
    """y = b + λ·combine(v_i) for already sparsified task vectors v_i (in the working dtype).

    Without consensus one fused linear_merge pass over [b, v_1 … v_K]; with consensus the fused
    ties_merge op on v_i against a zero base (no trimming), then b is added.
    """
    base = group.base
    if consensus is None:
        total = sum(weights)
        den = (total if abs(total) >= 1e-8 else 1.0) if normalize else 1.0
        coeffs = [1.0] + [lam * w / den for w in weights]
        return linear_merge([base, *kept], coeffs, normalize=False, **group.ops_kwargs)
    acc = accum_dtype(base.dtype)
    mixed = ties_merge(torch.zeros_like(base), kept, weights, 1.0, sign=consensus, sign_on="weighted",
                       divisor="weights", normalize=normalize, lam=lam, tie="index", out_dtype=acc,
                       check_finite=group.check_finite, backend=group.backend)
    return mixed.view(base.shape).add_(base).to(group.out_dtype)


def _rescaled(d: torch.Tensor, keep: torch.Tensor, rescale: bool) -> torch.Tensor:
    """d ⊙ keep, times ‖d‖₁/‖d ⊙ keep‖₁ when ``rescale``, in d's dtype (the product computed in
    the accumulation dtype and rounded once, in place in the fresh masked tensor)."""
    kept = d * keep
    if rescale and (factor := M.l1_rescale(d, kept)) != 1.0:
        kept.mul_(factor)
    return kept


def breadcrumbs_keep(d: torch.Tensor, density: float, gamma: float, backend: str | None = None) -> torch.Tensor:
    """Bool mask of the entries breadcrumbs keeps: int(ρ n) entries after dropping the largest
    min(int(γ n), n − int(ρ n)) by magnitude (two exact magnitude_mask selections)."""
    n = d.numel()
    target = int(density * n)
    bottom = max(0, n - target - int(gamma * n))
    top_dropped = n - bottom - target
    keep = magnitude_mask(d, k=target + top_dropped, check_finite=False, backend=backend)
    if top_dropped:
        keep &= ~magnitude_mask(d, k=top_dropped, check_finite=False, backend=backend)
    return keep


def merge_breadcrumbs(consensus: str | None, group: Group, **p) -> torch.Tensor:
    """Model breadcrumbs: drop the outliers and the small entries of each task vector, then combine."""
    if (y := _no_inputs(group)) is not None:
        return y
    if M.exact_path(group):
        return merge_exact("outliers", consensus, group, **p)
    base = group.base
    kept = []
    for x, rho, gamma in zip(group.non_base, p["density"], p["gamma"]):
        d = M.task_vector(x, base)
        if rho < 1:
            d = _rescaled(d, breadcrumbs_keep(d, rho, gamma, group.backend), p["rescale"])
        kept.append(d)
    return combine(group, kept, p["weight"], consensus, p["normalize"], p["lambda"])


def della_keep_probability(d: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """MagPrune keep probabilities: ρ − ε + 2ε · rank/(c − 1), ranks of |d| ascending along dim 1
    (a 1-D tensor is one row; a one-column tensor gets ρ), in float64, shaped like ``d``."""
    rows = d.unsqueeze(0) if d.dim() < 2 else d
    columns = rows.shape[1]
    if columns < 2:
        return torch.full(d.shape, density, dtype=torch.float64, device=d.device)
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.argsort(order, dim=1, stable=True).to(torch.float64)
    prob = (density - epsilon) + (ranks / (columns - 1)).clamp(0, 1) * (2 * epsilon)
    return prob.reshape(d.shape)


def della_keep(d: torch.Tensor, density: float, epsilon: float, *, seed: int, stream: int, model: int) -> torch.Tensor:
    """Bool mask: entry j kept when its Philox word u_j < floor(p_j · 2^32), p_j of
    :func:`della_keep_probability`.

    One stable sort per row: the thresholds depend only on the rank, so they are a table of c
    values compared with the words gathered in sorted order, and the result is scattered back
    (no second sort to invert the permutation, no float64 tensor of probabilities).
    """
    rows = d.unsqueeze(0) if d.dim() < 2 else d
    words = random_words(d.numel(), seed=seed, stream=stream, model=model, device=d.device).reshape(rows.shape)
    columns = rows.shape[1]
    if columns < 2:
        return (words < math.floor(density * 4294967296.0)).reshape(d.shape)
    magnitudes = rows.abs()
    if magnitudes.dtype in (torch.float16, torch.bfloat16):
        magnitudes = magnitudes.float()  # exact; float32 sorts faster
    order = torch.argsort(magnitudes, dim=1, stable=True)
    ranks = torch.arange(columns, dtype=torch.float64, device=d.device)
    prob = (density - epsilon) + (ranks / (columns - 1)).clamp(0, 1) * (2 * epsilon)
    table = torch.floor(prob * 4294967296.0).to(torch.int64).view([1, columns] + [1] * (rows.dim() - 2))
    keep_sorted = words.gather(1, order) < table
    return torch.empty(rows.shape, dtype=torch.bool, device=d.device).scatter_(1, order, keep_sorted).reshape(d.shape)


def check_della(method: str, p: dict) -> None:
    for i, (rho, eps) in enumerate(zip(p["density"], p["epsilon"])):
        if 0 < rho < 1 and not (0 < rho - eps and rho + eps < 1):
            raise ConfigError(f"{method}: density ± epsilon must lie in (0, 1) for every input with 0 < density < 1; "
                              f"input {i} has density {rho} and epsilon {eps}: lower epsilon below "
                              f"{min(rho, 1 - rho):g}")


def merge_della(consensus: str | None, group: Group, **p) -> torch.Tensor:
    """DELLA: rank-dependent random drop (MagPrune), L1 rescale, then combine."""
    if (y := _no_inputs(group)) is not None:
        return y
    if M.exact_path(group, force=p["random_seed"] is None):
        return merge_exact("della", consensus, group, **p)
    base = group.base
    stream = _stream(group)
    kept = []
    for i, (x, rho, eps) in enumerate(zip(group.non_base, p["density"], p["epsilon"])):
        d = M.task_vector(x, base)
        if rho <= 0:
            d = torch.zeros_like(d)
        elif rho < 1:
            keep = della_keep(d, rho, eps, seed=p["random_seed"], stream=stream, model=i)
            d = _rescaled(d, keep, p["rescale"])
        kept.append(d)
    return combine(group, kept, p["weight"], consensus, p["normalize"], p["lambda"])


# ---------------------------------------------------------------- the exact (differentiable) path


def sparsified(kind: str | None, d: torch.Tensor, density: float, *, rescale: bool, gamma: float = 0.0,
               epsilon: float = 0.0, seed: int | None = 0, stream: int = 0, model: int = 0,
               backend: str | None = None) -> torch.Tensor:
    """mergekit's ``sparsify`` of one task vector d, differentiable in d: v = d ⊙ m, times
    ‖d‖₁/‖d ⊙ m‖₁ when ``rescale`` (unless either is below 1e-7), the mask m held constant.

    ``kind``: None (no mask), "magnitude" (TIES), "outliers" (breadcrumbs), "random" (DARE),
    "della" (MagPrune). The random masks come from Philox keyed by ``seed`` (as on the fused path)
    or, with ``seed=None``, from torch's global generator, drawn exactly as mergekit draws them
    (``torch.bernoulli`` of the keep probabilities, in float32 on CPU except for bfloat16, where
    mergekit also computes the masked vector): the same masks as mergekit under one torch seed.
    """
    if kind is None or density >= 1:
        return d
    if density <= 0 and kind != "random":
        return d * 0
    flat_d = d.detach().reshape(-1)
    work = d.dtype
    if kind == "magnitude":
        keep = topk_magnitude_reference(flat_d, M.mergekit_topk_count(density, d.numel()), "index")
    elif kind == "outliers":
        keep = breadcrumbs_keep(flat_d, density, gamma, backend)
    elif seed is not None:
        keep = (keep_mask(d.numel(), density, seed=seed, stream=stream, model=model, device=d.device)
                if kind == "random" else della_keep(d.detach(), density, epsilon, seed=seed, stream=stream, model=model))
    else:
        work = d.dtype if d.device.type != "cpu" or d.dtype == torch.bfloat16 else torch.float32
        probability = (torch.full_like(d, density, dtype=work) if kind == "random"
                       else della_keep_probability(d.detach(), density, epsilon).to(work))
        keep = torch.bernoulli(probability)
    x = d.to(work)
    kept = x * keep.reshape(d.shape).to(work)
    if rescale:
        before, after = x.abs().sum(), kept.abs().sum()
        if float(before.detach()) >= EPS_NORM and float(after.detach()) >= EPS_NORM:
            kept = kept * (before / after)
    return kept.to(d.dtype)


def merge_exact(kind: str | None, consensus: str | None, group: Group, **p) -> torch.Tensor:
    """The task-vector family in plain torch, differentiable as mergekit's is: v_i = sparsified(δ_i),
    then the weighted, sign-elected combination of :func:`ops._common.combine_reference`."""
    base = group.base
    stream = _stream(group)
    kept = []
    for i, x in enumerate(group.non_base):
        d = sparsified(kind, M.task_vector(x, base), p["density"][i], rescale=p["rescale"],
                       gamma=p["gamma"][i] if "gamma" in p else 0.0, epsilon=p["epsilon"][i] if "epsilon" in p else 0.0,
                       seed=p.get("random_seed", 0), stream=stream, model=i, backend=group.backend)
        kept.append(d.reshape(-1))
    y = combine_reference(base.reshape(-1), kept, p["weight"], consensus=consensus, sign_on="weighted",
                          divisor="weights", normalize=p["normalize"], lam=p["lambda"], out_dtype=group.out_dtype)
    return y.view(base.shape)


def _gta(name, merge, *, normalize, rescale, extra=(), randomized=False, check=None, summary="", ref=""):
    return register(Method(name=name, merge=merge, parameters=_parameters(normalize, rescale, extra, randomized),
                           base=BASE_REQUIRED, randomized=randomized, check=check,
                           summary=summary, reference=ref, differentiable=True))


_gta("task_arithmetic", merge_task_arithmetic, normalize=False, rescale=False,
     summary="base plus the weighted sum of task vectors", ref="https://arxiv.org/abs/2212.04089")
_gta("ties", merge_ties, normalize=True, rescale=False,
     summary="trim by magnitude, elect sign, disjoint merge", ref="https://arxiv.org/abs/2306.01708")
_gta("dare_ties", partial(merge_dare, "sum"), normalize=False, rescale=True, randomized=True,
     summary="random drop with L1 rescale, elect sign",
     ref="https://arxiv.org/abs/2311.03099")
_gta("dare_linear", partial(merge_dare, None), normalize=False, rescale=True, randomized=True,
     summary="random drop with L1 rescale, weighted sum",
     ref="https://arxiv.org/abs/2311.03099")
_gta("breadcrumbs", partial(merge_breadcrumbs, None), normalize=False, rescale=False, extra=(GAMMA,),
     summary="drop outliers and small entries, weighted sum",
     ref="https://arxiv.org/abs/2312.06795")
_gta("breadcrumbs_ties", partial(merge_breadcrumbs, "sum"), normalize=False, rescale=False, extra=(GAMMA,),
     summary="drop outliers and small entries, elect sign",
     ref="https://arxiv.org/abs/2312.06795")
_gta("della", partial(merge_della, "sum"), normalize=True, rescale=True, extra=(EPSILON,), randomized=True,
     check=check_della, summary="magnitude-ranked random drop, elect sign",
     ref="https://arxiv.org/abs/2406.11617")
_gta("della_linear", partial(merge_della, None), normalize=False, rescale=True, extra=(EPSILON,),
     randomized=True, check=check_della,
     summary="magnitude-ranked random drop, weighted sum", ref="https://arxiv.org/abs/2406.11617")
