"""Triton kernel of :func:`fusion_engine.ops.cost_matrix`: one fused matmul per [B, n, m] cost matrix.

Each program owns a BLOCK_N × BLOCK_M tile of C for one batch entry. Its K loop (over the d
features) accumulates x_tile · y_tileᵀ in fp32 with ``tl.dot`` (IEEE fp32 for fp32 inputs: no tf32)
and, in the same loop and from the same loaded tiles, the row statistics the metric needs:
Σx², Σy² (sqeuclidean, euclidean, cosine, correlation) and Σx, Σy, min, max (correlation), kept
per feature lane and reduced once after the loop. The
epilogue turns them into the metric (see ``cost_matrix`` for the formulas) and stores the tile in
the output dtype. Inputs are read in place through their strides (transposed, sliced and broadcast
views need no copy).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusion_engine.launchers._marshal import triton_interpret

from . import _common as C

_METRIC_CODES = {"sqeuclidean": 0, "euclidean": 1, "inner": 2, "cosine": 3, "correlation": 4}
SQEUCLIDEAN: tl.constexpr = tl.constexpr(0)
EUCLIDEAN: tl.constexpr = tl.constexpr(1)
INNER: tl.constexpr = tl.constexpr(2)
COSINE: tl.constexpr = tl.constexpr(3)
CORRELATION: tl.constexpr = tl.constexpr(4)

BLOCK_N = 64
BLOCK_M = 64
BLOCK_D = 32


@triton.jit
def _clamp_min_zero(v):
    """max(v, 0) that keeps NaN (like torch's clamp; tl.maximum may drop it)."""
    return tl.where(v < 0.0, 0.0, v)


@triton.jit
def _cost_matrix_kernel(x_ptr, y_ptr, out_ptr, n, m, d, inv_d,
                        sxb, sxn, sxd, syb, sym, syd, sob, son, som,
                        METRIC: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    feats = tl.arange(0, BLOCK_D)
    row_ok = rows < n
    col_ok = cols < m
    x_rows = x_ptr + b * sxb + rows.to(tl.int64)[:, None] * sxn
    y_rows = y_ptr + b * syb + cols.to(tl.int64)[:, None] * sym

    # Row statistics are accumulated elementwise over the feature tiles and reduced once after the
    # loop: no reduction inside the K loop, and no loop result used twice (Triton 3.6's
    # OptimizeThreadLocality pass asserts on a reduced loop accumulator with several uses).
    dots = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    x_sq_part = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    y_sq_part = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    x_sum_part = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    y_sum_part = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    x_min_part = tl.full([BLOCK_N, BLOCK_D], float("inf"), tl.float32)
    x_max_part = tl.full([BLOCK_N, BLOCK_D], -float("inf"), tl.float32)
    y_min_part = tl.full([BLOCK_M, BLOCK_D], float("inf"), tl.float32)
    y_max_part = tl.full([BLOCK_M, BLOCK_D], -float("inf"), tl.float32)
    for k0 in range(0, d, BLOCK_D):
        k = k0 + feats
        k_ok = k < d
        x_mask = row_ok[:, None] & k_ok[None, :]
        y_mask = col_ok[:, None] & k_ok[None, :]
        xt = tl.load(x_rows + k.to(tl.int64)[None, :] * sxd, mask=x_mask, other=0.0)
        yt = tl.load(y_rows + k.to(tl.int64)[None, :] * syd, mask=y_mask, other=0.0)
        if IEEE:  # fp32 inputs (and bf16 under the interpreter, whose bf16 dot is wrong): exact fp32 products
            dots = tl.dot(xt.to(tl.float32), tl.trans(yt.to(tl.float32)), dots, input_precision="ieee")
        else:
            dots = tl.dot(xt, tl.trans(yt), dots)
        if METRIC != INNER:
            xf = xt.to(tl.float32)
            yf = yt.to(tl.float32)
            x_sq_part += xf * xf
            y_sq_part += yf * yf
            if METRIC == CORRELATION:
                x_sum_part += xf
                y_sum_part += yf
                x_min_part = tl.minimum(x_min_part, tl.where(x_mask, xf, float("inf")))
                x_max_part = tl.maximum(x_max_part, tl.where(x_mask, xf, -float("inf")))
                y_min_part = tl.minimum(y_min_part, tl.where(y_mask, yf, float("inf")))
                y_max_part = tl.maximum(y_max_part, tl.where(y_mask, yf, -float("inf")))
    x_sq = tl.sum(x_sq_part, axis=1)
    y_sq = tl.sum(y_sq_part, axis=1)

    if METRIC == INNER:
        cost = -dots
    elif METRIC == SQEUCLIDEAN or METRIC == EUCLIDEAN:
        cost = _clamp_min_zero(x_sq[:, None] + y_sq[None, :] - 2.0 * dots)
        if METRIC == EUCLIDEAN:
            cost = tl.sqrt_rn(cost)
    else:
        if METRIC == CORRELATION:  # centred products and norms from the raw sums
            x_sum = tl.sum(x_sum_part, axis=1)
            y_sum = tl.sum(y_sum_part, axis=1)
            dots = dots - (x_sum[:, None] * y_sum[None, :]) * inv_d
            # a constant row has min = max; a NaN row (x_sq != x_sq) is not constant
            x_constant = (tl.min(x_min_part, axis=1) == tl.max(x_max_part, axis=1)) & (x_sq == x_sq)
            y_constant = (tl.min(y_min_part, axis=1) == tl.max(y_max_part, axis=1)) & (y_sq == y_sq)
            x_sq = tl.where(x_constant, 0.0, _clamp_min_zero(x_sq - x_sum * x_sum * inv_d))
            y_sq = tl.where(y_constant, 0.0, _clamp_min_zero(y_sq - y_sum * y_sum * inv_d))
        norms = tl.sqrt_rn(x_sq)[:, None] * tl.sqrt_rn(y_sq)[None, :]
        safe = tl.where(norms == 0.0, 1.0, norms)
        similarity = tl.where(norms == 0.0, 0.0, tl.math.div_rn(dots, safe))
        cost = 1.0 - similarity
        cost = tl.where(cost > 2.0, 2.0, _clamp_min_zero(cost))

    out = out_ptr + b * sob + rows.to(tl.int64)[:, None] * son + cols.to(tl.int64)[None, :] * som
    tl.store(out, C.round_to(cost, out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def cost_matrix(x: torch.Tensor, y: torch.Tensor, *, metric: str) -> torch.Tensor:
    """x [B, n, d], y [B, m, d] (fp16, bf16 or fp32, any strides) → C [B, n, m] in x's dtype; see
    :func:`fusion_engine.ops.cost_matrix.cost_matrix_reference`."""
    batch, n, d = x.shape
    m = y.shape[1]
    out = torch.empty((batch, n, m), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if d == 0:  # no features: every distance 0, every similarity undefined (cost 1); and an empty x or y
        return out.fill_(1.0 if metric in ("cosine", "correlation") else 0.0)  # may have no storage to point at
    C.element_type(x.dtype)  # fp16 / bf16 / fp32 only
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(m, BLOCK_M), batch)
    _cost_matrix_kernel[grid](x, y, out, n, m, d, 1.0 / max(d, 1), *x.stride(), *y.stride(), *out.stride(),
                              METRIC=_METRIC_CODES[metric],
                              IEEE=x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and triton_interpret()),
                              BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=4, num_stages=3)
    return out
