"""Learned alignment: permutations optimised by gradient descent on a published objective.

* :func:`sinkhorn_rebasin` (Peña et al. 2023): each permutation is relaxed to a doubly stochastic
  matrix :math:`P_\\ell = n\\,\\mathrm{Sinkhorn}(-X_\\ell / \\tau)` of learnable logits :math:`X_\\ell`
  (``ops.sinkhorn``, differentiated implicitly), B is relabelled softly, :math:`\\pi_P(\\theta_B)`
  (every axis a permutation acts on contracted with its matrix), and one of the paper's objectives is
  minimised with Adam:

  .. math::
      \\mathcal L_{\\text{dist}} = \\lVert \\theta_A - \\pi_P(\\theta_B) \\rVert^2, \\quad
      \\mathcal L_{\\text{mid}} = \\mathcal L\\big(\\tfrac12(\\theta_A + \\pi_P(\\theta_B))\\big), \\quad
      \\mathcal L_{\\text{rnd}} = \\mathbb E_{t \\sim U(0,1)}\\,
          \\mathcal L\\big((1-t)\\theta_A + t\\,\\pi_P(\\theta_B)\\big)

  The hard permutations are the linear assignments maximising :math:`\\langle P_\\ell, \\cdot \\rangle`.
* :func:`ste_rebasin` (Ainsworth et al. 2023, §3.3): a free copy :math:`\\tilde\\theta_B` (initialised to
  :math:`\\theta_A`) is projected onto B's orbit by weight matching, :math:`\\pi = \\mathrm{WM}(\\tilde\\theta_B,
  \\theta_B)`; the loss of the midpoint :math:`\\tfrac12(\\theta_A + \\pi(\\theta_B))` is computed with the
  straight-through estimator :math:`\\tilde\\theta_B + \\mathrm{sg}(\\pi(\\theta_B) - \\tilde\\theta_B)` and its
  gradient updates :math:`\\tilde\\theta_B`.

Both return the permutations of B whose midpoint had the lowest loss on the batches among those
visited (the first is the initial weight matching for the STE), so they never do worse than where they
started on their own objective.

References: Peña, Medeiros, Dubail, Aminbeidokhti, Granger & Pedersoli, "Re-basin via implicit Sinkhorn
differentiation", CVPR 2023; Ainsworth, Hayase & Srinivasa, "Git Re-Basin: Merging Models modulo
Permutation Symmetries", ICLR 2023.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from ..errors import ConfigError
from .. import ops
from ._transport import apply_matrices, one_hot
from .spec import PermutationSpec, apply_permutation, check_perms, check_state_dict
from .weight_matching import matched_params, weight_matching

OBJECTIVES = ("distance", "midpoint", "random")


def _batches(batches, where: str) -> list:
    out = list(batches) if batches is not None else []
    if not out or not all(isinstance(b, (tuple, list)) and len(b) == 2 for b in out):
        raise ConfigError(f"{where}: batches must be a non-empty list of (inputs, targets) pairs")
    return out


class _Objective:
    """Loss of a parameter set on the batches (``loss_fn(model(x), y)``, mean over batches)."""

    def __init__(self, model: nn.Module, batches, loss_fn):
        self.model, self.batches, self.loss_fn = model, batches, loss_fn
        self.buffers = dict(model.named_buffers())

    def __call__(self, params: Mapping[str, torch.Tensor], batch=None) -> torch.Tensor:
        batches = self.batches if batch is None else [batch]
        total = 0.0
        for x, y in batches:
            total = total + self.loss_fn(functional_call(self.model, {**self.buffers, **params}, (x,)), y)
        return total / len(batches)


def _mix(params_a, params_b, t: float) -> dict[str, torch.Tensor]:
    return {k: (1 - t) * a + t * params_b[k] if a.is_floating_point() else a for k, a in params_a.items()}


def _check(spec, model, params_a, params_b, where):
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{where}: model must be an nn.Module of the architecture (its forward is used)")
    check_state_dict(spec, params_a, where, "params_a")
    check_state_dict(spec, params_b, where, "params_b")


def sinkhorn_rebasin(spec: PermutationSpec, model: nn.Module, params_a: Mapping[str, torch.Tensor],
                     params_b: Mapping[str, torch.Tensor], batches: Iterable | None = None, *,
                     objective: str = "midpoint", steps: int = 100, lr: float = 0.1, tau: float = 1.0,
                     init_perms: Mapping[str, torch.Tensor] | None = None, init_scale: float = 1.0,
                     loss_fn: Callable = F.cross_entropy, seed: int = 0,
                     backend: str | None = None) -> dict[str, torch.Tensor]:
    """Permutations of B learned through Sinkhorn relaxations (Sinkhorn re-basin).

    Parameters
    ----------
    spec : the networks' :class:`PermutationSpec` (any: windows and per-head copies included)
    model : an ``nn.Module`` of the architecture (only its forward is used; it is not modified)
    params_a, params_b : the two state dicts (not modified)
    batches : ``(inputs, targets)`` pairs; needed by the ``midpoint`` and ``random`` objectives and used to
        pick the best hard permutations visited (the distance objective picks by distance)
    objective : ``"distance"`` (L_dist), ``"midpoint"`` (L_mid) or ``"random"`` (L_rnd, one t per step)
    steps, lr : Adam steps on the logits and their learning rate
    tau : Sinkhorn temperature (the entropic regularisation of ``ops.sinkhorn`` on the logits)
    init_perms : permutations to start from (logits ``init_scale`` on them, 0 elsewhere); default: all
        logits 0 (the uniform doubly stochastic matrix, as in the paper)
    loss_fn : ``loss_fn(outputs, targets)``
    seed : seeds the t of the ``random`` objective and the cyclic order of the batches

    Returns
    -------
    dict permutation name → int64 tensor, for :func:`apply_permutation` on B.
    """
    where = "sinkhorn_rebasin"
    _check(spec, model, params_a, params_b, where)
    if objective not in OBJECTIVES:
        raise ConfigError(f"{where}: objective={objective!r}; choose one of {OBJECTIVES}")
    if not tau > 0 or not lr > 0 or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"{where}: need tau > 0, lr > 0 and steps >= 1 (got {tau}, {lr}, {steps})")
    batches = _batches(batches, where) if objective != "distance" or batches is not None else []
    init = check_perms(spec, init_perms, where) if init_perms is not None else spec.identity()
    scale = init_scale if init_perms is not None else 0.0
    a = {k: v.detach().double() for k, v in params_a.items()}
    b = {k: v.detach().double() for k, v in params_b.items()}
    logits = {p: (scale * one_hot(init[p])).requires_grad_() for p in spec.perm_sizes}
    opt = torch.optim.Adam(list(logits.values()), lr=lr)
    loss = _Objective(model, batches, loss_fn) if batches else None
    used = matched_params(spec)
    g = torch.Generator().manual_seed(seed)

    def soft():
        cost = {p: -x if x.dim() == 3 else -x[None] for p, x in logits.items()}
        mats = {p: c.shape[-1] * ops.sinkhorn(c, reg=tau, tol=1e-6, max_iter=2000, backend=backend).plan
                for p, c in cost.items()}
        return {p: m if spec.copies.get(p, 1) > 1 else m[0] for p, m in mats.items()}

    def hard_score(perms) -> float:
        b_perm = apply_permutation(spec, b, perms)
        with torch.no_grad():
            if objective == "distance" or loss is None:
                return float(sum(((a[k] - b_perm[k]) ** 2).sum() for k in used))
            return float(loss(_as(params_a, _mix(a, b_perm, 0.5))))

    best, best_score = init, hard_score(init)
    for step in range(steps):
        mats = soft()
        b_soft = apply_matrices(spec, b, mats)
        if objective == "distance":
            value = sum(((a[k] - b_soft[k]) ** 2).sum() for k in used)
        else:
            t = 0.5 if objective == "midpoint" else float(torch.rand((), generator=g))
            value = loss(_as(params_a, _mix(a, b_soft, t)), batches[step % len(batches)])
        opt.zero_grad()
        value.backward()
        opt.step()
        with torch.no_grad():
            perms = {p: ops.linear_assignment(m.detach(), maximize=True, backend=None)[1].reshape(init[p].shape)
                     for p, m in mats.items()}
        score = hard_score(perms)
        if score < best_score:
            best, best_score = perms, score
    return {p: t.clone() for p, t in best.items()}


def ste_rebasin(spec: PermutationSpec, model: nn.Module, params_a: Mapping[str, torch.Tensor],
                params_b: Mapping[str, torch.Tensor], batches: Iterable, *, steps: int = 100, lr: float = 1e-3,
                loss_fn: Callable = F.cross_entropy, backend: str | None = None) -> dict[str, torch.Tensor]:
    """Permutations of B learned with the straight-through estimator of Git Re-Basin (§3.3).

    Each step: ``π = weight_matching(spec, θ̃_B, θ_B)``; the midpoint ``½(θ_A + θ̃_B + sg(π(θ_B) − θ̃_B))``
    is evaluated on the next batch, and Adam (``lr``) updates θ̃_B (started at θ_A) with the gradient.
    Parameters as in :func:`sinkhorn_rebasin`; ``batches`` are ``(inputs, targets)`` pairs, cycled.

    Returns
    -------
    dict permutation name → int64 tensor: the visited π whose midpoint has the lowest loss over all batches.
    """
    where = "ste_rebasin"
    _check(spec, model, params_a, params_b, where)
    if not lr > 0 or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"{where}: need lr > 0 and steps >= 1 (got {lr}, {steps})")
    batches = _batches(batches, where)
    loss = _Objective(model, batches, loss_fn)
    a = {k: v.detach().float() if v.is_floating_point() else v for k, v in params_a.items()}
    b = {k: v.detach().float() if v.is_floating_point() else v for k, v in params_b.items()}
    free = {k: v.clone().requires_grad_() for k, v in a.items() if v.is_floating_point()}
    opt = torch.optim.Adam(list(free.values()), lr=lr)
    best, best_score, perms = None, float("inf"), None
    for step in range(steps + 1):
        current = {**a, **{k: v.detach() for k, v in free.items()}}
        perms = weight_matching(spec, current, b, init_perms=perms, backend=backend)
        projected = apply_permutation(spec, b, perms)
        with torch.no_grad():
            score = float(loss(_as(params_a, _mix(a, projected, 0.5))))
        if score < best_score:
            best, best_score = perms, score
        if step == steps:
            break
        straight = {k: free[k] + (projected[k] - free[k]).detach() if k in free else v for k, v in projected.items()}
        value = loss(_as(params_a, _mix(a, straight, 0.5)), batches[step % len(batches)])
        opt.zero_grad()
        value.backward()
        opt.step()
    return best


def _as(reference: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``params`` in the reference's dtypes (the model's forward expects them)."""
    return {k: v.to(reference[k].dtype) if v.is_floating_point() else v for k, v in params.items()}
