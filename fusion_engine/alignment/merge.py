"""One call from two models to their aligned merge: :func:`align_and_merge`, and BatchNorm re-estimation."""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from ..errors import ConfigError
from .activation_matching import _run, activation_matching
from .builders import infer_permutation_spec
from .ot_fusion import ot_fusion
from .repair import repair as repair_statistics
from .spec import PermutationSpec, apply_permutation
from .weight_matching import weight_matching
from .zipit import zipit

METHODS = ("weight_matching", "activation_matching", "ot_fusion", "zipit", "none")


def interpolate(state_a: dict, state_b: dict, alpha: float) -> dict:
    """``(1 - α)·A + α·B`` for floating tensors; other tensors (counters) are taken from A."""
    return interpolate_many([state_a, state_b], [1 - alpha, alpha])


def interpolate_many(states, weights=None) -> dict:
    """``Σ_k w_k·state_k`` (default: the mean) for floating tensors; other tensors from the first state."""
    states = list(states)
    w = [1.0 / len(states)] * len(states) if weights is None else [float(x) for x in weights]
    out = {}
    for k, ref in states[0].items():
        if ref.is_floating_point():
            out[k] = sum(wi * s[k].double() for wi, s in zip(w, states)).to(ref.dtype)
        else:
            out[k] = ref.clone()
    return out


@torch.no_grad()
def reset_batchnorm(model: nn.Module, batches: Iterable) -> nn.Module:
    """Re-estimate every BatchNorm's running mean/variance on ``batches`` (in place; returns ``model``).

    Interpolated or merged networks have shifted activation statistics; recomputing them (as in
    REPAIR / Git Re-Basin's "reset BN") removes most of the remaining barrier for BN networks.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    saved = [(m.momentum, m.training) for m in norms]
    flag = model.training
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
        m.train()
    for batch in batches:
        _run(model, batch)
    for m, (momentum, _) in zip(norms, saved):
        m.momentum = momentum
    model.train(flag)
    return model


def align_and_merge(model_a: nn.Module, model_b: nn.Module, method: str = "weight_matching", alpha: float = 0.5, *,
                    spec: PermutationSpec | None = None, batches: Iterable | None = None, seed: int = 0,
                    reset_bn: bool = True, repair: bool = False, **kwargs) -> nn.Module:
    """Align ``model_b`` to ``model_a`` and interpolate: a new model ``(1 - α)·A + α·π(B)``.

    Parameters
    ----------
    model_a, model_b : two models of one architecture (not modified)
    method : ``"weight_matching"`` (Git Re-Basin; needs no data), ``"activation_matching"``,
        ``"ot_fusion"`` (exact OT by default; entropic with ``exact=False, reg=…``), ``"zipit"``
        (ignores ``alpha``: both models contribute equally), or ``"none"`` (naive interpolation)
    alpha : interpolation weight of B, in [0, 1]
    spec : the :class:`PermutationSpec` (default: inferred from ``model_a``)
    batches : model inputs; needed by activation matching, activation-based OT and ZipIt, and
        used to re-estimate BatchNorm statistics of the result when ``reset_bn``
    seed : weight matching's sweep-order seed
    repair : apply :func:`repair` (REPAIR) on ``batches`` to the interpolation of A and π(B) (permutation
        methods and ``"none"``; it replaces ``reset_bn``)
    kwargs : forwarded to the method (e.g. ``max_iter``, ``mode``, ``reg``, ``stop_at``)

    Example
    -------
    >>> merged = align_and_merge(model_a, model_b, method="weight_matching")
    """
    if method not in METHODS:
        raise ConfigError(f"align_and_merge: method={method!r}; choose one of {METHODS}")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"align_and_merge: alpha={alpha} must be in [0, 1]")
    batches = list(batches) if batches is not None else None
    if repair and (batches is None or method in ("ot_fusion", "zipit")):
        raise ConfigError(f"align_and_merge: repair=True needs batches= and a permutation method "
                          f"(weight_matching, activation_matching, none), got method={method!r}")
    if method in ("activation_matching", "zipit") and batches is None:
        raise ConfigError(f"align_and_merge: method={method!r} needs batches= (model inputs)")
    spec = infer_permutation_spec(model_a) if spec is None else spec
    if method == "zipit":
        merged = zipit(model_a, model_b, batches, spec=spec, **kwargs)
    else:
        sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
        if method == "ot_fusion":
            kwargs.setdefault("exact", True)
            state = ot_fusion([model_a, model_b], spec=spec, weights=[1 - alpha, alpha], batches=batches, **kwargs)
        else:
            if method == "weight_matching":
                perms = weight_matching(spec, sd_a, sd_b, seed=seed, **kwargs)
            elif method == "activation_matching":
                perms = activation_matching(spec, model_a, model_b, batches, **kwargs)
            else:
                perms = spec.identity()
            aligned_b = apply_permutation(spec, sd_b, perms)
            state = interpolate(sd_a, aligned_b, alpha)
        merged = copy.deepcopy(model_a)
        merged.load_state_dict(state)
        if repair:
            endpoint_b = copy.deepcopy(model_b)
            endpoint_b.load_state_dict(aligned_b)
            return repair_statistics(merged, [model_a, endpoint_b], batches, weights=[1 - alpha, alpha])
    if reset_bn and batches is not None:
        reset_batchnorm(merged, batches)
    return merged
