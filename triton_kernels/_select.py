"""Exact top-k by magnitude (radix select on the float bits), for magnitude_mask and the TIES trim.

The key of an entry is the bit pattern of its magnitude in the inputs' dtype (the bits without the
sign: 15 for fp16/bf16, 31 for fp32); keys order like magnitudes. The threshold T is the k-th
largest key, found from histograms, never by sorting:

* fp16/bf16: one pass, a 2^15-bin histogram of the keys;
* fp32: a 2^15-bin histogram of the high 15 bits gives the high part h of T, then a 2^16-bin
  histogram of the low 16 bits of the keys whose high part is h gives the rest.

Histograms are built with atomic adds, one launch for all models at once (grid: blocks × models);
the bin holding the k-th key is found with a small torch cumsum over each histogram, on the device
(no host synchronisation).

A selection is encoded per model as (T, quota r, per-block prefix p): an entry is kept when
key > T, or key = T and it is among the first r entries with key = T. With ``tie="index"`` r =
k − #{key > T}, and the kernel ranks a block's ties with an exclusive prefix over the blocks (p, from
one counting pass) plus a ``tl.cumsum`` inside the block, so that exactly k survive, lowest
indices first. With ``tie="threshold"`` every key ≥ T is kept (r = #{key = T}). k = 0 and k = n need
no pass: T = 2^31 (above every key) keeps nothing, T = −1 keeps everything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import _common as C

HIGH_BINS = 1 << 15   # fp16/bf16 keys, or the high 15 bits of fp32 keys
LOW_BINS = 1 << 16    # the low 16 bits of fp32 keys
KEEP_NONE = 1 << 31   # above every key
KEEP_ALL = -1         # below every key


@dataclass
class Selection:
    """Per-model top-k decision, as device tensors (K models, ``nblocks`` blocks of ``C.BLOCK``)."""

    threshold: torch.Tensor   # int64 [K]: the k-th largest key T
    quota: torch.Tensor       # int64 [K]: how many entries with key == T are kept
    prefix: torch.Tensor      # int64 [K, nblocks]: ties at T in the blocks before (tie="index")
    l1_all: torch.Tensor      # float64 [K]: ‖δ_i‖₁ (when asked for; 0 for k ∈ {0, n})
    l1_kept: torch.Tensor     # float64 [K]: ‖δ_i ⊙ m_i‖₁ (idem)


@triton.jit
def magnitude_key(d):
    """The magnitude bits of a block in its own dtype (fp32: 31 bits, fp16/bf16: 15 bits), as int32."""
    if d.dtype == tl.float32:
        key = d.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    else:
        key = d.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    return key


@triton.jit
def keep_top(key, threshold, quota, prefix, TIE_INDEX: tl.constexpr):
    """Keep mask of a 1-D block of keys: key > T, plus the ties key = T that the selection keeps
    (``prefix``: ties at T in the blocks before this one)."""
    if TIE_INDEX:
        tie = (key == threshold).to(tl.int32)
        rank = prefix + tl.cumsum(tie, axis=0) - tie
        keep = (key > threshold) | ((tie != 0) & (rank < quota))
    else:
        keep = key >= threshold
    return keep


@triton.jit
def _load_delta(table, base_ptr, i, offs, mask, HAS_BASE: tl.constexpr, ELT: tl.constexpr,
                ALIGNED: tl.constexpr):
    x = C.load_input(table, i, offs, mask, ELT, ALIGNED)
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=mask, other=0.0)
        x = C.task_vector(x, b)
    return x


@triton.jit
def _histogram_kernel(table, base_ptr, hist_ptr, high_ptr, l1_ptr, n, nblocks,
                      HAS_BASE: tl.constexpr, LOW: tl.constexpr, WANT_L1: tl.constexpr,
                      ELT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram of the keys of model ``program_id(1)``: the full 15-bit key (fp16/bf16) or the
    high 15 bits (fp32); with LOW, the low 16 bits of the fp32 keys whose high part is ``high``.
    With WANT_L1 (first pass only) it also stores the block's Σ|δ| (fp64)."""
    pid = tl.program_id(0)
    i = tl.program_id(1)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    d = _load_delta(table, base_ptr, i, offs, mask, HAS_BASE, ELT, ALIGNED)
    key = magnitude_key(d)
    if LOW:
        row = hist_ptr + i * (1 << 16)
        in_bin = mask & ((key >> 16) == tl.load(high_ptr + i))
        bins = key & 0xFFFF
    else:
        row = hist_ptr + i * (1 << 15)
        in_bin = mask
        if ELT == tl.float32:
            bins = key >> 16
        else:
            bins = key
    # Bin 0 (exact zeros: often whole blocks of an untouched parameter) is counted with one atomic
    # per block instead of one per entry, which would all hit the same address.
    zeros = tl.sum((in_bin & (bins == 0)).to(tl.int64))
    tl.atomic_add(row, zeros, mask=zeros > 0)
    tl.atomic_add(row + bins, 1, mask=in_bin & (bins != 0))
    if WANT_L1:
        tl.store(l1_ptr + i * nblocks + pid, tl.sum(tl.abs(d.to(tl.float32)).to(tl.float64)))


