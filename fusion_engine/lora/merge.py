"""Merging LoRA adapters into one LoRA adapter, on the products ``Δ_k = s_k B_k A_k`` (no cross-terms).

Merging ``A`` and ``B`` separately (PEFT's ``linear``, ``ties``, ``dare_*``, ``magnitude_prune``) gives
``(Σ w_k B_k)(Σ w_k A_k)``, whose cross-terms ``B_j A_k`` belong to no adapter. Here every method is
defined on the products; the result is re-factorised into LoRA factors:

=================  ==================================================================================
``cat``            ``A = [w_1 A_1; …; w_K A_K]``, ``B = [B_1 … B_K]``: exactly ``Σ w_k Δ_k``, rank ``Σ r_k``
``linear``         ``Σ w_k Δ_k`` (task arithmetic), factorised by a thin SVD computed from the factors
                   (QR of ``[B_k]`` and ``[w_k A_kᵀ]``, SVD of the ``Σr × Σr`` core): exact at the default
                   rank, the best rank-``rank`` approximation below it
``ties``,          PEFT's ``merge_utils`` definitions (:mod:`fusion_engine.compat.peft_merge_utils`) applied to the dense
``dare_linear``,   products ``Δ_k``, then the best rank-``rank`` approximation (default: the largest input
``dare_ties``,     rank, PEFT's choice for its ``*_svd`` types)
``magnitude_prune``
``knots_<m>``      KnOTS (Stoica et al., 2025, "Model merging with SVD to tie the KnOTS"): the thin SVD
                   ``[Δ_1 … Δ_K] = U S [V_1ᵀ … V_Kᵀ]`` gives every adapter coordinates ``V_kᵀ`` in one
                   shared basis ``U S``; ``m`` ∈ {linear, ties, dare_linear, dare_ties, magnitude_prune}
                   merges the ``V_kᵀ``, and ``Δ = U S V_mergedᵀ``
=================  ==================================================================================

Factors are ``A`` (``r × n``) and ``B`` (``m × r``) with the adapter's scaling folded into ``A``; convolution
factors are flattened to matrices by the caller. All arithmetic is float32 (fp16/bf16 adapters too), and
the split of the singular values is ``√S`` into both factors.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

DENSE_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
METHODS = ("cat", "linear", *DENSE_METHODS, *(f"knots_{m}" for m in ("linear", *DENSE_METHODS)))
_NEEDS_DENSITY = DENSE_METHODS
RANK_TOLERANCE = 1e-6  # singular values below this fraction of the largest are numerically zero


def _combine(method: str, tensors: list[torch.Tensor], weights: list[float], density, majority_sign_method):
    """PEFT's merge of equally shaped tensors (``fusion_engine.compat.peft_merge_utils`` on the fused ops)."""
    from ..compat import peft_merge_utils as rules

    w = torch.tensor(weights, dtype=torch.float32)
    if method == "linear":
        return rules.task_arithmetic(tensors, w)
    if method in ("ties", "dare_ties"):
        return getattr(rules, method)(tensors, w, density, majority_sign_method)
    return getattr(rules, method)(tensors, w, density)


def svd_of_product(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``(U, S, Vh)`` of ``B·A`` (``m × r`` times ``r × n``) in ``O((m + n) r²)``: QR of both factors,
    SVD of the ``r × r`` core."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return qb @ u, s, vh @ qa.T


def _numerical_rank(s: torch.Tensor) -> int:
    """Singular values above ``RANK_TOLERANCE`` of the largest; at least 1 (a zero delta: rank-1 zero factors)."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 1
    return int((s > s[0] * RANK_TOLERANCE).sum())


def _split(u, s, vh, rank: int, clamp: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of rank ``rank``: ``√S`` in both, or PEFT's ``B = U S``, ``A = Vh`` clamped at the ``clamp``
    quantile when ``clamp`` is given (its ``svd_clamp``)."""
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    if clamp is None:
        root = s.sqrt()
        return root[:, None] * vh, u * root
    b, a = u * s, vh
    high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
    return a.clamp(-high, high), b.clamp(-high, high)


def merge_factors(factors: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float], method: str = "linear",
                  *, rank: int | None = None, density: float | None = None,
                  majority_sign_method: str = "total", clamp: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge one module's LoRA factors into ``(A, B)`` (see the module docstring for each ``method``).

    Parameters
    ----------
    factors : ``[(A_k, B_k)]`` with ``Δ_k = B_k A_k`` (scaling folded in), ``A_k`` ``r_k × n``, ``B_k`` ``m × r_k``.
    weights : one weight per adapter (negative weights subtract).
    rank : the output rank (``cat`` ignores it); default: exact for ``cat``/``linear``/``knots_*``, the
        largest ``r_k`` for the dense methods.
    density, majority_sign_method : for ``ties``/``dare_*``/``magnitude_prune`` (PEFT's meaning).
    clamp : PEFT's ``svd_clamp`` quantile (factors split as ``B = U S``, ``A = Vh``, then clamped).

    Returns ``(A, B)`` in float32, ``B·A ≈ Σ`` merged ``Δ``.
    """
    if method not in METHODS:
        raise ConfigError(f"adapter merge method {method!r} is unknown; use one of {', '.join(METHODS)}")
    if len(factors) != len(weights) or not factors:
        raise ConfigError(f"{len(factors)} adapters but {len(weights)} weights: give one weight per adapter")
    if rank is not None and rank < 1:
        raise ConfigError(f"rank must be >= 1, got {rank}")
    base_method = method.removeprefix("knots_")
    if base_method in _NEEDS_DENSITY and (density is None or not 0.0 <= density <= 1.0):
        raise ConfigError(f"adapter merge method {method!r} needs a density in [0, 1], got {density!r}")
    a_s = [a.float() for a, _ in factors]
    b_s = [b.float() for _, b in factors]
    if method == "cat":
        return torch.cat([w * a for w, a in zip(weights, a_s)]), torch.cat(b_s, dim=1)
    if method == "linear":
        u, s, vh = svd_of_product(torch.cat(b_s, dim=1), torch.cat([w * a for w, a in zip(weights, a_s)]))
        return _split(u, s, vh, min(rank or _numerical_rank(s), s.numel()), clamp)
    if method in DENSE_METHODS:
        delta = _combine(method, [b @ a for a, b in zip(a_s, b_s)], weights, density, majority_sign_method).float()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return _split(u, s, vh, min(rank or max(a.shape[0] for a in a_s), s.numel()), clamp)
    # KnOTS: shared basis U S of [Δ_1 … Δ_K] from [B_k] and blockdiag(A_k), coordinates V_kᵀ per adapter
    q, rb = torch.linalg.qr(torch.cat(b_s, dim=1))
    core, col = [], 0
    for a in a_s:
        core.append(rb[:, col:col + a.shape[0]] @ a)
        col += a.shape[0]
    uc, s, vh = torch.linalg.svd(torch.cat(core, dim=1), full_matrices=False)
    keep = _numerical_rank(s)
    u, s, n = q @ uc[:, :keep], s[:keep], a_s[0].shape[1]
    coords = [vh[:keep, k * n:(k + 1) * n] for k in range(len(a_s))]
    merged = _combine(base_method, coords, weights, density, majority_sign_method).float()
    u2, s2, vh2 = svd_of_product(u * s, merged)  # re-orthogonalise (the merged coordinates are not)
    return _split(u2, s2, vh2, min(rank or _numerical_rank(s2), s2.numel()), clamp)
