"""Drop-in replacement for ``peft.utils.merge_utils``, on fusion_engine's fused ops.

Every function here has the signature, defaults and semantics of its PEFT namesake (peft 0.13+):
the same arguments (``task_tensors`` a list of equally shaped tensors, ``weights`` a 1-D tensor, one
weight per task tensor), the same result dtype, the same warnings and errors. The merges run as one
fused kernel over the K inputs instead of PEFT's stack → prune → mask → sum chain:

=====================  ==========================================================================
PEFT function          fusion_engine op
=====================  ==========================================================================
task_arithmetic        ``linear_merge(normalize=False)``:  Σ_k w_k τ_k
magnitude_prune        ``magnitude_mask`` per tensor, then ``linear_merge(normalize=False)``
ties                   ``ties_merge`` (base 0, sign on unweighted τ, count divisor)
dare_linear            ``dare_merge`` (Bernoulli(density) keep, 1/density rescale)
dare_ties              ``dare_merge(consensus=..., sign_on="unweighted", divisor="count")``
=====================  ==========================================================================

Two documented differences, both only where PEFT's own result is not determined by its inputs:

* random masks (``random_pruning``, ``dare_*``) come from fusion_engine's Philox generator, seeded
  from torch's global generator (so ``torch.manual_seed`` still makes them reproducible): same keep
  probability, same rescale, a different draw than ``torch.bernoulli``;
* exact ties in magnitude at the top-k boundary keep the lowest index (``torch.topk`` leaves the
  choice to the implementation).

:func:`fusion_engine.compat.peft.patch` installs these in PEFT.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from .. import ops
from ..errors import ConfigError

_SIGN_RULE = {"total": "sum", "frequency": "count"}


def reshape_weight_task_tensors(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``weights`` viewed with trailing singleton dims so it broadcasts against stacked ``task_tensors``."""
    return weights.view(weights.shape + (1,) * (task_tensors.dim() - weights.dim()))


def _check_density(density: float) -> bool:
    """PEFT's rule: density ≥ 1 prunes nothing (with a warning), density < 0 is an error. True = prune."""
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.")
        return False
    if density < 0:
        raise ConfigError(f"Density should be >= 0, got {density}")
    return True


def _seed_from_torch() -> int:
    """A Philox seed drawn from torch's global generator: torch.manual_seed(s) reproduces the masks."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _weights_list(task_tensors, weights, what: str) -> list[float]:
    values = torch.as_tensor(weights).detach().reshape(-1).tolist()
    if len(values) != len(task_tensors):
        raise ConfigError(f"{what}: got {len(values)} weights for {len(task_tensors)} task tensors; give one per tensor")
    return [float(v) for v in values]


def _result_dtype(task_tensors, weights) -> torch.dtype:
    """PEFT multiplies the stacked tensors by a weights tensor: torch's type promotion of the two."""
    return torch.promote_types(task_tensors[0].dtype, torch.as_tensor(weights).dtype)


def _zeros(task_tensors) -> torch.Tensor:
    return torch.zeros_like(task_tensors[0])


def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density · n)`` entries of largest |value|, zero the rest."""
    return tensor * ops.magnitude_mask(tensor, density)


def random_pruning(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep each entry with probability ``density`` (Philox), divided by ``density`` when ``rescale``."""
    zero = torch.zeros_like(tensor)
    kept = ops.dare_merge(zero, [tensor], None, density, seed=_seed_from_torch(),
                          rescale="density" if rescale else None)
    return kept


def prune(tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"],
          rescale: bool = False) -> torch.Tensor:
    """Prune ``tensor`` to ``density`` by magnitude or at random (PEFT's ``prune``)."""
    if not _check_density(density):
        return tensor
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    if method == "random":
        return random_pruning(tensor, density, rescale=rescale)
    raise ConfigError(f"Unknown method {method}")


def calculate_majority_sign_mask(tensor: torch.Tensor,
                                 method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """Mask of entries whose sign agrees with the elected sign over dim 0 (ties elect +).

    ``total``: sign of Σ_k τ_k; ``frequency``: sign of Σ_k sign(τ_k).
    """
    sign = tensor.sign()
    if method == "total":
        votes = tensor.sum(dim=0)
    elif method == "frequency":
        votes = sign.sum(dim=0)
    else:
        raise ConfigError(f'Unimplemented mask method "{method}"; use "total" or "frequency"')
    return sign == torch.where(votes >= 0, 1, -1)


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """Σ_k mask_k τ_k / max(1, Σ_k mask_k) over the stacked dim 0."""
    kept = (task_tensors * majority_sign_mask).sum(dim=0)
    return kept / torch.clamp(majority_sign_mask.sum(dim=0), min=1.0)


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k τ_k."""
    w = _weights_list(task_tensors, weights, "task_arithmetic")
    return ops.linear_merge(task_tensors, w, normalize=False, out_dtype=_result_dtype(task_tensors, weights))


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """Σ_k w_k topk_density(τ_k): each task tensor trimmed to its largest-magnitude entries, then summed."""
    w = _weights_list(task_tensors, weights, "magnitude_prune")
    if _check_density(density):
        task_tensors = [magnitude_based_pruning(t, density) for t in task_tensors]
    return ops.linear_merge(task_tensors, w, normalize=False, out_dtype=_result_dtype(task_tensors, weights))


def ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
         majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """TIES: trim each τ_k to ``density``, elect the sign on the unweighted trimmed τ, then
    Σ_k w_k τ̂_k [sign agrees] / max(1, #agreeing)."""
    w = _weights_list(task_tensors, weights, "ties")
    if majority_sign_method not in _SIGN_RULE:
        raise ConfigError(f'Unimplemented mask method "{majority_sign_method}"; use "total" or "frequency"')
    density = density if _check_density(density) else 1.0
    return ops.ties_merge(_zeros(task_tensors), task_tensors, w, density, sign=_SIGN_RULE[majority_sign_method],
                          sign_on="unweighted", divisor="count", out_dtype=_result_dtype(task_tensors, weights))


def dare_linear(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: Σ_k w_k m_k τ_k / density with m_k ~ Bernoulli(density)."""
    w = _weights_list(task_tensors, weights, "dare_linear")
    density = density if _check_density(density) else 1.0
    return ops.dare_merge(_zeros(task_tensors), task_tensors, w, density, seed=_seed_from_torch(),
                          out_dtype=_result_dtype(task_tensors, weights))


def dare_ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
              majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """DARE masks and 1/density rescale, then TIES' sign election (unweighted) and count-divided disjoint merge."""
    w = _weights_list(task_tensors, weights, "dare_ties")
    if majority_sign_method not in _SIGN_RULE:
        raise ConfigError(f'Unimplemented mask method "{majority_sign_method}"; use "total" or "frequency"')
    density = density if _check_density(density) else 1.0
    return ops.dare_merge(_zeros(task_tensors), task_tensors, w, density, seed=_seed_from_torch(),
                          consensus=_SIGN_RULE[majority_sign_method], sign_on="unweighted", divisor="count",
                          normalize=True, out_dtype=_result_dtype(task_tensors, weights))
