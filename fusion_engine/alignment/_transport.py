"""Linear maps on permuted axes: contracting a slot's units with a matrix (soft alignment, merge, unmerge)."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .spec import AxisSlot, PermutationSpec


def head_groups(spec: PermutationSpec, where: str) -> dict[str, tuple[str, ...]]:
    """Attention-head permutation → its per-head dimension permutations (copies sharing its weights); every
    other permutation must act on whole axes."""
    groups = {}
    for p in spec.head_dims:
        params = {s.param for s in spec.slots[p]}
        groups[p] = tuple(q for q in spec.perm_sizes if spec.copies.get(q, 1) > 1
                          and any(s.param in params for s in spec.slots[q]))
    grouped = set(groups) | {q for dims in groups.values() for q in dims}
    for p, slots in spec.slots.items():
        if p not in grouped and (spec.copies.get(p, 1) > 1 or any(s.start or s.outer != 1 for s in slots)):
            raise ConfigError(f"{where}: permutation {p!r} acts on a window or per copy but belongs to no attention "
                              f"head group; {where} supports MLP, VGG, ResNet and GPT-2 / Llama specs")
    return groups


def map_axis(w: torch.Tensor, slot: AxisSlot, matrix: torch.Tensor) -> torch.Tensor:
    """``w`` with the units of ``slot``'s window replaced: ``w'[.., o, i, k, ..] = Σ_j M_o[i, j] w[.., o, j, k, ..]``.

    The window (axis ``slot.axis``, from ``slot.start``) is viewed as ``[outer, n, inner]``; ``matrix``
    is ``[m, n]`` (every block) or ``[copies, m, n]`` (block o uses copy ``o // slot.repeat``); the
    window becomes ``outer·m·inner`` long. A permutation ``P`` as the matrix ``M[i, P[i]] = 1`` gives
    :func:`~fusion_engine.alignment.apply_permutation`'s ``W[P]``. Differentiable in ``w`` and ``matrix``.
    """
    x = w.movedim(slot.axis, 0)
    n = matrix.shape[-1]
    length = slot.outer * n * slot.inner
    window = x[slot.start:slot.start + length].reshape(slot.outer, n, -1)  # [outer, n, inner·rest]
    mat = matrix.to(x.dtype)
    y = (mat.repeat_interleave(slot.repeat, 0) if mat.dim() == 3 else mat) @ window
    y = y.reshape(-1, *x.shape[1:])
    if slot.start or length != x.shape[0]:
        y = torch.cat([x[:slot.start], y, x[slot.start + length:]], 0)
    return y.movedim(0, slot.axis)


def apply_matrices(spec: PermutationSpec, state_dict, matrices) -> dict[str, torch.Tensor]:
    """The spec's tensors of ``state_dict`` mapped by one matrix per permutation (:func:`map_axis`), in the
    spec's application order; other tensors passed through. With one-hot matrices of permutations this
    is :func:`~fusion_engine.alignment.apply_permutation`; with doubly stochastic ones a soft
    relabelling (Sinkhorn re-basin), differentiable in the matrices."""
    out = dict(state_dict)
    for (param, _axis), entries in spec.axis_perms().items():
        for p, s in entries:
            out[param] = map_axis(out[param], s, matrices[p])
    return out


def one_hot(perm: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """The matrix of a permutation (``[n]`` or ``[copies, n]``): ``M[.., i, perm[i]] = 1``."""
    return torch.nn.functional.one_hot(perm, perm.shape[-1]).to(dtype)


def unit_rows(w: torch.Tensor, slot: AxisSlot, n: int) -> torch.Tensor:
    """``w`` viewed as ``[n, features]`` along ``slot``'s units."""
    return w.movedim(slot.axis, 0).reshape(n, -1)
