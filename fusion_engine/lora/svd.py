"""Truncated SVD of stacks of matrices, and its split into LoRA factors.

For a matrix ``Δ`` (``m × n``) the best rank-``k`` approximation in the Frobenius norm is
``U_k S_k V_kᵀ`` (Eckart–Young); as LoRA factors (mergekit's ``distribute_scale``)

.. math::  B = U_k \\sqrt{S_k}, \\qquad A = \\sqrt{S_k} V_k^\\top, \\qquad B A = U_k S_k V_k^\\top.

Small matrices (``min(m, n) ≤ max(2·(k + oversample), 1024)``) get the exact ``torch.linalg.svd``; larger ones
the randomized range finder of Halko, Martinsson & Tropp (2011), ``torch.svd_lowrank`` with
``k + oversample`` columns and ``niter`` power iterations. Both take a batch ``(b, m, n)``: matrices
of one shape are decomposed together.
"""

from __future__ import annotations

import torch

OVERSAMPLE = 10
POWER_ITERATIONS = 4
EXACT_MAX_DIM = 1024  # exact SVD up to this smaller side: cheap, and randomized SVD is poor on flat spectra


def truncated_svd(deltas: torch.Tensor, max_rank: int, *, oversample: int | None = None,
                  niter: int = POWER_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, Vh)`` of a ``(b, m, n)`` float stack, at most ``q = min(max_rank + oversample, m, n)``
    components each, singular values descending. Exact when ``min(m, n) ≤ max(2q, EXACT_MAX_DIM)``;
    the default oversampling is ``max(10, max_rank / 2)``."""
    b, m, n = deltas.shape
    oversample = max(OVERSAMPLE, max_rank // 2) if oversample is None else oversample
    q = min(max_rank + oversample, m, n)
    if min(m, n) <= max(2 * q, EXACT_MAX_DIM):
        u, s, vh = torch.linalg.svd(deltas, full_matrices=False)
        return u[..., :q], s[..., :q], vh[..., :q, :]
    u, s, v = torch.svd_lowrank(deltas, q=q, niter=niter)
    return u, s, v.transpose(-1, -2)


def kept_rank(s: torch.Tensor, max_rank: int, sv_epsilon: float = 0.0) -> int:
    """How many singular values to keep: at most ``max_rank``, only those ``> sv_epsilon`` (never zeros)."""
    return min(max_rank, int((s > sv_epsilon).sum()))


def lora_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int,
                 distribute_scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B·A = U_k S_k V_kᵀ``: √S in both (default) or S in ``A`` (``distribute_scale=False``)."""
    s = s[:rank]
    if distribute_scale:
        root = s.sqrt()
        return root[:, None] * vh[:rank], u[:, :rank] * root
    return s[:, None] * vh[:rank], u[:, :rank].clone()
