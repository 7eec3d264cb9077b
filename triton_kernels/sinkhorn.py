"""Triton kernels of :func:`fusion_engine.ops.sinkhorn`: log-domain Sinkhorn, batched, fp32.

One kernel computes every half-iteration: for each problem b and output index o,

    lse[b, o] = LSE_k (pot[b, k] − C[b, o, k] / reg),   new_pot[b, o] = log_marg[b, o] − lse[b, o]

over the stored cost in tiles, with an online max and sum per output (no n×m temporary). The
row update (o = i, k = j: pot = v, log_marg = log a) and the column update (o = j, k = i: pot = u,
log_marg = log b) are the same kernel with the cost's strides swapped, so the column pass reads C
through a transposed view in coalesced tiles. Grid: (problems, output blocks). A problem whose
``active`` flag is 0 (converged) returns at once, so its potentials stay frozen.

The convergence check (every ``check_every`` iterations, batched, on the device) reuses the next
iteration's column pass: P^T 1 = exp(v + lse), so err = ‖exp(v + lse) − b‖₂ costs no extra pass
over C; only the check reads a flag back to the host (to stop when every problem has converged).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _common as C

ROW_BLOCKS = (32, 128)     # (outputs, inputs) per tile of the row pass: inputs are contiguous
COLUMN_BLOCKS = (64, 64)   # the column pass: outputs are contiguous


@triton.jit
def _lse_update_kernel(cost_ptr, pot_ptr, log_marg_ptr, new_pot_ptr, lse_ptr, active_ptr, n_out, n_in,
                       stride_batch, stride_out, stride_in, inv_reg,
                       WRITE_POT: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr):
    b = tl.program_id(0)
    if tl.load(active_ptr + b) == 0:
        return
    offs_o = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    mask_o = offs_o < n_out
    cost = cost_ptr + b.to(tl.int64) * stride_batch
    pot = pot_ptr + b.to(tl.int64) * n_in
    run_max = tl.full([BLOCK_OUT], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_OUT], tl.float32)
    for k0 in range(0, n_in, BLOCK_IN):
        offs_k = k0 + tl.arange(0, BLOCK_IN)
        mask_k = offs_k < n_in
        p = tl.load(pot + offs_k, mask=mask_k, other=float("-inf"))
        c = tl.load(cost + offs_o[:, None].to(tl.int64) * stride_out + offs_k[None, :].to(tl.int64) * stride_in,
                    mask=mask_o[:, None] & mask_k[None, :], other=0.0)
        x = p[None, :] - c * inv_reg
        new_max = tl.maximum(run_max, tl.max(x, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)   # a block of -inf adds nothing
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        run_max = new_max
    lse = run_max + tl.log(run_sum)
    out = b.to(tl.int64) * n_out + offs_o
    tl.store(lse_ptr + out, lse, mask=mask_o)
    if WRITE_POT:
        log_marg = tl.load(log_marg_ptr + out, mask=mask_o, other=0.0)
        tl.store(new_pot_ptr + out, log_marg - lse, mask=mask_o)


@triton.jit
def _plan_kernel(cost_ptr, u_ptr, v_ptr, plan_ptr, n, m, inv_reg, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    b = tl.program_id(0)
    offs_i = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_i = offs_i < n
    mask_j = offs_j < m
    u = tl.load(u_ptr + b.to(tl.int64) * n + offs_i, mask=mask_i, other=0.0)
    v = tl.load(v_ptr + b.to(tl.int64) * m + offs_j, mask=mask_j, other=0.0)
    offs = b.to(tl.int64) * n * m + offs_i[:, None].to(tl.int64) * m + offs_j[None, :]
    mask = mask_i[:, None] & mask_j[None, :]
    c = tl.load(cost_ptr + offs, mask=mask, other=0.0)
    tl.store(plan_ptr + offs, tl.exp((u[:, None] + v[None, :]) - c * inv_reg), mask=mask)


def _half_step(cost, pot, log_marg, new_pot, lse, active, *, rows: bool, inv_reg: float, write_pot: bool):
    B, n, m = cost.shape
    n_out, n_in = (n, m) if rows else (m, n)
    stride_out, stride_in = (m, 1) if rows else (1, m)
    block_out, block_in = ROW_BLOCKS if rows else COLUMN_BLOCKS
    grid = (B, triton.cdiv(n_out, block_out))
    _lse_update_kernel[grid](cost, pot, log_marg, new_pot, lse, active, n_out, n_in, n * m, stride_out, stride_in,
                             inv_reg, WRITE_POT=write_pot, BLOCK_OUT=block_out, BLOCK_IN=block_in,
                             **C.launch_options())


def sinkhorn(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, f: torch.Tensor, g: torch.Tensor, *,
             reg: float, max_iter: int, tol: float, check_every: int, with_plan: bool):
    """Log-domain Sinkhorn on contiguous fp32 [B, n, m] costs (see
    :func:`fusion_engine.ops.sinkhorn.sinkhorn_reference`). Returns ``(plan or None, f, g, n_iter, err)``."""
    if cost.dtype != torch.float32:
        raise TypeError(f"the triton sinkhorn kernel computes in float32, got {cost.dtype}")
    B, n, m = cost.shape
    device = cost.device
    inv_reg = 1.0 / reg
    u, v = f / reg, g / reg                      # fresh tensors: the caller's f, g stay untouched
    log_a, log_b = a.log(), b.log()
    lse_col = torch.empty(B, m, dtype=torch.float32, device=device)
    lse_row = torch.empty(B, n, dtype=torch.float32, device=device)
    active = torch.ones(B, dtype=torch.int32, device=device)
    n_iter = torch.zeros(B, dtype=torch.int64, device=device)
    err = torch.full((B,), math.inf, dtype=torch.float32, device=device)

    def column_violation():  # ‖P^T 1 − b‖₂ from the column LSE of the current u
        return torch.linalg.vector_norm(torch.exp(v + lse_col) - b, dim=1)

    pending = False
    for it in range(max_iter):
        if pending:
            _half_step(cost, u, log_b, v, lse_col, active, rows=False, inv_reg=inv_reg, write_pot=False)
            e = column_violation()
            live = active.bool()
            err = torch.where(live, e, err)
            live &= ~(e < tol)
            active = live.to(torch.int32)
            if not bool(live.any()):
                break
            v = torch.where(live[:, None], log_b - lse_col, v)
        else:
            _half_step(cost, u, log_b, v, lse_col, active, rows=False, inv_reg=inv_reg, write_pot=True)
        _half_step(cost, v, log_a, u, lse_row, active, rows=True, inv_reg=inv_reg, write_pot=True)
        n_iter += active
        pending = it % check_every == 0
    else:
        _half_step(cost, u, log_b, v, lse_col, active, rows=False, inv_reg=inv_reg, write_pot=False)
        err = torch.where(active.bool(), column_violation(), err)   # the error of the plan returned
    plan = None
    if with_plan:
        plan = torch.empty_like(cost)
        grid = (B, triton.cdiv(n, 32), triton.cdiv(m, 64))
        _plan_kernel[grid](cost, u, v, plan, n, m, inv_reg, BLOCK_N=32, BLOCK_M=64, **C.launch_options())
    return plan, reg * u, reg * v, n_iter, err
