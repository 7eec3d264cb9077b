"""Triton kernels of :func:`fusion_engine.ops.ties_merge`: trim, elect sign, disjoint merge.

1. Trim: per model, the radix select of :mod:`._select` finds the threshold of the k_i largest
   |δ_i| (δ_i = x_i − b rounded to the inputs' dtype) and the tie cutoff, all models in one launch
   per pass: two local-histogram passes (fp16/bf16) or three (fp32), which also give ‖δ̂_i‖₁ for
   ``rescale="l1"``. Models with k_i ∈ {0, n} skip it.
2. Elect and merge: one pass over the K inputs (read in place through a pointer table) recomputes
   δ_i, applies the keep test and the rescale s_i, and runs the single-pass combine of
   :mod:`._combine`; it also checks every input for NaN/Inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from ._combine import combine_add, combine_finish, combine_init, l1_scales
from ._select import keep_top, magnitude_key, select_top_magnitude


@triton.jit
def _ties_merge_kernel(base_ptr, table, weight_ptr, scale_ptr, threshold_ptr, cutoff_ptr, out_ptr, flag_ptr,
                       n, K, lam,
                       SIGN_COUNT: tl.constexpr, SIGN_WEIGHTED: tl.constexpr, DIVISOR_COUNT: tl.constexpr,
                       NORMALIZE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b = tl.load(base_ptr + offs, mask=mask, other=0.0)
    bad = C.is_nonfinite(b.to(tl.float32))
    num_pos, num_neg, den_pos, den_neg, total = combine_init(b)
    for i in range(K):
        x = C.load_input(table, i, offs, mask, base_ptr.dtype.element_ty, ALIGNED)
        bad |= C.is_nonfinite(x.to(tl.float32))
        d = C.task_vector(x, b)
        keep = keep_top(magnitude_key(d), offs, tl.load(threshold_ptr + i), tl.load(cutoff_ptr + i))
        v = tl.where(keep, d.to(tl.float32), 0.0) * tl.load(scale_ptr + i)
        num_pos, num_neg, den_pos, den_neg, total = combine_add(
            num_pos, num_neg, den_pos, den_neg, total, v, tl.load(weight_ptr + i),
            True, SIGN_COUNT, SIGN_WEIGHTED, DIVISOR_COUNT)
    C.flag_if_any(flag_ptr, bad)
    y = combine_finish(num_pos, num_neg, den_pos, den_neg, total, b.to(tl.float32), lam, 1.0, True, NORMALIZE)
    tl.store(out_ptr + offs, C.round_to(y, out_ptr.dtype.element_ty), mask=mask)


def ties_merge(base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float], ks: list[int], *,
               sign: str, sign_on: str, divisor: str, normalize: bool, lam: float, rescale: str | None,
               tie: str, out_dtype: torch.dtype):
    """TIES merge of flat contiguous tensors with per-model keep counts k_i (see
    :func:`fusion_engine.ops.ties_merge.ties_merge_reference`):

    δ̂_i = s_i · m_i ⊙ δ_i (m_i the top-k_i mask of |δ_i|, s_i the optional L1 rescale), then
    y = b + λ · Σ a_i w_i δ̂_i / D with the elected sign's agreement a_i (:mod:`._combine`).
    Returns ``(y, nonfinite)``."""
    n = base.numel()
    device = base.device
    out = torch.empty(n, dtype=out_dtype, device=device)
    if n == 0:
        return out, False
    want_l1 = rescale == "l1"
    sel = select_top_magnitude(tensors, base, ks, tie, want_l1=want_l1)
    scale = l1_scales(sel.l1_all, sel.l1_kept) if want_l1 else torch.ones(len(tensors), device=device)
    table, aligned = C.pointer_table(tensors)
    weight = torch.tensor(weights, dtype=torch.float32).to(device)
    flag = C.new_flag(device)
    nblocks = triton.cdiv(n, C.BLOCK)
    _ties_merge_kernel[(nblocks,)](
        base, table, weight, scale, sel.threshold, sel.cutoff, out, flag, n, len(tensors), float(lam),
        SIGN_COUNT=sign == "count", SIGN_WEIGHTED=sign_on == "weighted", DIVISOR_COUNT=divisor == "count",
        NORMALIZE=normalize, ALIGNED=aligned, BLOCK=C.BLOCK, **C.launch_options())
    return out, bool(flag.item())
