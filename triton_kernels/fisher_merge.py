"""Triton kernel of :func:`fusion_engine.ops.fisher_merge`: y = Σ w_i F_i x_i / (Σ w_i F_i + ε).

One pass: each program reads its block of the K tensors and the K Fisher tensors in place (two
pointer tables, see :mod:`._common`; the Fishers may be the tensors' dtype or fp32) and accumulates
numerator and denominator in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C


@triton.jit
def _fisher_merge_kernel(table, fisher_table, weight_ptr, out_ptr, flag_ptr, n, K, eps,
                         ELT: tl.constexpr, FISHER_ELT: tl.constexpr, ALIGNED: tl.constexpr,
                         BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    num = tl.zeros([BLOCK], tl.float32)
    den = tl.zeros([BLOCK], tl.float32)
    bad = tl.zeros([BLOCK], tl.int1)
    for i in range(K):
        x = C.load_input(table, i, offs, mask, ELT, ALIGNED).to(tl.float32)
        f = C.load_input(fisher_table, i, offs, mask, FISHER_ELT, ALIGNED).to(tl.float32)
        bad |= C.is_nonfinite(x) | C.is_nonfinite(f)
        wf = tl.load(weight_ptr + i) * f
        num += wf * x
        den += wf
    C.flag_if_any(flag_ptr, bad)
    y = tl.math.div_rn(num, den + eps)   # IEEE division, like torch
    tl.store(out_ptr + offs, C.round_to(y, out_ptr.dtype.element_ty), mask=mask)


def fisher_merge(tensors: list[torch.Tensor], fishers: list[torch.Tensor], weights: list[float], *,
                 eps: float, out_dtype: torch.dtype):
    """y = Σ_i w_i F_i x_i / (Σ_i w_i F_i + ε) over flat contiguous tensors (see
    :func:`fusion_engine.ops.fisher_merge.fisher_merge_reference`). Returns ``(y, nonfinite)``."""
    first = tensors[0]
    n = first.numel()
    out = torch.empty(n, dtype=out_dtype, device=first.device)
    if n == 0:
        return out, False
    table, aligned = C.pointer_table(tensors)
    fisher_table, fishers_aligned = C.pointer_table(fishers)
    weight = torch.tensor(weights, dtype=torch.float32).to(first.device)
    flag = C.new_flag(first.device)
    grid = (triton.cdiv(n, C.BLOCK),)
    _fisher_merge_kernel[grid](table, fisher_table, weight, out, flag, n, len(tensors), float(eps),
                               ELT=C.element_type(first.dtype), FISHER_ELT=C.element_type(fishers[0].dtype),
                               ALIGNED=aligned and fishers_aligned, BLOCK=C.BLOCK, **C.launch_options())
    return out, bool(flag.item())
