"""Triton kernel of :func:`fusion_engine.ops.linear_merge`: y = Σ c_i x_i.

One pass: each program reads its block of the K inputs in place (through a pointer table, see
:mod:`._common`), accumulates in fp32 in model order and writes ``out_dtype``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C


@triton.jit
def _linear_merge_kernel(table, coeff_ptr, out_ptr, flag_ptr, n, K,
                         ELT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.zeros([BLOCK], tl.float32)
    bad = tl.zeros([BLOCK], tl.int1)
    for i in range(K):
        x = C.load_input(table, i, offs, mask, ELT, ALIGNED).to(tl.float32)
        acc += tl.load(coeff_ptr + i) * x
        bad |= C.is_nonfinite(x)
    C.flag_if_any(flag_ptr, bad)
    tl.store(out_ptr + offs, C.round_to(acc, out_ptr.dtype.element_ty), mask=mask)


def linear_merge(tensors: list[torch.Tensor], coeffs: list[float], *, out_dtype: torch.dtype):
    """y = Σ_i c_i x_i over flat contiguous tensors, accumulated in fp32 (see
    :func:`fusion_engine.ops.linear_merge.linear_merge_reference`). Returns ``(y, nonfinite)``."""
    first = tensors[0]
    n = first.numel()
    out = torch.empty(n, dtype=out_dtype, device=first.device)
    if n == 0:
        return out, False
    table, aligned = C.pointer_table(tensors)
    coeff = torch.tensor(coeffs, dtype=torch.float32).to(first.device)
    flag = C.new_flag(first.device)
    grid = (triton.cdiv(n, C.BLOCK),)
    _linear_merge_kernel[grid](table, coeff, out, flag, n, len(tensors), ELT=C.element_type(first.dtype),
                               ALIGNED=aligned, BLOCK=C.BLOCK, **C.launch_options())
    return out, bool(flag.item())
