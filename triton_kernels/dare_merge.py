"""Triton kernels of :func:`fusion_engine.ops.dare_merge`: drop and rescale, then combine.

Entry j (global index offset + local index) of model i is kept when u < floor(ρ_i 2^32), u being
word (j mod 4) of Philox4x32-10 with counter (q mod 2^32, q div 2^32, i, stream), q = j div 4, and
key (seed mod 2^32, seed div 2^32) — ``tl.philox``, bit for bit the generator of
:mod:`fusion_engine.ops.philox`, so masks match every backend under any chunking. A program
covers whole groups of four consecutive global indices, so each Philox call serves four entries
(interleaved back into entry order); the groups at the ends of the chunk are partly masked.

Passes: with ``rescale="l1"`` a first pass stores per block and model Σ|δ_i| and Σ|m_i ⊙ δ_i|
(fp64) for s_i = ‖δ_i‖₁ / ‖m_i ⊙ δ_i‖₁; then one pass over the K inputs (read in place through a
pointer table) draws the masks, rescales and runs the single-pass combine of :mod:`._combine`,
checking every input for NaN/Inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusion_engine.launchers._marshal import keep_threshold

from . import _common as C
from ._combine import combine_add, combine_finish, combine_init, l1_scales

QUADS = C.BLOCK // 4   # groups of four entries per program


@triton.jit
def _block(n, offset, first_quad, QUADS: tl.constexpr):
    """This program's quads q (its entries are 4q … 4q + 3), their local offsets and in-range mask."""
    q = first_quad + tl.program_id(0).to(tl.int64) * QUADS + tl.arange(0, QUADS)
    local = (first_quad + tl.program_id(0).to(tl.int64) * QUADS) * 4 - offset + tl.arange(0, 4 * QUADS)
    return q, local, (local >= 0) & (local < n)


@triton.jit
def philox_keep(q, i, seed, philox_stream, threshold):
    """DARE's keep decision for the entries 4q + t of model ``i`` (a block 4× as long as ``q``):
    Philox word t of the counter (q lo, q hi, i, philox_stream) below ``threshold`` (an int64 in [0, 2^32])."""
    zero = tl.zeros_like(q)
    r0, r1, r2, r3 = tl.philox(seed, (q & 0xFFFFFFFF).to(tl.uint32), (q >> 32).to(tl.uint32),
                               (zero + i).to(tl.uint32), (zero + philox_stream).to(tl.uint32))
    word = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))   # r0[0], r1[0], r2[0], r3[0], r0[1], …
    return word.to(tl.int64) < threshold


@triton.jit
def _dare_l1_kernel(base_ptr, table, threshold_ptr, l1_ptr, n, offset, first_quad, seed, philox_stream, nblocks, K,
                    ALIGNED: tl.constexpr, QUADS: tl.constexpr):
    """Block sums (fp64) of |δ_i| (row i) and |m_i ⊙ δ_i| (row K + i) for model i = program_id(1)."""
    pid = tl.program_id(0)
    i = tl.program_id(1)
    q, offs, mask = _block(n, offset, first_quad, QUADS)
    b = tl.load(base_ptr + offs, mask=mask, other=0.0)
    x = C.load_input(table, i, offs, mask, base_ptr.dtype.element_ty, ALIGNED)
    magnitude = tl.abs(C.task_vector(x, b).to(tl.float32))
    keep = philox_keep(q, i, seed, philox_stream, tl.load(threshold_ptr + i))
    tl.store(l1_ptr + i * nblocks + pid, tl.sum(magnitude.to(tl.float64)))
    tl.store(l1_ptr + (K + i) * nblocks + pid, tl.sum(tl.where(keep, magnitude, 0.0).to(tl.float64)))


