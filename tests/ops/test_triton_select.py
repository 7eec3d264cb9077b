"""The triton radix select (triton_kernels/_select.py) against the stable-sort oracle, with small blocks
and chunks so that every path runs on a few thousand elements under the interpreter: several chunks
per program, the tie cutoff in a middle chunk, ties spanning chunks, the L1 norms of the TIES rescale,
and tie-heavy bf16 task vectors (real ones put most entries into a handful of keys)."""

from __future__ import annotations

import pytest
import torch

from fusion_engine._dispatch import backends
from fusion_engine.ops import _common as OC
from fusion_engine.ops.magnitude_mask import topk_magnitude_reference

from utils import assert_bitwise_equal

pytestmark = pytest.mark.skipif(not backends()["triton"].usable, reason="triton backend unusable here")

TIES = ("index", "threshold")


@pytest.fixture(params=[(64, (4, 1), 1), (128, (2, 1), 3)], ids=["chunks-of-4", "chunks-of-2"])
def small_blocks(request, monkeypatch):
    """Shrink BLOCK, the chunk lengths and the program target so few-thousand-element inputs take
    the multi-chunk paths."""
    from fusion_engine.triton_kernels import _common, _select

    block, chunks, min_programs = request.param
    monkeypatch.setattr(_common, "BLOCK", block)
    monkeypatch.setattr(_select, "CHUNK_BLOCKS", chunks)
    monkeypatch.setattr(_select, "MIN_PROGRAMS", min_programs)
    return _select


def tie_heavy(gen: torch.Generator, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Task-vector-like values: a few distinct magnitudes of random sign, many exact zeros."""
    levels = torch.tensor([0.0, 0.0, 0.0, 1e-3, 1e-3, 2e-3, 5e-3, 5e-3, 0.01, 0.25])
    picks = levels[torch.randint(0, len(levels), (n,), generator=gen)]
    signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    return (picks * signs).to(dtype)


def inputs(kind: str, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "ties":
        return tie_heavy(gen, n, dtype)
    return torch.randn(n, generator=gen).to(dtype)


@pytest.mark.parametrize("tie", TIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("kind", ["ties", "normal"])
def test_select_matches_sort(small_blocks, kind, dtype, tie):
    n = 1000 + 7 * small_blocks.CHUNK_BLOCKS[0]
    x = inputs(kind, n, dtype, seed=n)
    ks = [0, 1, n // 3, n - 1, n]
    for k in ks:
        sel = small_blocks.select_top_magnitude([x], None, [k], tie)
        t, j = int(sel.threshold[0]), int(sel.cutoff[0])
        key = OC.flat(x).view(torch.int16 if dtype != torch.float32 else torch.int32).to(torch.int64)
        key = key & (0x7FFF if dtype != torch.float32 else 0x7FFFFFFF)
        kept = (key > t) | ((key == t) & (torch.arange(n) < j))
        assert_bitwise_equal(kept, topk_magnitude_reference(x, k, tie), f"{kind} {dtype} {tie} k={k}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_models_in_one_launch_with_l1(small_blocks, dtype):
    """K models with different k (0, n and partial ones) in one call, with a base: each model's
    keep rule and its L1 norms match the oracle's."""
    n = 900
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(n, generator=gen).to(dtype)
    models = [base + tie_heavy(gen, n, dtype), (base + torch.randn(n, generator=gen)).to(dtype),
              base + tie_heavy(gen, n, dtype), base.clone()]
    models = [m.to(dtype) for m in models]
    ks = [311, 450, 0, n]
    sel = small_blocks.select_top_magnitude(models, base, ks, "index", want_l1=True)
    for i, (x, k) in enumerate(zip(models, ks)):
        delta = OC.task_vector(x, base).to(dtype)
        expected = topk_magnitude_reference(delta, k, "index")
        key = delta.view(torch.int16 if dtype != torch.float32 else torch.int32).to(torch.int64)
        key = key & (0x7FFF if dtype != torch.float32 else 0x7FFFFFFF)
        t, j = int(sel.threshold[i]), int(sel.cutoff[i])
        kept = (key > t) | ((key == t) & (torch.arange(n) < j))
        assert_bitwise_equal(kept, expected, f"model {i} k={k}")
        if 0 < k < n:
            magnitude = delta.abs().double()
            assert float(sel.l1_all[i]) == pytest.approx(float(magnitude.sum()), rel=1e-12)
            assert float(sel.l1_kept[i]) == pytest.approx(float(magnitude[expected].sum()), rel=1e-12)


def test_all_ties_cutoff_in_middle_chunk(small_blocks):
    """Every magnitude equal: T is that key, and the cutoff lands exactly at index k."""
    n = 1500
    x = torch.full((n,), -0.5, dtype=torch.bfloat16)
    for k in (1, 700, n - 1):
        sel = small_blocks.select_top_magnitude([x], None, [k], "index")
        assert int(sel.cutoff[0]) == k


def test_cutoff_search_over_many_chunks(monkeypatch):
    """More chunks than a block holds: the search for the chunk of the last kept tie loops over
    several tiles of per-chunk counts."""
    from fusion_engine.triton_kernels import _common, _select

    monkeypatch.setattr(_common, "BLOCK", 16)
    monkeypatch.setattr(_select, "CHUNK_BLOCKS", (1,))
    n = 1200  # 75 chunks of 16
    x = tie_heavy(torch.Generator().manual_seed(9), n, torch.bfloat16)
    for k in (5, 611, n - 3):
        sel = _select.select_top_magnitude([x], None, [k], "index")
        key = x.view(torch.int16).to(torch.int64) & 0x7FFF
        t, j = int(sel.threshold[0]), int(sel.cutoff[0])
        kept = (key > t) | ((key == t) & (torch.arange(n) < j))
        assert_bitwise_equal(kept, topk_magnitude_reference(x, k, "index"), f"k={k}")
