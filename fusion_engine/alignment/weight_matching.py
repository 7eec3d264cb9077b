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
from .. import ops
from .spec import AxisSlot, PermutationSpec, axis_index_map, check_perms, check_state_dict, invert

IMPROVEMENT_TOL = 1e-12
CONCAT_ELEMENTS = 1 << 17  # slots of a group share one matrix product up to this many elements of B


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

    def whole_axis(self, perm: str, slot: AxisSlot) -> bool:
        """Whether ``perm`` acts on the whole axis, alone, as one ``[n]`` permutation."""
        spec = self.spec
        return (spec.copies.get(perm, 1) == 1 and slot.start == 0 and slot.outer == 1 and slot.inner == 1
                and spec.perm_sizes[perm] == spec.param_shapes[slot.param][slot.axis]
                and len(self.axis_entries[(slot.param, slot.axis)]) == 1)

    def gathers(self, perm: str, slot: AxisSlot) -> list[tuple[int, str]] | None:
        """For a slot whose weight is permuted only along whole axes, by other permutations:
        ``(dim, q)`` per other permutation ``q``, ``dim`` its axis once ``slot.axis`` is moved first.
        None for any other slot (windows, copies, shared axes: the general path handles those)."""
        if not self.whole_axis(perm, slot):
            return None
        out = []
        for axis in self.param_axes[slot.param]:
            if axis != slot.axis:
                (q, s), *more = self.axis_entries[(slot.param, axis)]
                if more or q == perm or not self.whole_axis(q, s):
                    return None
                out.append((axis + 1 if axis < slot.axis else axis, q))
        return out


class _Contribution:
    """A part of one permutation's cost matrix −S_ℓ, cached until a permutation it depends on changes."""

    deps: tuple[str, ...]

    def __init__(self):
        self.key: tuple[int, ...] | None = None
        self.cost: torch.Tensor | None = None

    def get(self, perms, versions, identities) -> torch.Tensor:
        key = tuple(versions[q] for q in self.deps)
        if key != self.key:
            self.cost, self.key = self.compute(perms, identities), key
        return self.cost


class _WholeAxisGroup(_Contribution):
    """The slots of one permutation that act on whole axes and depend on the same other permutations.

    Each slot's windows have the units as rows (``axis`` moved first, flattened to [n, F]); A's are
    laid out once per call and never permuted. A recomputation gathers B's windows by the other
    permutations straight into preallocated buffers (one ``index_select`` per slot and permutation)
    and adds up ``cost_matrix(x, y, "inner") = −x yᵀ``. Small slots are concatenated,
    ``x = [W_a1 | W_a2 | …]``, ``y`` alike, into one matrix product (fewer calls); large ones keep
    their own contiguous buffers (a strided gather into a shared buffer costs more than the extra
    n × n addition). Slots that depend on no other permutation are one product computed once."""

    def __init__(self, deps, parts, dtype, backend):
        super().__init__()
        self.deps, self.backend = deps, backend
        n = parts[0][0].shape[0]
        xs = [a.to(dtype).reshape(n, -1) for a, _, _ in parts]
        bs = [b.to(dtype) if gathers else b.to(dtype).reshape(n, -1) for _, b, gathers in parts]
        gathers = [g for _, _, g in parts]
        width = sum(x.shape[1] for x in xs)
        if not deps or n * width <= CONCAT_ELEMENTS:
            x = xs[0] if len(xs) == 1 else torch.cat(xs, 1)
            if not deps:
                self.products = [(x, bs[0] if len(bs) == 1 else torch.cat(bs, 1), [])]
                return
            y = torch.empty(n, width, dtype=dtype, device=x.device)
            fills, col = [], 0
            for b, g in zip(bs, gathers):
                f = b[0].numel()
                fills.append((b, g, y[:, col:col + f].view(b.shape)))
                col += f
            self.products = [(x, y, fills)]
        else:
            self.products = []
            for x, b, g in zip(xs, bs, gathers):
                b = b.contiguous()
                y = torch.empty_like(b)
                self.products.append((x, y.view(x.shape), [(b, g, y)]))

    def compute(self, perms, identities) -> torch.Tensor:
        total = None
        for x, y, fills in self.products:
            if len(fills) == 1 and all(q in identities for _, q in fills[0][1]):
                fills, y = (), fills[0][0].reshape(x.shape)  # nothing to gather: B as laid out
            for b, gathers, out in fills:
                for dim, q in gathers[:-1]:
                    b = b.index_select(dim, perms[q])
                dim, q = gathers[-1]
                torch.index_select(b, dim, perms[q], out=out)
            c = ops.cost_matrix(x, y, metric="inner", backend=self.backend)
            total = c if total is None else total.add_(c)
        return total.unsqueeze(0)


class _GeneralSlot(_Contribution):
    """One slot of any shape (windows, per-head copies, several permutations on one axis)."""

    def __init__(self, features: _SlotFeatures, perm, slot, w_a, w_b, backend):
        super().__init__()
        self.features, self.perm, self.slot, self.w_a, self.w_b = features, perm, slot, w_a, w_b
        self.deps, self.backend = features.dependencies(perm, slot), backend

    def compute(self, perms, identities) -> torch.Tensor:
        a, b = self.features.pair(self.perm, self.slot, self.w_a, self.w_b, perms)
        dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
        return ops.cost_matrix(a.to(dtype), b.to(dtype), metric="inner", backend=self.backend)


