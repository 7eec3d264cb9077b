"""Plumbing shared by the Triton kernels: K input pointers, dtypes, block sizes, small jit helpers.

**How K inputs reach a kernel.** K varies per call (1 … 16 and more), so the K tensors are not
separate kernel arguments: the launcher builds a small device ``int64`` tensor holding their
``data_ptr()`` s (:func:`pointer_table`) and the kernel loads entry ``i`` and casts it to a pointer
(:func:`load_input`). The inputs are read in place, never stacked into a K×n copy. This works
natively on the GPU (the pattern of Triton's grouped-GEMM tutorial) and under ``TRITON_INTERPRET=1``
on CPU, where a CPU tensor's ``data_ptr()`` is the memory the interpreter reads. A pointer loaded
from memory carries no alignment facts, so the launcher checks that every input starts on a
16-byte boundary and then says so to the compiler (``ALIGNED``), which keeps loads vectorised.

All kernels are launched with ``enable_fp_fusion=False`` so that ``a * b + c`` rounds the product
like the torch reference does instead of becoming one FMA.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

BLOCK = 1024          # elements per program of every elementwise pass
NUM_WARPS = 4

_ELEMENT_TYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def element_type(dtype: torch.dtype):
    """The Triton element type of a torch dtype (fp16, bf16, fp32)."""
    try:
        return _ELEMENT_TYPES[dtype]
    except KeyError:
        raise TypeError(f"the triton kernels have no {dtype} variant (fp16, bf16, fp32)") from None


def pointer_table(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """A device int64 tensor of the tensors' addresses, and whether all are 16-byte aligned."""
    addresses = [t.data_ptr() for t in tensors]
    table = torch.tensor(addresses, dtype=torch.int64, device=tensors[0].device)
    return table, all(a % 16 == 0 for a in addresses)


def launch_options() -> dict:
    return dict(num_warps=NUM_WARPS, enable_fp_fusion=False)


@triton.jit
def load_input(table, i, offs, mask, ELT: tl.constexpr, ALIGNED: tl.constexpr):
    """Load ``offs`` of input ``i`` of a pointer table (0 where ``mask`` is off), in its own dtype."""
    ptr = tl.load(table + i).to(tl.pointer_type(ELT))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def round_to(v, DT: tl.constexpr):
    """Round an fp32 block to ``DT`` to nearest, ties to even. bf16 is rounded by integer arithmetic on
    the bits, because the interpreter's fp32 → bf16 cast truncates (the GPU's ``cvt.rn`` rounds to
    nearest even, so both agree with torch this way)."""
    if DT == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(v != v, 0x7FC0, rounded)   # NaN stays NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DT)


@triton.jit
def task_vector(x, b):
    """δ = x − b computed in fp32 and rounded to the inputs' dtype (as a checkpoint stores it)."""
    return round_to(x.to(tl.float32) - b.to(tl.float32), x.dtype)


@triton.jit
def is_nonfinite(v):
    """Elementwise NaN-or-Inf test of an fp32 block."""
    return (v != v) | (tl.abs(v) == float("inf"))


@triton.jit
def flag_if_any(flag_ptr, bad):
    """Set ``*flag_ptr = 1`` when any element of the bool block ``bad`` is set (benign race: all
    writers store 1)."""
    tl.store(flag_ptr, 1, mask=tl.max(bad.to(tl.int32)) > 0)


def new_flag(device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int32, device=device)
