"""Triton kernel of :func:`fusion_engine.ops.task_arithmetic`: y = b + Σ c_i δ_i, δ_i = x_i − b.

One pass: each program loads its block of the base once and of the K inputs in place (pointer
table, see :mod:`._common`); δ_i is rounded to the inputs' dtype, the sum accumulates in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C


@triton.jit
def _task_arithmetic_kernel(base_ptr, table, coeff_ptr, out_ptr, flag_ptr, n, K,
                            ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b = tl.load(base_ptr + offs, mask=mask, other=0.0)
    acc = tl.zeros([BLOCK], tl.float32)
    bad = C.is_nonfinite(b.to(tl.float32))
    for i in range(K):
        x = C.load_input(table, i, offs, mask, base_ptr.dtype.element_ty, ALIGNED)
        acc += tl.load(coeff_ptr + i) * C.task_vector(x, b).to(tl.float32)
        bad |= C.is_nonfinite(x.to(tl.float32))
    C.flag_if_any(flag_ptr, bad)
    y = b.to(tl.float32) + acc
    tl.store(out_ptr + offs, C.round_to(y, out_ptr.dtype.element_ty), mask=mask)


def task_arithmetic(base: torch.Tensor, tensors: list[torch.Tensor], coeffs: list[float], *,
                    out_dtype: torch.dtype):
    """y = b + Σ_i c_i δ_i with c_i = λ w_i (see
    :func:`fusion_engine.ops.task_arithmetic.task_arithmetic_reference`). Returns ``(y, nonfinite)``."""
    n = base.numel()
    out = torch.empty(n, dtype=out_dtype, device=base.device)
    if n == 0:
        return out, False
    table, aligned = C.pointer_table(tensors)
    coeff = torch.tensor(coeffs, dtype=torch.float32).to(base.device)
    flag = C.new_flag(base.device)
    grid = (triton.cdiv(n, C.BLOCK),)
    _task_arithmetic_kernel[grid](base, table, coeff, out, flag, n, len(tensors), ALIGNED=aligned,
                                  BLOCK=C.BLOCK, **C.launch_options())
    return out, bool(flag.item())
