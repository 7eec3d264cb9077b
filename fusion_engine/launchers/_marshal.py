"""Turn flat torch tensors into what the compiled kernels take: data pointers, dtype and mode codes.

The codes mirror the enums of csrc/core/merge_params.h (``fe::DType``, ``fe::Consensus``,
``fe::Rescale``). Each extension exports its own copy (``DTYPE_CODES``, ``CONSENSUS_CODES``,
``RESCALE_CODES``: csrc/python/enum_codes.h) and :func:`check_codes` compares them at import, so a
stale build fails loudly instead of mixing up dtypes or modes.

This module is the floor every kernel layer stands on (launchers, Triton kernels): it imports
nothing from ``fusion_engine.ops`` or ``fusion_engine._dispatch``.
"""

from __future__ import annotations

import os

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
CONSENSUS_CODES = {None: -1, "sum": 0, "count": 1}
RESCALE_CODES = {None: 0, "density": 1, "l1": 2}


class ExtensionMismatchError(ImportError):
    """A compiled extension's enum codes differ from this module's: it was built from other sources."""


def check_codes(extension) -> None:
    """Raise :class:`ExtensionMismatchError` unless ``extension`` exports exactly our codes."""
    ours = {
        "DTYPE_CODES": {str(dtype).removeprefix("torch."): c for dtype, c in DTYPE_CODES.items()},
        "CONSENSUS_CODES": {("none" if mode is None else mode): c for mode, c in CONSENSUS_CODES.items()},
        "RESCALE_CODES": {("none" if mode is None else mode): c for mode, c in RESCALE_CODES.items()},
    }
    for name, expected in ours.items():
        theirs = getattr(extension, name, None)
        theirs = None if theirs is None else dict(theirs)
        if theirs != expected:
            raise ExtensionMismatchError(
                f"{extension.__name__}.{name} is {theirs} but fusion_engine/launchers/_marshal.py expects "
                f"{expected}: the extension was built from other sources; rebuild it "
                f"(python setup.py build_ext --inplace, or reinstall the package)"
            )


def code(dtype: torch.dtype) -> int:
    return DTYPE_CODES[dtype]


def ptrs(tensors: list[torch.Tensor]) -> list[int]:
    return [t.data_ptr() for t in tensors]


def empty_like_flat(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(t.numel(), dtype=dtype, device=t.device)


def keep_threshold(density: float) -> int:
    """floor(ρ · 2^32): the integer an entry's Philox word must be below to be kept (DARE)."""
    return min(1 << 32, max(0, int(density * 4294967296.0)))


def triton_interpret() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
