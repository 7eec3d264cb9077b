"""Permutation specs: which parameter axes each hidden-unit permutation acts on, and applying them.

A hidden unit of a network can be relabelled without changing the function the network computes,
provided every tensor that reads or writes that unit is relabelled the same way. A
:class:`PermutationSpec` records, for each such permutation ``P`` of ``n`` units, the places where
it acts: a (parameter, axis) pair, optionally restricted to a window of the axis that is viewed as
``[outer, n, inner]`` (``outer`` blocks of ``n`` units of ``inner`` contiguous elements; e.g. the
heads of a fused QKV projection). Permuting by ``P`` maps that window ``W`` to

.. math::  W'[o, i, k] = W[o, P_{b(o)}[i], k],

where ``P`` is a single permutation (shape ``[n]``, the same for every block) or a batch of
``copies`` independent permutations (shape ``[copies, n]``, block ``o`` uses copy
``b(o) = o // repeat``), e.g. one permutation of the dimensions of each attention head.
``P[i]`` is the original unit placed at position ``i`` (``W' = W[P]``), the convention of
Git Re-Basin. Several permutations may act on one axis (heads and the dimensions inside each
head): they are applied in the order they were declared in the spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from ..errors import ConfigError, MissingTensorError, ShapeMismatchError

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class AxisSlot:
    """Where a permutation acts: ``param``'s ``axis``, window ``[start, start + outer·n·inner)``.

    ``reads`` says whether the tensor reads the units on this axis (an input axis) or writes them
    (an output); None means the usual layout, axis 0 written and other axes read (Linear, Conv,
    norms, biases). Only merges that are not permutations (ZipIt!) need it.
    """

    param: str
    axis: int
    start: int = 0
    outer: int = 1
    inner: int = 1
    repeat: int = 1
    reads: bool | None = None

    @property
    def is_input(self) -> bool:
        return self.axis != 0 if self.reads is None else self.reads


@dataclass(frozen=True)
class PermutationSpec:
    """Hidden-unit permutations of a network and the parameter axes they act on.

    Attributes
    ----------
    perm_sizes : permutation name → number of units ``n`` (declaration order = application order)
    slots : permutation name → the :class:`AxisSlot` s it acts on
    param_shapes : parameter name → shape, for every parameter the spec touches
    copies : permutation name → number of independent copies (absent = 1: a plain ``[n]`` permutation)
    activation_sites : permutation name → module names whose outputs carry its units (for
        activation matching / ZipIt): channel dim 1 of a 2-D/4-D output, the last dim of a 3-D one
    layer_order : the permutations in the order a forward pass produces them (OT fusion, ZipIt)
    head_dims : attention-head permutation → the per-head permutation of its value dimensions (or None);
        the heads' activation site (the attention output projection's input, ``heads·repeat·head_dim``
        features) then carries both (activation matching matches heads and their dimensions together)
    """

    perm_sizes: dict[str, int]
    slots: dict[str, tuple[AxisSlot, ...]]
    param_shapes: dict[str, tuple[int, ...]]
    copies: dict[str, int] = field(default_factory=dict)
    activation_sites: dict[str, tuple[str, ...]] = field(default_factory=dict)
    layer_order: tuple[str, ...] = ()
    head_dims: dict[str, str | None] = field(default_factory=dict)

    def __post_init__(self):
        for p, slots in self.slots.items():
            if p not in self.perm_sizes:
                raise ConfigError(f"PermutationSpec: slots name permutation {p!r} that has no size in perm_sizes")
            n, c = self.perm_sizes[p], self.copies.get(p, 1)
            for s in slots:
                shape = self.param_shapes.get(s.param)
                if shape is None:
                    raise ConfigError(f"PermutationSpec: {p!r} acts on {s.param!r}, which has no entry in param_shapes")
                if not 0 <= s.axis < len(shape):
                    raise ConfigError(f"PermutationSpec: {p!r} acts on axis {s.axis} of {s.param!r} {shape}")
                if s.start + s.outer * n * s.inner > shape[s.axis]:
                    raise ConfigError(
                        f"PermutationSpec: {p!r} (n={n}) window start={s.start} outer={s.outer} inner={s.inner} "
                        f"overruns axis {s.axis} of {s.param!r} (length {shape[s.axis]})")
                if c > 1 and s.outer != c * s.repeat:
                    raise ConfigError(
                        f"PermutationSpec: {p!r} has {c} copies but its window on {s.param!r} has outer={s.outer} "
                        f"blocks with repeat={s.repeat}; need outer == copies · repeat")
        if not self.layer_order:
            object.__setattr__(self, "layer_order", tuple(self.perm_sizes))

    @property
    def perm_to_axes(self) -> dict[str, list[tuple[str, int]]]:
        """permutation name → [(parameter name, axis), ...] (Git Re-Basin's ``perm_to_axes``)."""
        return {p: [(s.param, s.axis) for s in self.slots.get(p, ())] for p in self.perm_sizes}

    @property
    def axes_to_perm(self) -> dict[str, tuple]:
        """parameter name → one entry per axis: None (unpermuted), a permutation name, or a tuple of
        names (several act on that axis, in application order)."""
        out: dict[str, list[list[str]]] = {k: [[] for _ in shape] for k, shape in self.param_shapes.items()}
        for p in self.perm_sizes:
            for s in self.slots.get(p, ()):
                if p not in out[s.param][s.axis]:
                    out[s.param][s.axis].append(p)
        return {k: tuple(None if not ps else ps[0] if len(ps) == 1 else tuple(ps) for ps in axes)
                for k, axes in out.items()}

    def perm_shape(self, name: str) -> tuple[int, ...]:
        c = self.copies.get(name, 1)
        return (self.perm_sizes[name],) if c == 1 else (c, self.perm_sizes[name])

    def identity(self, device=None) -> dict[str, torch.Tensor]:
        """Identity permutations (int64), one per permutation of the spec."""
        return {p: torch.arange(self.perm_sizes[p], device=device).expand(self.perm_shape(p)).clone()
                for p in self.perm_sizes}

    def random(self, seed: int = 0) -> dict[str, torch.Tensor]:
        """Uniformly random permutations (int64), reproducible from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        out = {}
        for p in self.perm_sizes:
            c, n = self.copies.get(p, 1), self.perm_sizes[p]
            perms = torch.stack([torch.randperm(n, generator=g) for _ in range(c)])
            out[p] = perms[0] if c == 1 else perms
        return out

    def axis_perms(self) -> dict[tuple[str, int], list[tuple[str, AxisSlot]]]:
        """(parameter, axis) → [(permutation, slot), ...] in application order."""
        out: dict[tuple[str, int], list[tuple[str, AxisSlot]]] = {}
        for p in self.perm_sizes:
            for s in self.slots.get(p, ()):
                out.setdefault((s.param, s.axis), []).append((p, s))
        return out


# ------------------------------------------------------------------------------------------------
# index maps


def slot_index_map(length: int, slot: AxisSlot, perm: torch.Tensor) -> torch.Tensor:
    """Gather indices of length ``length`` that apply ``perm`` inside ``slot``'s window (identity outside)."""
    idx = torch.arange(length, device=perm.device)
    n = perm.shape[-1]
    if perm.dim() == 1:
        p = perm.expand(slot.outer, n)
    else:
        p = perm.repeat_interleave(slot.repeat, dim=0)  # [outer, n]
    base = slot.start + torch.arange(slot.outer, device=perm.device)[:, None, None] * (n * slot.inner)
    window = base + p[:, :, None] * slot.inner + torch.arange(slot.inner, device=perm.device)[None, None, :]
    idx[slot.start:slot.start + slot.outer * n * slot.inner] = window.reshape(-1)
    return idx


def compose(first: torch.Tensor | None, then: torch.Tensor) -> torch.Tensor:
    """Gather map of applying ``first`` and then ``then``: ``W[first][then] = W[first[then]]``."""
    return then if first is None else first[then]


def invert(index: torch.Tensor) -> torch.Tensor:
    """The inverse of a permutation given as gather indices (works row-wise on a batch)."""
    inv = torch.empty_like(index)
    inv.scatter_(-1, index, torch.arange(index.shape[-1], device=index.device).expand_as(index).contiguous())
    return inv


def axis_index_map(spec: PermutationSpec, entries, perms: Mapping[str, torch.Tensor], length: int,
                   skip: str | None = None) -> torch.Tensor | None:
    """Composite gather map of every permutation in ``entries`` except ``skip`` (None when no map)."""
    total = None
    for p, s in entries:
        if p != skip:
            total = compose(total, slot_index_map(length, s, perms[p]))
    return total


def check_perms(spec: PermutationSpec, perms: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    out = {}
    for p in spec.perm_sizes:
        if p not in perms:
            raise MissingTensorError(f"{where}: no permutation named {p!r}; pass one per spec permutation "
                                     f"(spec.identity() gives identities)")
        t = torch.as_tensor(perms[p])
        if tuple(t.shape) != spec.perm_shape(p):
            raise ShapeMismatchError(f"{where}: permutation {p!r} has shape {tuple(t.shape)}, "
                                     f"the spec expects {spec.perm_shape(p)}")
        t = t.long()
        if not torch.equal(t.sort(-1).values, torch.arange(t.shape[-1]).expand_as(t)):
            raise ConfigError(f"{where}: {p!r} is not a permutation of 0..{t.shape[-1] - 1}")
        out[p] = t
    return out


def check_state_dict(spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor], where: str, name: str):
    for k, shape in spec.param_shapes.items():
        if k not in state_dict:
            raise MissingTensorError(f"{where}: {name} has no tensor {k!r}, which the permutation spec needs; "
                                     f"build the spec from this model")
        if tuple(state_dict[k].shape) != tuple(shape):
            raise ShapeMismatchError(f"{where}: {name}[{k!r}] has shape {tuple(state_dict[k].shape)}, "
                                     f"the spec expects {tuple(shape)}")


def apply_permutation(spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor],
                      perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict computing the same function, with hidden units relabelled by ``perms``.

    Every (parameter, axis) the spec names is gathered, ``W' = W.index_select(axis, idx)``, with
    ``idx`` the composition of the permutations acting on that axis; other tensors are passed
    through (the same objects; the input dict and its tensors are never modified).

    Example
    -------
    >>> spec = mlp_permutation_spec(model); perms = spec.random(seed=0)
    >>> model.load_state_dict(apply_permutation(spec, model.state_dict(), perms))  # same outputs
    """
    where = "apply_permutation"
    check_state_dict(spec, state_dict, where, "state_dict")
    perms = check_perms(spec, perms, where)
    out = dict(state_dict)
    table = spec.axis_perms()
    for param in spec.param_shapes:
        out[param] = permute_tensor(spec, param, out[param], perms, table)
    return out


def permute_tensor(spec: PermutationSpec, param: str, tensor: torch.Tensor,
                   perms: Mapping[str, torch.Tensor], table: dict | None = None) -> torch.Tensor:
    """One tensor of :func:`apply_permutation`: ``param``'s permuted axes gathered (no validation);
    ``table`` is ``spec.axis_perms()`` when the caller has it."""
    table = spec.axis_perms() if table is None else table
    for axis in range(tensor.dim()):
        entries = table.get((param, axis))
        if entries:
            idx = axis_index_map(spec, entries, {p: perms[p].to(tensor.device) for p, _ in entries}, tensor.shape[axis])
            tensor = tensor.index_select(axis, idx)
    return tensor
