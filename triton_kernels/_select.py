"""Exact top-k by magnitude (radix select on the float bits), for magnitude_mask and the TIES trim.

The key of an entry is the bit pattern of its magnitude in the inputs' dtype (the bits without the
sign: 15 for fp16/bf16, 31 for fp32); keys order like magnitudes. The threshold T is the k-th
largest key, found digit by digit from histograms, never by sorting:

* fp16/bf16: two digits, the high 8 key bits, then the low 7 bits of the keys in the chosen bin;
* fp32: three digits of 11, 11 and 9 bits.

**No contended atomics.** Each program walks a chunk of ``CHUNK_BLOCKS`` blocks and builds its
histogram locally (``tl.histogram``: registers and shared memory), then merges it once into a
[K, bins] global histogram, one atomic add per non-empty bin (a few thousand programs per bin at
most, instead of one atomic per entry piling onto the few bins real task vectors fall into). The last
digit also stores each program's small histogram, so the number of keys equal to T in every chunk is
known without another pass. All models of a call run in one launch per digit (grid: models × chunks,
models fastest so that the K programs of a chunk share its base reads in L2); after each digit one
tiny kernel (one program per model) picks the bin holding the k-th key on the device: no host
synchronisation, and 2 (fp16/bf16) or 3 (fp32) × 2 launches plus one for the tie cutoff.

A selection is encoded per model as (T, J): an entry j is kept when key > T, or key = T and j < J.
With ``tie="index"`` J is one past the r-th key equal to T (r = k − #{key > T}), located by one
program per model that walks the single chunk holding it, so exactly k survive, lowest indices
first. With ``tie="threshold"`` J = n (every key ≥ T is kept). k = 0 and k = n need no pass:
T = 2^31 (above every key) keeps nothing, T = −1 keeps everything.

Passes over the data: 2 (fp16/bf16) or 3 (fp32), all models at once; the caller's final pass
(mask or merge) is the last read. ``rescale="l1"`` costs no extra pass: the first digit sums |δ|,
the last sums |δ| of the keys whose higher digits are above T's, and the keys above T inside T's
last-digit bin are whole bins of known magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import _common as C

KEEP_NONE = 1 << 31   # above every key
KEEP_ALL = -1         # below every key
# (shift, width) of each radix digit, most significant first
LEVELS = {16: ((7, 8), (0, 7)), 32: ((20, 11), (9, 11), (0, 9))}
CHUNK_BLOCKS = (256, 64, 16, 4, 1)   # blocks per program: the largest that still fills the GPU
# (chunks are grid dimension 1, at most 65,535: with 256 blocks of 1024, tensors up to 17G elements)
MIN_PROGRAMS = 2048


@dataclass
class Selection:
    """Per-model top-k decision, as device tensors (K models)."""

    threshold: torch.Tensor   # int64 [K]: the k-th largest key T
    cutoff: torch.Tensor      # int64 [K]: entries with key == T are kept below this index J
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
def keep_top(key, offs, threshold, cutoff):
    """Keep mask of a block of keys at indices ``offs``: key > T, or key = T below the cutoff J."""
    return (key > threshold) | ((key == threshold) & (offs < cutoff))


@triton.jit
def _load_delta(table, base_ptr, i, offs, mask, HAS_BASE: tl.constexpr, ELT: tl.constexpr,
                ALIGNED: tl.constexpr):
    x = C.load_input(table, i, offs, mask, ELT, ALIGNED)
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=mask, other=0.0)
        x = C.task_vector(x, b)
    return x


@triton.jit
def _level_kernel(table, base_ptr, prefix_ptr, hist_ptr, rows_ptr, l1_ptr, n, nprog,
                  SHIFT: tl.constexpr, WIDTH: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
                  STORE_ROWS: tl.constexpr, WANT_L1: tl.constexpr, HAS_BASE: tl.constexpr, ELT: tl.constexpr,
                  ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK_BLOCKS: tl.constexpr):
    """One radix digit for model ``program_id(0)`` and chunk ``program_id(1)`` (models vary fastest, so
    the K programs of a chunk run together and read the base chunk from L2): the histogram of key bits
    [SHIFT, SHIFT + WIDTH) over the keys whose higher bits equal the model's prefix (all keys on the
    FIRST digit), merged into row i of hist [K, 2^WIDTH] with one atomic per non-empty bin; with
    STORE_ROWS also stored as row (i, chunk) of rows [K, nprog, 2^WIDTH]. With WANT_L1, the chunk's
    Σ|δ| (FIRST) or Σ|δ| over the keys whose higher bits exceed the prefix (LAST), fp64, to l1 [K, nprog]."""
    i = tl.program_id(0)
    pid = tl.program_id(1)
    BINS: tl.constexpr = 1 << WIDTH
    if FIRST:
        prefix = 0
    else:
        prefix = tl.load(prefix_ptr + i).to(tl.int32)
    counts = tl.zeros([BINS], tl.int32)
    l1 = tl.zeros([BLOCK], tl.float64)
    for b in range(CHUNK_BLOCKS):
        offs = (pid.to(tl.int64) * CHUNK_BLOCKS + b) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        d = _load_delta(table, base_ptr, i, offs, mask, HAS_BASE, ELT, ALIGNED)
        key = magnitude_key(d)
        high = key >> (SHIFT + WIDTH)
        counts += tl.histogram((key >> SHIFT) & (BINS - 1), BINS, mask=mask & (high == prefix))
        if WANT_L1:
            magnitude = tl.abs(d.to(tl.float32)).to(tl.float64)
            if FIRST:
                l1 += magnitude
            else:
                l1 += tl.where(high > prefix, magnitude, 0.0)
    bins = tl.arange(0, BINS)
    tl.atomic_add(hist_ptr + i * BINS + bins, counts, mask=counts != 0)
    if STORE_ROWS:
        tl.store(rows_ptr + (i.to(tl.int64) * nprog + pid) * BINS + bins, counts)
    if WANT_L1:
        tl.store(l1_ptr + i * nprog + pid, tl.sum(l1))


@triton.jit
def _choose_digit_kernel(hist_ptr, need_ptr, prefix_ptr, digit_ptr, at_ptr, WIDTH: tl.constexpr):
    """For model ``program_id(0)``: the bin t of its merged digit histogram that holds the need-th
    largest key still in play; need -= the keys in the bins above t, prefix = prefix · 2^WIDTH + t,
    and t and its count are stored (digit, at)."""
    i = tl.program_id(0)
    BINS: tl.constexpr = 1 << WIDTH
    bins = tl.arange(0, BINS)
    counts = tl.load(hist_ptr + i * BINS + bins).to(tl.int64)
    need = tl.load(need_ptr + i)
    at_or_above = tl.sum(counts) - tl.cumsum(counts, axis=0) + counts   # keys in bins >= b
    t = tl.sum((at_or_above >= need).to(tl.int64)) - 1
    tl.store(need_ptr + i, need - tl.sum(tl.where(bins > t, counts, 0)))
    tl.store(prefix_ptr + i, (tl.load(prefix_ptr + i) << WIDTH) | t)
    tl.store(digit_ptr + i, t)
    tl.store(at_ptr + i, tl.sum(tl.where(bins == t, counts, 0)))


@triton.jit
def _tie_cutoff_kernel(table, base_ptr, threshold_ptr, digit_ptr, quota_ptr, rows_ptr, cutoff_ptr, n, nprog,
                       WIDTH: tl.constexpr, HAS_BASE: tl.constexpr, ELT: tl.constexpr, ALIGNED: tl.constexpr,
                       BLOCK: tl.constexpr, CHUNK_BLOCKS: tl.constexpr):
    """For model ``program_id(0)``: the cutoff J of ``keep_top``, one past the index of the quota-th key
    equal to T. The chunk holding it comes from the last digit's per-chunk counts in T's bin (rows);
    one walk over that chunk then finds the entry."""
    i = tl.program_id(0)
    BINS: tl.constexpr = 1 << WIDTH
    threshold = tl.load(threshold_ptr + i).to(tl.int32)
    column = rows_ptr + i.to(tl.int64) * nprog * BINS + tl.load(digit_ptr + i)
    quota = tl.load(quota_ptr + i)
    running = tl.zeros([], tl.int64)
    chunk = tl.zeros([], tl.int64)
    rank = tl.zeros([], tl.int64)
    for c0 in range(0, nprog, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        ties = tl.load(column + c.to(tl.int64) * BINS, mask=c < nprog, other=0).to(tl.int64)
        upto = running + tl.cumsum(ties, axis=0)
        first = (upto >= quota) & (upto - ties < quota)   # the one chunk where the count reaches quota
        chunk += tl.sum(tl.where(first, c, 0).to(tl.int64))
        rank += tl.sum(tl.where(first, quota - (upto - ties), 0))
        running += tl.sum(ties)
    seen = tl.zeros([], tl.int64)
    found = tl.zeros([], tl.int64) + n
    for b in range(CHUNK_BLOCKS):
        offs = (chunk * CHUNK_BLOCKS + b) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        d = _load_delta(table, base_ptr, i, offs, mask, HAS_BASE, ELT, ALIGNED)
        tie = (mask & (magnitude_key(d) == threshold)).to(tl.int64)
        hit = (tie != 0) & (seen + tl.cumsum(tie, axis=0) == rank)
        found = tl.minimum(found, tl.min(tl.where(hit, offs, n)))
        seen += tl.sum(tie)
    tl.store(cutoff_ptr + i, found + 1)


def _magnitude_of_key(key: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The magnitude (float64) whose bit pattern in ``dtype`` is ``key``."""
    if dtype == torch.float32:
        return key.to(torch.int32).view(torch.float32).double()
    return key.to(torch.int16).view(dtype).double()


