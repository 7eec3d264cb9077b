"""OT fusion (Singh & Jaggi): layer-wise optimal-transport alignment of K models, then averaging.

Layer by layer, in forward order, each model's units are transported onto the target's units.
For permutation ℓ (a layer's output units) and model k:

1. input side: the previous layers' maps are applied, :math:`\\hat W_k = W_k\\,\\tilde T_{k,\\ell-1}^{\\top}`;
2. ground cost between target unit i and model unit j: the Euclidean distance of their incoming
   weights (``mode="weights"``) or of their activations on the same data (``mode="activations"``);
3. transport :math:`T \\in \\mathbb R_+^{m \\times n}` with marginals α (target, m units) and β
   (model, n units), uniform or proportional to the units' incoming-weight L1 norm
   (``histogram="importance"``): exact (a permutation, via linear assignment; needs m = n and
   uniform histograms) or entropic, ``sinkhorn(C / max C, α, β, reg)``;
4. :math:`\\tilde T = \\mathrm{diag}(1/\\alpha)\\,T` (rows sum to one: each target unit is a convex
   combination of model units) maps the layer's outputs: :math:`W_k \\leftarrow \\tilde T \\hat W_k`.

The fused parameters are :math:`\\sum_k w_k \\tilde W_k`. With a target of a different width the
result has the target's width (soft alignment compresses or expands the layers).

Transformers (GPT-2 / Llama specs; Imfeld et al.'s transformer fusion): the residual stream is one
transport map shared by every layer that reads or writes it (embeddings, norms, the output head, and
through them every projection), LayerNorm/RMSNorm parameters follow it, each FFN gets its own map,
and attention heads are transported one to one: the head pairing (key/value groups under GQA) and,
per pair, the permutation of each per-head dimension group (value dims; GPT-2's query/key dims) are
exact assignments on the squared distances of the heads' weights with the residual map already
applied (a head pair's cost is the optimal cost of its dimension assignments plus the distance of
its windows that no dimension permutation acts on, e.g. rotary Q/K). Residual and FFN widths may
differ from the target's (soft OT); head counts and head_dim may not.

References: Singh & Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020; Imfeld, Graldi,
Giordano, Hofmann, Anagnostidis & Singh, "Transformer Fusion with Optimal Transport", ICLR 2024.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import ConfigError, ShapeMismatchError
from .. import ops
from ._transport import head_groups, map_axis, one_hot, unit_rows
from .activation_matching import unit_statistics
from .builders import infer_permutation_spec
from .spec import PermutationSpec
from .weight_matching import slot_view


def _sd(m) -> Mapping[str, torch.Tensor]:
    return m.state_dict() if isinstance(m, nn.Module) else m


def _histogram(kind: str, rows: torch.Tensor) -> torch.Tensor:
    if kind == "uniform":
        return torch.full((rows.shape[0],), 1.0 / rows.shape[0], dtype=torch.float64)
    imp = rows.abs().sum(1).double()
    return imp / imp.sum()


def ot_fusion(models: Sequence, *, spec: PermutationSpec | None = None, mode: str = "weights", exact: bool = False,
              reg: float = 0.01, histogram: str = "uniform", weights: Sequence[float] | None = None,
              target: int | Mapping[str, torch.Tensor] = 0, batches: Iterable | None = None,
              max_iter: int = 1000, backend: str | None = None) -> dict[str, torch.Tensor]:
    """Fuse K models of one architecture by layer-wise optimal transport (OTFusion).

    Parameters
    ----------
    models : K ``nn.Module`` s or state dicts (modules are required for ``mode="activations"``)
    spec : the models' :class:`PermutationSpec` (default: inferred from ``models[0]``): MLP, VGG,
        ResNet or transformer (GPT-2 / Llama, GQA) specs
    mode : ``"weights"`` (incoming weights as the unit's features) or ``"activations"``
    exact : True: exact OT (a permutation per layer; equal widths, uniform histograms);
        False: entropic OT with ``reg`` (relative to the largest ground cost)
    reg : entropic regularisation, > 0
    histogram : ``"uniform"`` or ``"importance"`` (mass ∝ L1 norm of the unit's incoming weights)
    weights : K averaging weights (default 1/K each)
    target : index of the model whose geometry the others are mapped onto (it is not transported),
        or a state dict of the same architecture with other widths (every model is transported onto it)
    batches : model inputs for ``mode="activations"``
    max_iter : Sinkhorn iterations

    Returns
    -------
    The fused state dict, shaped like the target.

    Example
    -------
    >>> fused = ot_fusion([model_a, model_b], exact=True)
    >>> model.load_state_dict(fused)
    """
    where = "ot_fusion"
    models = list(models)
    if len(models) < 2:
        raise ConfigError(f"{where}: need at least two models, got {len(models)}")
    if mode not in ("weights", "activations"):
        raise ConfigError(f"{where}: mode={mode!r}; use 'weights' or 'activations'")
    if histogram not in ("uniform", "importance"):
        raise ConfigError(f"{where}: histogram={histogram!r}; use 'uniform' or 'importance'")
    if not exact and not reg > 0:
        raise ConfigError(f"{where}: reg={reg} must be > 0 for entropic OT (or pass exact=True)")
    K = len(models)
    w = [1.0 / K] * K if weights is None else [float(x) for x in weights]
    if len(w) != K:
        raise ConfigError(f"{where}: got {len(w)} weights for {K} models")
    if spec is None:
        if not isinstance(models[0], nn.Module):
            raise ConfigError(f"{where}: pass spec= when the models are state dicts")
        spec = infer_permutation_spec(models[0])
    groups = head_groups(spec, where)
    if groups and mode != "weights":
        raise ConfigError(f"{where}: transformer specs (attention heads) are fused with mode='weights'")
    sds = [_sd(m) for m in models]
    if isinstance(target, int):
        if not 0 <= target < K:
            raise ConfigError(f"{where}: target={target} is not a model index (0..{K - 1})")
        target_sd, target_index = sds[target], target
    else:
        target_sd, target_index = target, None
    for k, sd in enumerate(sds):
        for name, shape in spec.param_shapes.items():
            if name not in sd:
                raise ConfigError(f"{where}: models[{k}] has no tensor {name!r} that the spec needs")
            if tuple(sd[name].shape) != shape:
                raise ShapeMismatchError(f"{where}: models[{k}][{name!r}] has shape {tuple(sd[name].shape)}, "
                                         f"the spec expects {shape}")
    for name in sds[0]:
        if name not in target_sd:
            raise ConfigError(f"{where}: the target has no tensor {name!r}")
    stats = None
    if mode == "activations":
        if batches is None or not all(isinstance(m, nn.Module) for m in models):
            raise ConfigError(f"{where}: mode='activations' needs nn.Module models and batches=")
        if target_index is None:
            raise ConfigError(f"{where}: mode='activations' needs target to be one of the models (an index)")
        stats = unit_statistics(spec, models, batches)

    table = spec.axis_perms()
    in_groups = {q for dims in groups.values() for q in dims}
    m_sizes = {p: _target_width(spec, p, target_sd) for p in spec.perm_sizes if p not in in_groups and p not in groups}
    maps: list[dict[str, torch.Tensor]] = [dict() for _ in range(K)]
    done: set[str] = set()
    for p in spec.layer_order:
        if p in in_groups:
            continue  # transported with its heads
        if p in groups:
            for k in range(K):
                if k != target_index:
                    maps[k].update(_head_maps(spec, table, p, groups[p], target_sd, sds[k], maps[k], backend))
            done.update((p, *groups[p]))
            continue
        n, m = spec.perm_sizes[p], m_sizes[p]
        ready = [s for s in spec.slots[p] if not s.param.endswith(("running_mean", "running_var"))
                 and all(q in done or q == p for q in _param_perms(table, s.param))]
        if not ready and mode == "weights":
            raise ConfigError(f"{where}: permutation {p!r} has no weight whose other axes are already aligned")
        t_rows = torch.cat([unit_rows(target_sd[s.param].double(), s, m) for s in ready], 1) if ready else None
        for k in range(K):
            if k == target_index:
                continue
            rows = torch.cat([unit_rows(_mapped(sds[k][s.param].double(), table, s, maps[k]), s, n)
                              for s in ready], 1) if ready else None
            if mode == "weights":
                cost = ops.cost_matrix(t_rows, rows, metric="euclidean", backend=backend)
            else:
                st = stats[p]
                e2 = st.outer.diagonal() / st.count
                cross = st.block(st.outer, target_index, k) / st.count
                ti, kj = target_index * n, k * n
                cost = (e2[ti:ti + n, None] + e2[None, kj:kj + n] - 2 * cross).clamp_min(0).sqrt()
            alpha = _histogram(histogram, t_rows) if t_rows is not None else _histogram("uniform", cost)
            beta = _histogram(histogram, rows) if rows is not None else _histogram("uniform", cost.T)
            if exact:
                if m != n or histogram != "uniform":
                    raise ConfigError(f"{where}: exact=True needs equal widths and uniform histograms ({p!r}: "
                                      f"target {m}, model {n} units, histogram={histogram!r}); use exact=False")
                _, cols = ops.linear_assignment(cost, backend=backend)
                tmap = torch.zeros(m, n, dtype=torch.float64)
                tmap[torch.arange(m), cols] = 1.0
            else:
                scaled = cost / cost.max().clamp_min(1e-30)
                plan = ops.sinkhorn(scaled, alpha.to(scaled.dtype), beta.to(scaled.dtype), reg=reg,
                                     max_iter=max_iter, backend=backend).plan.double()
                tmap = plan / plan.sum(1, keepdim=True).clamp_min(1e-300)
            maps[k][p] = tmap
        done.add(p)

    fused = {}
    for name, ref in target_sd.items():
        acc = None
        for k in range(K):
            x = sds[k][name]
            if not x.is_floating_point():
                acc = x
                continue
            x = x.double()
            if name in spec.param_shapes and k != target_index:
                for axis in range(x.dim()):
                    for p, s in table.get((name, axis), ()):
                        x = map_axis(x, s, maps[k][p])
            acc = w[k] * x if acc is None else acc + w[k] * x
        fused[name] = acc.to(ref.dtype) if acc.is_floating_point() else ref.clone()
        if fused[name].shape != ref.shape:
            raise ShapeMismatchError(f"{where}: fused {name!r} has shape {tuple(fused[name].shape)} but the target "
                                     f"has {tuple(ref.shape)}; is a tensor permuted that the spec does not list?")
    return fused


def _param_perms(table: dict, param: str) -> set[str]:
    return {p for (name, _), entries in table.items() if name == param for p, _ in entries}


def _mapped(x: torch.Tensor, table: dict, slot, maps: dict) -> torch.Tensor:
    """``x`` with the maps of already-transported permutations applied on its axes other than ``slot.axis``."""
    for axis in range(x.dim()):
        if axis != slot.axis:
            for p, s in table.get((slot.param, axis), ()):
                if p in maps:
                    x = map_axis(x, s, maps[p])
    return x


def _head_maps(spec: PermutationSpec, table: dict, heads: str, dims: tuple[str, ...], target_sd, model_sd,
               maps: dict, backend) -> dict[str, torch.Tensor]:
    """Exact transport of one layer's heads and their per-head dimensions (module docstring), as one-hot maps."""
    G = spec.perm_sizes[heads]
    total = torch.zeros(G, G, dtype=torch.float64)
    covered = set()
    sigmas = {}
    for q in dims:
        c, d = spec.copies[q], spec.perm_sizes[q]
        if c != G:
            raise ConfigError(f"ot_fusion: {q!r} has {c} copies for {G} heads of {heads!r}")
        cost = torch.zeros(G, G, d, d, dtype=torch.float64)
        for s in spec.slots[q]:
            covered.add((s.param, s.axis, s.start))
            t = slot_view(target_sd[s.param].double(), s, d, c)
            x = slot_view(_mapped(model_sd[s.param].double(), table, s, maps), s, d, c)
            cost += ops.cost_matrix(t.reshape(G * d, -1), x.reshape(G * d, -1), metric="sqeuclidean",
                                    backend=backend).reshape(G, d, G, d).permute(0, 2, 1, 3)
        _, sigma = ops.linear_assignment(cost.reshape(G * G, d, d), backend=backend)  # [G·G, d]
        total += cost.reshape(G * G, d, d).gather(-1, sigma[..., None]).sum((1, 2)).reshape(G, G)
        sigmas[q] = sigma.reshape(G, G, d)
    for s in spec.slots[heads]:
        if (s.param, s.axis, s.start) in covered or s.param.endswith(("running_mean", "running_var")):
            continue
        t = slot_view(target_sd[s.param].double(), s, G, 1)[0]
        x = slot_view(_mapped(model_sd[s.param].double(), table, s, maps), s, G, 1)[0]
        total += ops.cost_matrix(t, x, metric="sqeuclidean", backend=backend)
    _, pairing = ops.linear_assignment(total, backend=backend)
    pairing = pairing.long()
    out = {heads: one_hot(pairing)}
    for q, sigma in sigmas.items():
        per_copy = torch.empty(G, spec.perm_sizes[q], dtype=torch.int64)
        per_copy[pairing] = sigma[torch.arange(G), pairing]
        out[q] = one_hot(per_copy)
    return out


def _target_width(spec: PermutationSpec, p: str, target_sd) -> int:
    s = spec.slots[p][0]
    if s.param not in target_sd:
        raise ConfigError(f"ot_fusion: the target has no tensor {s.param!r}")
    return target_sd[s.param].shape[s.axis] // s.inner
