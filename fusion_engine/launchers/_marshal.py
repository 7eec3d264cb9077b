"""Turn flat torch tensors into what the compiled kernels take: data pointers and dtype codes.

The codes are ``fe::DType`` of csrc/core/merge_params.h.
"""

from __future__ import annotations

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
CONSENSUS_CODES = {None: -1, "sum": 0, "count": 1}
RESCALE_CODES = {None: 0, "density": 1, "l1": 2}


def code(dtype: torch.dtype) -> int:
    return DTYPE_CODES[dtype]


def ptrs(tensors: list[torch.Tensor]) -> list[int]:
    return [t.data_ptr() for t in tensors]


def empty_like_flat(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(t.numel(), dtype=dtype, device=t.device)
