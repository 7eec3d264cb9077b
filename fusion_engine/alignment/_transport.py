"""Linear maps on permuted axes: contracting a slot's units with a matrix (soft alignment, merge, unmerge)."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .spec import AxisSlot, PermutationSpec


def check_plain(spec: PermutationSpec, where: str):
    """Soft maps need plain slots: the whole axis, one block, one copy (MLP, VGG, ResNet specs)."""
    for p, slots in spec.slots.items():
        if spec.copies.get(p, 1) > 1:
            raise ConfigError(f"{where}: permutation {p!r} is a per-head (batched) permutation; {where} supports "
                              f"specs whose permutations act on whole axes (MLP, VGG, ResNet)")
        for s in slots:
            if s.start or s.outer != 1:
                raise ConfigError(f"{where}: permutation {p!r} acts on a window of {s.param!r}; {where} supports "
                                  f"specs whose permutations act on whole axes (MLP, VGG, ResNet)")


def map_axis(w: torch.Tensor, slot: AxisSlot, matrix: torch.Tensor) -> torch.Tensor:
    """``w`` with the units of ``slot.axis`` replaced: ``w'[.., i, ..] = Σ_j matrix[i, j] w[.., j, ..]``.

    ``matrix`` is ``[m, n]`` for n units of ``slot.inner`` contiguous elements; the axis becomes m·inner long.
    """
    x = w.movedim(slot.axis, 0)
    rest = x.shape[1:]
    n = matrix.shape[1]
    x = x.reshape(n, slot.inner * rest.numel() if rest else slot.inner)
    y = matrix.to(x.dtype) @ x
    y = y.reshape(matrix.shape[0] * slot.inner, *rest)
    return y.movedim(0, slot.axis)


def unit_rows(w: torch.Tensor, slot: AxisSlot, n: int) -> torch.Tensor:
    """``w`` viewed as ``[n, features]`` along ``slot``'s units."""
    return w.movedim(slot.axis, 0).reshape(n, -1)
