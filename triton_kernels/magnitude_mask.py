"""Triton kernel of :func:`fusion_engine.ops.magnitude_mask`: the k entries of largest |x|.

The threshold T and the tie cutoff J come from the radix select of :mod:`._select` (two local-histogram
passes for fp16/bf16, three for fp32); a last pass writes the mask and checks the input for NaN/Inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from ._select import keep_top, magnitude_key, select_top_magnitude


@triton.jit
def _magnitude_mask_kernel(x_ptr, threshold_ptr, cutoff_ptr, out_ptr, flag_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    keep = keep_top(magnitude_key(x), offs, tl.load(threshold_ptr), tl.load(cutoff_ptr))
    C.flag_if_any(flag_ptr, C.is_nonfinite(x.to(tl.float32)))
    tl.store(out_ptr + offs, keep.to(tl.int8), mask=mask)


def magnitude_mask(x: torch.Tensor, k: int, *, tie: str):
    """Bool mask of the k entries of largest |x| (flat contiguous x); ties at the k-th magnitude
    broken by lowest index (``tie="index"``) or all kept (``"threshold"``). See
    :func:`fusion_engine.ops.magnitude_mask.magnitude_mask_reference`. Returns ``(mask, nonfinite)``."""
    n = x.numel()
    out = torch.empty(n, dtype=torch.bool, device=x.device)
    if n == 0:
        return out, False
    sel = select_top_magnitude([x], None, [k], tie)
    flag = C.new_flag(x.device)
    grid = (triton.cdiv(n, C.BLOCK),)
    _magnitude_mask_kernel[grid](x, sel.threshold, sel.cutoff, out.view(torch.int8), flag, n, BLOCK=C.BLOCK,
                                 **C.launch_options())
    return out, bool(flag.item())