def _independent(parts: list[_Contribution], perm: str) -> bool:
    """Whether the cost summed from ``parts`` stays the same when ``perm`` changes (none depends on it)."""
    return all(perm not in part.deps for part in parts)


def _copy_to_host(c: torch.Tensor):
    """``c`` on the host: a non-blocking copy into pinned memory and its CUDA event, or ``(c, None)`` on the CPU."""
    if c.device.type != "cuda":
        return c, None
    host = torch.empty(c.shape, dtype=c.dtype, pin_memory=True)
    host.copy_(c, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _contributions(features: _SlotFeatures, perm: str, slots, params_a, params_b, backend) -> list[_Contribution]:
    """``perm``'s cost matrix as a sum of cached parts: whole-axis slots grouped by their dependencies."""
    groups: dict[tuple[str, ...], list] = {}
    dtypes: dict[tuple[str, ...], torch.dtype] = {}
    out: list[_Contribution] = []
    for s in slots:
        w_a, w_b = params_a[s.param], params_b[s.param]
        gathers = features.gathers(perm, s)
        if gathers is None:
            out.append(_GeneralSlot(features, perm, s, w_a, w_b, backend))
            continue
        deps = tuple(sorted({q for _, q in gathers}))
        groups.setdefault(deps, []).append((w_a.movedim(s.axis, 0), w_b.movedim(s.axis, 0), gathers))
        wide = torch.float64 in (w_a.dtype, w_b.dtype) or dtypes.get(deps) == torch.float64
        dtypes[deps] = torch.float64 if wide else torch.float32
    out += [_WholeAxisGroup(deps, parts, dtypes[deps], backend) for deps, parts in groups.items()]
    return out


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

    The assignment is solved on the cost :math:`-S_\\ell` (``linear_assignment``, batched over the
    copies of a per-head permutation), a sum of ``cost_matrix(A_slot, B_slot, metric="inner")``
    over the permutation's slots. Slots that act on whole axes are grouped by the other
    permutations they depend on; a group is one cached part, rebuilt only when one of those
    permutations has changed since (B gathered by them into a preallocated buffer, A never
    permuted), and small slots of a group share one matrix product. Other slots (windows, per-head
    copies, several permutations on one axis) are parts of their own. A permutation none of whose
    inputs changed since its last solve is not solved again (its cost, hence its assignment, is the
    same). The objective before and after each step is read off the same matrix (a gather; no extra
    products). Work per call: one
    layout copy of each weight's non-leading permuted axis for A and B, then about 1.5 sweeps'
    worth of products for the usual 2 sweeps (the contributions that did not change are reused). On a GPU
    every product stays on the device; only each cost matrix goes to the host for the LAP solve (a
    non-blocking copy), and while the host solves it the device already computes the next permutation's
    cost when that cost does not depend on the one being solved (same result as one after the other).

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
    parts = {p: _contributions(features, p, slots[p], params_a, params_b, backend) for p in names}
    versions = {p: 0 for p in names}
    identities = {p for p, t in perms.items()  # B needs no gather along these
                  if torch.equal(t, torch.arange(t.shape[-1], device=device).expand_as(t))}
    g = torch.Generator().manual_seed(seed)

    def cost(p: str) -> torch.Tensor:
        """−S_p, [copies, n, n]: the sum of p's cached parts (only those whose dependencies changed are rebuilt)."""
        first, *rest = (part.get(perms, versions, identities) for part in parts[p])
        if not rest:
            return first
        total = first + rest[0]
        for c in rest[1:]:
            total += c
        return total

    def inputs(p: str) -> tuple[int, ...]:
        """The versions of the permutations p's cost depends on (equal versions: equal cost)."""
        return tuple(versions[q] for part in parts[p] for q in part.deps)

    solved_at: dict[str, tuple[int, ...]] = {}  # p's inputs when p was last solved
    for _ in range(max_iter):
        progress = False
        order = [names[j] for j in torch.randperm(len(names), generator=g).tolist()]
        ahead: tuple[str, torch.Tensor] | None = None  # a cost computed early, and whose it is
        for i, p in enumerate(order):
            if solved_at.get(p) == inputs(p):
                continue  # the same cost as at p's last solve: the same assignment, no progress
            solved_at[p] = inputs(p)
            c = ahead[1] if ahead is not None and ahead[0] == p else cost(p)
            host, copied = _copy_to_host(c)
            # the device computes the next cost while the host solves this LAP, when p's result cannot change it
            nxt = order[i + 1] if i + 1 < len(order) else None
            ahead = None
            if nxt is not None and _independent(parts[nxt], p) and solved_at.get(nxt) != inputs(nxt):
                ahead = (nxt, cost(nxt))
            if copied is not None:
                copied.synchronize()
            _, cols = ops.linear_assignment(host, backend=backend)  # min −S = max S
            cols = cols.to(device)
            old = perms[p].reshape(cols.shape)
            old_value = -c.gather(-1, old[..., None]).double().sum()  # ⟨S, P_old⟩: a gather, no GEMM
            new_value = -c.gather(-1, cols[..., None]).double().sum()
            progress = progress or bool(new_value > old_value + IMPROVEMENT_TOL)
            if not torch.equal(cols, old):
                perms[p] = cols.reshape(perms[p].shape)
                versions[p] += 1
                identities.discard(p)
        if not progress:
            break
    return {p: t.cpu() for p, t in perms.items()}