def chunk_blocks(nblocks: int, models: int) -> int:
    """Blocks per program of the select passes: the largest of CHUNK_BLOCKS that still gives
    MIN_PROGRAMS programs (fewer, longer chunks mean fewer histograms to merge and store)."""
    for blocks in CHUNK_BLOCKS:
        if triton.cdiv(nblocks, blocks) * models >= MIN_PROGRAMS:
            return blocks
    return 1


def select_top_magnitude(inputs: list[torch.Tensor], base: torch.Tensor | None, ks: list[int], tie: str,
                         *, want_l1: bool = False) -> Selection:
    """Select, per input i, its k_i entries of largest |δ_i| (δ_i = x_i − b rounded to the dtype,
    or x_i itself without a base). Reads the inputs in place; returns a :class:`Selection`."""
    first = inputs[0]
    n, device, dtype = first.numel(), first.device, first.dtype
    k_all = torch.tensor(ks, dtype=torch.int64)
    threshold = torch.where(k_all == 0, KEEP_NONE, KEEP_ALL).to(device)
    cutoff = torch.zeros(len(ks), dtype=torch.int64, device=device)
    l1_all = torch.zeros(len(ks), dtype=torch.float64, device=device)
    l1_kept = torch.zeros_like(l1_all)
    active = [i for i, k in enumerate(ks) if 0 < k < n]
    if not active:
        return Selection(threshold, cutoff, l1_all, l1_kept)

    models = len(active)
    table, aligned = C.pointer_table([inputs[i] for i in active])
    blocks = chunk_blocks(triton.cdiv(n, C.BLOCK), models)
    nprog = triton.cdiv(n, C.BLOCK * blocks)
    common = dict(HAS_BASE=base is not None, ELT=C.element_type(dtype), ALIGNED=aligned, BLOCK=C.BLOCK,
                  CHUNK_BLOCKS=blocks, **C.launch_options())
    base_arg = first if base is None else base
    levels = LEVELS[8 * first.element_size()]
    tie_index = tie == "index"
    # per model: need (the rank of T among the keys still in play), prefix (T's digits so far), digit
    # (the last digit chosen) and at (the keys in its bin); one host-to-device copy
    state = torch.zeros((4, models), dtype=torch.int64)
    state[0] = k_all[active]
    need, prefix, digit, at = state.to(device)
    hists = torch.zeros(models * sum(1 << width for _, width in levels), dtype=torch.int32, device=device)
    width = levels[-1][1]
    rows_last = torch.empty((models, nprog, 1 << width) if tie_index else (1,), dtype=torch.int32, device=device)
    l1_first = torch.empty((models, nprog) if want_l1 else (1,), dtype=torch.float64, device=device)
    l1_last = torch.empty_like(l1_first)
    start = 0
    for level, (shift, width) in enumerate(levels):
        last = level == len(levels) - 1
        hist = hists[start:start + models * (1 << width)]
        start += models * (1 << width)
        _level_kernel[(models, nprog)](table, base_arg, prefix, hist, rows_last, l1_last if last else l1_first,
                                       n, nprog, SHIFT=shift, WIDTH=width, FIRST=level == 0, LAST=last,
                                       STORE_ROWS=last and tie_index, WANT_L1=want_l1 and (level == 0 or last),
                                       **common)
        _choose_digit_kernel[(models,)](hist, need, prefix, digit, at, WIDTH=width, **C.launch_options())
    quota = need if tie_index else at                    # keys equal to T that are kept

    rows = torch.tensor(active, dtype=torch.int64, device=device) if models < len(ks) else slice(None)
    if tie_index:
        cut = torch.empty(models, dtype=torch.int64, device=device)
        _tie_cutoff_kernel[(models,)](table, base_arg, prefix, digit, quota, rows_last, cut, n, nprog,
                                      WIDTH=width, **common)
        cutoff[rows] = cut
    else:
        cutoff[rows] = n
    if want_l1:
        bins = torch.arange(1 << width, device=device)
        bucket = _magnitude_of_key(((prefix >> width)[:, None] << width) | bins, dtype)   # keys of T's last bin
        above_in_bucket = torch.where(bins > digit[:, None], hist.view(models, -1).double() * bucket, 0.0).sum(1)
        l1_all[rows] = l1_first.sum(1)
        l1_kept[rows] = l1_last.sum(1) + above_in_bucket + quota.double() * _magnitude_of_key(prefix, dtype)
    threshold[rows] = prefix
    return Selection(threshold, cutoff, l1_all, l1_kept)
