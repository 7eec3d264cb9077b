"""Pairwise cost matrices between two sets of vectors (neurons, activations, samples).

.. math::  C_{ij} = \\mathrm{cost}(x_i, y_j), \\quad x \\in \\mathbb{R}^{n \\times d},\\
           y \\in \\mathbb{R}^{m \\times d}

GEMM-shaped: every metric is one matrix product x yᵀ plus per-row statistics (‖x_i‖², Σ_k x_ik).
The torch backend (the reference, and the CPU path: the BLAS torch ships) computes them apart; the
triton backend (triton_kernels/cost_matrix.py) accumulates them in the K loop of one fused matmul
and applies the metric in its epilogue.
"""

from __future__ import annotations

import torch

from .._dispatch import register, resolve, triton_kernels
from . import _common as C

OP = "cost_matrix"
METRICS = ("sqeuclidean", "euclidean", "inner", "cosine", "correlation")


def cost_matrix(x: torch.Tensor, y: torch.Tensor, *, metric: str = "sqeuclidean",
                backend: str | None = None) -> torch.Tensor:
    """Cost C_ij between row i of x and row j of y, for every pair (batched over a leading dim).

    Metrics (x_i, y_j ∈ ℝ^d; x̄_i = mean_k x_ik):

    * ``"sqeuclidean"``: C_ij = ‖x_i‖² + ‖y_j‖² − 2⟨x_i, y_j⟩, clamped ≥ 0 (= ‖x_i − y_j‖²);
    * ``"euclidean"``:   C_ij = the square root of that;
    * ``"inner"``:       C_ij = −⟨x_i, y_j⟩ (minimising it maximises similarity: weight matching);
    * ``"cosine"``:      C_ij = 1 − ⟨x_i, y_j⟩ / (‖x_i‖ ‖y_j‖), clipped to [0, 2];
    * ``"correlation"``: C_ij = 1 − ⟨x_i − x̄_i, y_j − ȳ_j⟩ / (‖x_i − x̄_i‖ ‖y_j − ȳ_j‖), clipped to
      [0, 2] (one minus the Pearson correlation over the d features).

    These are ``scipy.spatial.distance.cdist``'s metrics of the same names (``inner`` aside) wherever
    scipy defines them. Where it does not (0/0: a zero vector under ``cosine``, a constant vector
    under ``correlation``, or d = 0), the similarity is taken as 0, so C_ij = 1 (scipy gives NaN).
    NaN inputs propagate to the entries they touch.

    Parameters
    ----------
    x : tensor [n, d] or [B, n, d]
    y : tensor [m, d] or [B, m, d]; the same rank, batch size, d, dtype and device as x
    metric : one of the names above
    backend : "torch" (the reference; the automatic choice on CPU, where it is torch's BLAS) or
        "triton" (one fused kernel; the automatic choice for CUDA fp16/bf16/fp32)

    Returns
    -------
    tensor [n, m] or [B, n, m] in x's dtype, accumulated in fp32 (fp64 for fp64 inputs).

    Precision: the triton kernel accumulates x yᵀ in fp32 (no tf32, also for fp32 inputs) and forms
    the centred products of ``correlation`` as ⟨x, y⟩ − (Σx)(Σy)/d, which loses accuracy when the
    vectors' means are large against their spread; centre such data first, or use backend="torch".
    ``sqeuclidean`` and ``euclidean`` carry an absolute error of order ε(‖x_i‖² + ‖y_j‖²) on both
    backends (cdist's matrix-product formulation does the same).

    Example
    -------
    >>> cost_matrix(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0]]))
    tensor([[1.],
            [1.]])
    """
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise C.ConfigError(f"{OP}: {name} is a {type(t).__name__}, not a torch.Tensor")
        if t.dtype not in C.FLOAT_DTYPES:
            raise C.DTypeMismatchError(
                f"{OP}: {name} has dtype {t.dtype}; supported are float16, bfloat16, float32, float64 "
                f"(cast it with .to(torch.float32))"
            )
    C.choice(OP, "metric", metric, METRICS)
    if x.dim() not in (2, 3) or y.dim() != x.dim():
        raise C.ShapeMismatchError(
            f"{OP}: x has shape {tuple(x.shape)} and y {tuple(y.shape)}; pass x [n, d] with y [m, d], "
            f"or x [B, n, d] with y [B, m, d]"
        )
    if x.shape[-1] != y.shape[-1] or (x.dim() == 3 and x.shape[0] != y.shape[0]):
        raise C.ShapeMismatchError(
            f"{OP}: x has shape {tuple(x.shape)} and y {tuple(y.shape)}: they need the same feature "
            f"size d (last dim) and the same batch size"
        )
    if y.dtype != x.dtype:
        raise C.DTypeMismatchError(f"{OP}: y has dtype {y.dtype} but x has {x.dtype}; cast them to one dtype first")
    if y.device != x.device:
        raise C.DeviceMismatchError(f"{OP}: y is on {y.device} but x is on {x.device}; move them to one device first")
    xb, yb = (x, y) if x.dim() == 3 else (x.unsqueeze(0), y.unsqueeze(0))
    _, kernel = resolve(OP, x.device, x.dtype, backend)
    if x.requires_grad or y.requires_grad:
        with torch.no_grad():
            out = kernel(xb, yb, metric=metric)
    else:  # entering no_grad costs more than a small product
        out = kernel(xb, yb, metric=metric)
    return out if x.dim() == 3 else out[0]