@triton.jit
def _dare_merge_kernel(base_ptr, table, weight_ptr, scale_ptr, threshold_ptr, out_ptr, flag_ptr,
                       n, offset, first_quad, seed, philox_stream, K, lam, total_weight,
                       CONSENSUS: tl.constexpr, SIGN_COUNT: tl.constexpr, SIGN_WEIGHTED: tl.constexpr,
                       DIVISOR_COUNT: tl.constexpr, NORMALIZE: tl.constexpr, ALIGNED: tl.constexpr,
                       QUADS: tl.constexpr):
    q, offs, mask = _block(n, offset, first_quad, QUADS)
    b = tl.load(base_ptr + offs, mask=mask, other=0.0)
    bad = C.is_nonfinite(b.to(tl.float32))
    num_pos, num_neg, den_pos, den_neg, total = combine_init(b)
    for i in range(K):
        x = C.load_input(table, i, offs, mask, base_ptr.dtype.element_ty, ALIGNED)
        bad |= C.is_nonfinite(x.to(tl.float32))
        keep = philox_keep(q, i, seed, philox_stream, tl.load(threshold_ptr + i))
        v = tl.where(keep, C.task_vector(x, b).to(tl.float32), 0.0) * tl.load(scale_ptr + i)
        num_pos, num_neg, den_pos, den_neg, total = combine_add(
            num_pos, num_neg, den_pos, den_neg, total, v, tl.load(weight_ptr + i),
            CONSENSUS, SIGN_COUNT, SIGN_WEIGHTED, DIVISOR_COUNT)
    C.flag_if_any(flag_ptr, bad)
    y = combine_finish(num_pos, num_neg, den_pos, den_neg, total, b.to(tl.float32), lam, total_weight,
                       CONSENSUS, NORMALIZE)
    tl.store(out_ptr + offs, C.round_to(y, out_ptr.dtype.element_ty), mask=mask)


def dare_merge(base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float], densities: list[float], *,
               seed: int, stream: int, offset: int, consensus: str | None, sign_on: str, divisor: str,
               rescale: str | None, normalize: bool, lam: float, out_dtype: torch.dtype):
    """DARE merge of flat contiguous tensors (see :func:`fusion_engine.ops.dare_merge.dare_merge_reference`):

    v_i = s_i · m_i ⊙ δ_i with m_ij = [philox_ij < floor(ρ_i 2^32)] and s_i = 1/ρ_i (``"density"``,
    0 when nothing can be kept), ‖δ_i‖₁/‖m_i ⊙ δ_i‖₁ (``"l1"``) or 1; then y = b + λ Σ w_i v_i
    (÷ Σ w_i when normalizing) or, with a consensus, the TIES election of :mod:`._combine`.
    Returns ``(y, nonfinite)``."""
    n = base.numel()
    device = base.device
    out = torch.empty(n, dtype=out_dtype, device=device)
    if n == 0:
        return out, False
    K = len(tensors)
    table, aligned = C.pointer_table(tensors)
    thresholds = [keep_threshold(rho) for rho in densities]
    threshold = torch.tensor(thresholds, dtype=torch.int64).to(device)
    first_quad = offset // 4
    nblocks = triton.cdiv((offset + n - 1) // 4 - first_quad + 1, QUADS)
    tile = dict(n=n, offset=offset, first_quad=first_quad, seed=seed, philox_stream=stream)
    if rescale == "l1":
        l1 = torch.empty((2 * K, nblocks), dtype=torch.float64, device=device)
        _dare_l1_kernel[(nblocks, K)](base, table, threshold, l1, nblocks=nblocks, K=K, ALIGNED=aligned,
                                      QUADS=QUADS, **tile, **C.launch_options())
        sums = l1.sum(1)
        scale = l1_scales(sums[:K], sums[K:])
    else:
        if rescale == "density":
            scales = [1.0 / rho if t > 0 else 0.0 for rho, t in zip(densities, thresholds)]
        else:
            scales = [1.0] * K
        scale = torch.tensor(scales, dtype=torch.float32).to(device)
    total_weight = float(torch.tensor(weights, dtype=torch.float32).sum())
    if abs(total_weight) < 1e-8:
        total_weight = 1.0
    weight = torch.tensor(weights, dtype=torch.float32).to(device)
    flag = C.new_flag(device)
    _dare_merge_kernel[(nblocks,)](
        base, table, weight, scale, threshold, out, flag, K=K, lam=float(lam), total_weight=total_weight,
        CONSENSUS=consensus is not None, SIGN_COUNT=consensus == "count", SIGN_WEIGHTED=sign_on == "weighted",
        DIVISOR_COUNT=divisor == "count", NORMALIZE=normalize, ALIGNED=aligned, QUADS=QUADS, **tile,
        **C.launch_options())
    return out, bool(flag.item())