@triton.jit
def _tie_count_kernel(table, base_ptr, threshold_ptr, count_ptr, l1_ptr, n, nblocks,
                      HAS_BASE: tl.constexpr, COUNT_TIES: tl.constexpr, WANT_L1: tl.constexpr,
                      ELT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Per block of model ``program_id(1)``: the number of keys equal to T (COUNT_TIES) and the
    Σ|δ| of the keys above T (WANT_L1, fp64)."""
    pid = tl.program_id(0)
    i = tl.program_id(1)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    d = _load_delta(table, base_ptr, i, offs, mask, HAS_BASE, ELT, ALIGNED)
    key = magnitude_key(d)
    threshold = tl.load(threshold_ptr + i)
    if COUNT_TIES:
        tl.store(count_ptr + i * nblocks + pid, tl.sum((mask & (key == threshold)).to(tl.int64)))
    if WANT_L1:
        above = tl.where(key > threshold, tl.abs(d.to(tl.float32)), 0.0)
        tl.store(l1_ptr + i * nblocks + pid, tl.sum(above.to(tl.float64)))


def _kth_bin(hist: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``hist``: the bin t holding the k-th largest key (1 ≤ k ≤ row total) and the number
    of keys in the bins above t."""
    at_or_above = hist.flip(1).cumsum(1).flip(1)               # keys in bins ≥ b
    t = (at_or_above >= k[:, None]).sum(1) - 1
    above = (at_or_above.gather(1, t[:, None]) - hist.gather(1, t[:, None])).squeeze(1)
    return t, above


def _magnitude_of_key(key: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The magnitude (float64) whose bit pattern in ``dtype`` is ``key``."""
    if dtype == torch.float32:
        return key.to(torch.int32).view(torch.float32).double()
    return key.to(torch.int16).view(dtype).double()


def select_top_magnitude(inputs: list[torch.Tensor], base: torch.Tensor | None, ks: list[int], tie: str,
                         *, want_l1: bool = False) -> Selection:
    """Select, per input i, its k_i entries of largest |δ_i| (δ_i = x_i − b rounded to the dtype,
    or x_i itself without a base). Reads the inputs in place; returns a :class:`Selection`."""
    first = inputs[0]
    n, device, dtype = first.numel(), first.device, first.dtype
    nblocks = triton.cdiv(n, C.BLOCK)
    tie_index = tie == "index"
    k_all = torch.tensor(ks, dtype=torch.int64)
    threshold = torch.where(k_all == 0, KEEP_NONE, KEEP_ALL).to(device)
    quota = torch.zeros(len(ks), dtype=torch.int64, device=device)
    prefix = torch.zeros((len(ks), nblocks if tie_index else 1), dtype=torch.int64, device=device)
    l1_all = torch.zeros(len(ks), dtype=torch.float64, device=device)
    l1_kept = torch.zeros_like(l1_all)
    active = [i for i, k in enumerate(ks) if 0 < k < n]
    if not active:
        return Selection(threshold, quota, prefix, l1_all, l1_kept)

    table, aligned = C.pointer_table([inputs[i] for i in active])
    rows = torch.tensor(active, dtype=torch.int64, device=device)
    k = k_all[active].to(device)
    common = dict(HAS_BASE=base is not None, ELT=C.element_type(dtype), ALIGNED=aligned, BLOCK=C.BLOCK,
                  **C.launch_options())
    base_arg = first if base is None else base
    grid = (nblocks, len(active))
    per_block = (len(active), nblocks)
    part_all = torch.empty(per_block if want_l1 else (1,), dtype=torch.float64, device=device)
    hist = torch.zeros((len(active), HIGH_BINS), dtype=torch.int64, device=device)
    _histogram_kernel[grid](table, base_arg, hist, hist, part_all, n, nblocks, LOW=False, WANT_L1=want_l1,
                            **common)
    t, above = _kth_bin(hist, k)
    if dtype == torch.float32:
        hist_low = torch.zeros((len(active), LOW_BINS), dtype=torch.int64, device=device)
        _histogram_kernel[grid](table, base_arg, hist_low, t, part_all, n, nblocks, LOW=True, WANT_L1=False,
                                **common)
        t_low, above_low = _kth_bin(hist_low, k - above)
        at_t = hist_low.gather(1, t_low[:, None]).squeeze(1)
        t, above = (t << 16) | t_low, above + above_low
    else:
        at_t = hist.gather(1, t[:, None]).squeeze(1)
    chosen_quota = k - above if tie_index else at_t

    if tie_index or want_l1:
        counts = torch.empty(per_block if tie_index else (1,), dtype=torch.int64, device=device)
        part_kept = torch.empty(per_block if want_l1 else (1,), dtype=torch.float64, device=device)
        _tie_count_kernel[grid](table, base_arg, t, counts, part_kept, n, nblocks, COUNT_TIES=tie_index,
                                WANT_L1=want_l1, **common)
        if tie_index:
            prefix[rows] = counts.cumsum(1) - counts
        if want_l1:
            l1_all[rows] = part_all.sum(1)
            l1_kept[rows] = part_kept.sum(1) + chosen_quota.double() * _magnitude_of_key(t, dtype)
    threshold[rows] = t
    quota[rows] = chosen_quota
    return Selection(threshold, quota, prefix, l1_all, l1_kept)