def cost_matrix_reference(x: torch.Tensor, y: torch.Tensor, *, metric: str) -> torch.Tensor:
    """Kernel-level oracle: x [B, n, d], y [B, m, d] (any layout) → C [B, n, m] in x's dtype.

    One BLAS matrix product per metric, with the epilogue in place on its result (this is also the
    CPU path: torch's GEMM is the fastest there is)."""
    acc = C.accum_dtype(x.dtype)
    xa, ya = x.to(acc), y.to(acc)
    # The epilogue is folded into the GEMM's alpha/beta where it is affine: a separate pass over C is
    # one more parallel region, which on a busy machine can wait a whole scheduler slice for its threads.
    if metric == "inner":  # −x yᵀ: alpha = −1, beta = 0 (the 0-dim input is never read)
        cost = torch.baddbmm(xa.new_zeros(()), xa, ya.transpose(1, 2), beta=0, alpha=-1)
    elif metric in ("sqeuclidean", "euclidean"):
        x_sq = (xa * xa).sum(-1)
        y_sq = (ya * ya).sum(-1)
        # ‖x_i‖² + ‖y_j‖² − 2⟨x_i, y_j⟩: the norms are the accumulator of the GEMM
        cost = torch.baddbmm(x_sq[:, :, None] + y_sq[:, None, :], xa, ya.transpose(1, 2), alpha=-2).clamp_min_(0)
        if metric == "euclidean":
            cost.sqrt_()
    else:  # cosine, correlation: 1 − ⟨x_i/‖x_i‖, y_j/‖y_j‖⟩ of the (centred) rows
        if metric == "correlation":
            xa, ya = _centred(xa), _centred(ya)
        cost = torch.baddbmm(xa.new_ones(()), _unit_rows(xa), _unit_rows(ya).transpose(1, 2), alpha=-1).clamp_(0, 2)
    return cost.to(x.dtype)


def _centred(v: torch.Tensor) -> torch.Tensor:
    """v − mean over the last dim; exactly 0 for constant rows (whose correlation is taken as 0)."""
    constant = (v == v[..., :1]).all(-1, keepdim=True)
    return torch.where(constant, torch.zeros_like(v), v - v.mean(-1, keepdim=True))


def _unit_rows(v: torch.Tensor) -> torch.Tensor:
    """v_i / ‖v_i‖, and 0 for zero rows (so their similarity to anything is 0)."""
    norm = v.norm(dim=-1, keepdim=True)
    return v * torch.where(norm > 0, 1 / norm, torch.zeros_like(norm))


register(OP, torch=cost_matrix_reference,
         triton=lambda: triton_kernels().cost_matrix.cost_matrix)
