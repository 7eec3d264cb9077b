"""Weight matching (Git Re-Basin): permute model B's hidden units to maximise its inner product with A.

.. math::  \\max_{\\pi} \\sum_{W} \\langle W_a,\\ \\pi(W_b) \\rangle_F

solved by coordinate descent over the permutations: holding every other permutation fixed, the
objective is linear in permutation :math:`P_\\ell`, so its best value is a linear assignment problem

.. math::  P_\\ell \\leftarrow \\arg\\max_{P} \\langle S_\\ell, P \\rangle, \\qquad
           S_\\ell = \\sum_{(W, \\text{axis}) \\ni P_\\ell} W_a^{(\\text{axis})}
                     \\big(W_b^{(\\text{axis})}\\big)^{\\top}

where :math:`W^{(\\text{axis})}` is W with that axis moved first and flattened to ``[n, -1]``, and
:math:`W_b` has every other permutation applied. Permutations are visited in a seeded random order
each sweep; the descent stops after a sweep in which no permutation improved its objective by more
than 1e-12 (the reference implementation's criterion), or after ``max_iter`` sweeps.

Reference: Ainsworth, Hayase & Srinivasa, "Git Re-Basin: Merging Models modulo Permutation
Symmetries", ICLR 2023.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..errors import ConfigError, DTypeMismatchError
from . import _ops
from .spec import AxisSlot, PermutationSpec, axis_index_map, check_perms, check_state_dict, invert

IMPROVEMENT_TOL = 1e-12


def matched_params(spec: PermutationSpec) -> set[str]:
    """The parameters weight matching compares: all the spec touches except BatchNorm running statistics."""
    return {k for k in spec.param_shapes if not k.endswith(("running_mean", "running_var"))}


def slot_view(x: torch.Tensor, slot: AxisSlot, n: int, copies: int) -> torch.Tensor:
    """``x``'s window of ``slot`` as ``[copies, n, features]`` (the units of each copy as rows)."""
    w = x.narrow(slot.axis, slot.start, slot.outer * n * slot.inner).movedim(slot.axis, 0)
    w = w.reshape(copies, slot.outer // copies, n, slot.inner, -1)
    return w.permute(0, 2, 1, 3, 4).reshape(copies, n, -1)


class _SlotFeatures:
    """Builds, for one permutation's slot, A's and B's windows with every other permutation applied."""

    def __init__(self, spec: PermutationSpec):
        self.spec = spec
        self.axis_entries = spec.axis_perms()
        self.param_axes: dict[str, list[int]] = {}
        for (param, axis) in self.axis_entries:
            self.param_axes.setdefault(param, []).append(axis)

    def pair(self, perm: str, slot: AxisSlot, w_a, w_b, perms):
        spec = self.spec
        for axis in self.param_axes[slot.param]:
            if axis != slot.axis:
                idx = axis_index_map(spec, self.axis_entries[(slot.param, axis)], perms, w_b.shape[axis])
                w_b = w_b.index_select(axis, idx)
        entries = self.axis_entries[(slot.param, slot.axis)]
        pos = entries.index((perm, slot))
        before = [(q, s) for q, s in entries[:pos] if q != perm]
        after = [(q, s) for q, s in entries[pos + 1:] if q != perm]
        length = w_b.shape[slot.axis]
        if before:
            w_b = w_b.index_select(slot.axis, axis_index_map(spec, before, perms, length))
        if after:  # B·before·P·after ≈ A  ⇔  B·before·P ≈ A·after⁻¹
            w_a = w_a.index_select(slot.axis, invert(axis_index_map(spec, after, perms, length)))
        n, c = spec.perm_sizes[perm], spec.copies.get(perm, 1)
        return slot_view(w_a, slot, n, c), slot_view(w_b, slot, n, c)

    def dependencies(self, perm: str, slot: AxisSlot) -> tuple[str, ...]:
        """The other permutations that change this slot's contribution."""
        deps = []
        for axis in self.param_axes[slot.param]:
            for q, _ in self.axis_entries[(slot.param, axis)]:
                if q != perm and q not in deps:
                    deps.append(q)
        return tuple(deps)


def weight_matching(spec: PermutationSpec, params_a: Mapping[str, torch.Tensor], params_b: Mapping[str, torch.Tensor],
                    *, max_iter: int = 100, seed: int = 0, init_perms: Mapping[str, torch.Tensor] | None = None,
                    backend: str | None = None) -> dict[str, torch.Tensor]:
    """Permutations of B's hidden units that best align B's weights with A's (Git Re-Basin).

    Parameters
    ----------
    spec : the networks' :class:`PermutationSpec`
    params_a, params_b : state dicts of the two models (same architecture); not modified
    max_iter : maximum number of sweeps over the permutations
    seed : seeds the order in which each sweep visits the permutations
        (``torch.randperm(len(spec.perm_sizes), generator=torch.Generator().manual_seed(seed))``,
        one draw per sweep)
    init_perms : starting permutations (default: identities)
    backend : forwarded to :func:`fusion_engine.ops.cost_matrix` and
        :func:`fusion_engine.ops.linear_assignment`

    Returns
    -------
    dict permutation name → int64 tensor (``[n]``, or ``[copies, n]`` for batched ones) such that
    ``apply_permutation(spec, params_b, perms)`` is B aligned to A.

    Each similarity :math:`S_\\ell` is a sum over the permutation's slots of
    ``-cost_matrix(A_slot, B_slot, metric="inner")`` (batched over the copies of a per-head
    permutation, solved as one batched ``linear_assignment``). A slot's contribution is cached and
    recomputed only when a permutation it depends on has changed, which makes late sweeps cheap.

    Example
    -------
    >>> spec = mlp_permutation_spec(model_a)
    >>> perms = weight_matching(spec, model_a.state_dict(), model_b.state_dict())
    >>> model_b.load_state_dict(apply_permutation(spec, model_b.state_dict(), perms))
    """
    where = "weight_matching"
    check_state_dict(spec, params_a, where, "params_a")
    check_state_dict(spec, params_b, where, "params_b")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ConfigError(f"{where}: max_iter={max_iter!r} must be a positive integer")
    names = list(spec.perm_sizes)
    perms = check_perms(spec, init_perms, where) if init_perms is not None else spec.identity()
    used = matched_params(spec)
    for k in used:
        for who, sd in (("params_a", params_a), ("params_b", params_b)):
            if not sd[k].is_floating_point():
                raise DTypeMismatchError(f"{where}: {who}[{k!r}] has dtype {sd[k].dtype}; weights must be floating")
    features = _SlotFeatures(spec)
    slots = {p: [s for s in spec.slots.get(p, ()) if s.param in used] for p in names}
    for p in names:
        if not slots[p]:
            raise ConfigError(f"{where}: permutation {p!r} acts on no weight (only on BatchNorm statistics); "
                              f"remove it from the spec")
    device = params_a[next(iter(used))].device
    perms = {p: t.to(device) for p, t in perms.items()}
    versions = {p: 0 for p in names}
    cache: dict[tuple[str, int], tuple[tuple[int, ...], torch.Tensor]] = {}
    g = torch.Generator().manual_seed(seed)

    def similarity(p: str) -> torch.Tensor:
        total = None
        for i, s in enumerate(slots[p]):
            deps = features.dependencies(p, s)
            key = tuple(versions[q] for q in deps)
            hit = cache.get((p, i))
            if hit is None or hit[0] != key:
                a, b = features.pair(p, s, params_a[s.param], params_b[s.param], perms)
                dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
                hit = (key, _ops.cost_matrix(a.to(dtype), b.to(dtype), metric="inner", backend=backend))
                cache[(p, i)] = hit
            total = -hit[1] if total is None else total - hit[1]
        return total  # [copies, n, n]

    for _ in range(max_iter):
        progress = False
        for j in torch.randperm(len(names), generator=g).tolist():
            p = names[j]
            sim = similarity(p)
            _, cols = _ops.linear_assignment(sim, maximize=True, backend=backend)
            cols = cols.to(device)
            old = perms[p].reshape(sim.shape[:2])
            s64 = sim.double()
            old_value = s64.gather(-1, old[..., None]).sum()
            new_value = s64.gather(-1, cols[..., None]).sum()
            progress = progress or bool(new_value > old_value + IMPROVEMENT_TOL)
            new = cols.reshape(perms[p].shape)
            if not torch.equal(new, perms[p]):
                perms[p] = new
                versions[p] += 1
        if not progress:
            break
    return {p: t.cpu() for p, t in perms.items()}
