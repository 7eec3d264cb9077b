"""ZipIt!: merge two models by matching features within and across the models, fully or partially.

For each zipped permutation ℓ (n units in each model), the 2n features of both models are
matched greedily by activation correlation ρ (streamed over the batches): repeatedly the most
correlated unmatched pair (i, j) is merged, same-model pairs included unless
``within_model=False``, until n merged features remain. This gives

* a merge matrix :math:`M \\in \\mathbb R^{n \\times 2n}` (merged feature r = mean of its pair) and
* an unmerge matrix :math:`U \\in \\mathbb R^{2n \\times n}` (each original feature reads its merged one),

split per model as :math:`M = [M_a\\ M_b]`, :math:`U = [U_a; U_b]`. A layer reading zipped inputs
and writing zipped outputs becomes :math:`W = M_a W_a U_a + M_b W_b U_b` (out axis ← M, in axes ← U);
a layer writing unzipped outputs (the classifier) becomes :math:`\\tfrac12 (W_a U_a + W_b U_b)`.

Partial zipping (``stop_at``) zips the permutations up to a chosen layer; each model keeps its own
remaining layers, which read the merged features through :math:`U_k`; the result is a two-headed
network whose output is the average of the heads.

The greedy matching runs in rounds: every unmatched pair that is each other's best match is merged
at once (these are exactly the pairs the one-at-a-time greedy picks, barring ties), so a round is a
few tensor operations, not a loop over units.

Reference: Stoica, Bolya, Bjorner, Ramesh, Hearn & Hoffman, "ZipIt! Merging Models from Different
Tasks without Training", ICLR 2024.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from ..errors import ConfigError
from ._transport import check_plain, map_axis
from .activation_matching import unit_statistics
from .builders import infer_permutation_spec
from .spec import PermutationSpec


def greedy_feature_matching(corr: torch.Tensor, n_models: int = 2, *, within_model: bool = True) -> torch.Tensor:
    """Pairs of the K·n features (K = 2) by greedy maximum correlation: int64 ``[n, 2]``.

    ``corr`` is the ``[2n, 2n]`` correlation of the concatenated features. ``within_model=False``
    forbids pairs from the same model (then the result is a cross-model matching).
    """
    size = corr.shape[0]
    n = size // n_models
    score = corr.double().clone()
    score.fill_diagonal_(float("-inf"))
    if not within_model:
        owner = torch.arange(size) // n
        score[owner[:, None] == owner[None, :]] = float("-inf")
    alive = torch.ones(size, dtype=torch.bool)
    pairs = []
    found = 0
    while found < n:
        s = score.masked_fill(~(alive[:, None] & alive[None, :]), float("-inf"))
        best = s.argmax(1)
        idx = torch.arange(size)
        mutual = alive & (best[best] == idx) & (idx < best) & torch.isfinite(s.max(1).values)
        if not mutual.any():
            raise ConfigError("greedy_feature_matching: no valid pair left (correlations are NaN?)")
        i = idx[mutual]
        j = best[mutual]
        take = min(len(i), n - found)
        if take < len(i):  # keep the strongest pairs of the last round
            order = s[i, j].argsort(descending=True)[:take]
            i, j = i[order], j[order]
        pairs.append(torch.stack([i, j], 1))
        alive[i] = False
        alive[j] = False
        found += take
    return torch.cat(pairs)


def merge_unmerge(pairs: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``M [n, 2n]`` (0.5 at both members of each pair) and unmerge ``U [2n, n]`` (1 at each member)."""
    m = torch.zeros(n, 2 * n, dtype=torch.float64)
    u = torch.zeros(2 * n, n, dtype=torch.float64)
    r = torch.arange(n)
    for col in (0, 1):
        m[r, pairs[:, col]] += 0.5
        u[pairs[:, col], r] = 1.0
    return m, u


def zipit(model_a: nn.Module, model_b: nn.Module, batches: Iterable, *, spec: PermutationSpec | None = None,
          stop_at: str | int | None = None, within_model: bool = True) -> nn.Module:
    """Merge two models of one architecture with ZipIt!, fully or up to a layer.

    Parameters
    ----------
    model_a, model_b : the models (not modified)
    batches : inputs to compute feature correlations on (see :func:`unit_statistics`)
    spec : their :class:`PermutationSpec` (default: inferred); permutations must act on whole axes
        (MLP, VGG, ResNet specs). The output axis of a weight is its axis 0 (Linear, Conv, norms).
    stop_at : None zips every permutation; a permutation name zips ``spec.layer_order`` up to and
        including it; an int zips that many permutations of ``spec.layer_order``. The zipped set
        must be closed: no zipped permutation may be written by a layer that reads an unzipped one.
    within_model : allow merging two features of the same model

    Returns
    -------
    A copy of ``model_a`` holding the zipped weights (full zip), or a :class:`PartialZip` whose
    forward averages the outputs of the two heads sharing the zipped layers. BatchNorm statistics
    of merged layers are merged like the weights; re-estimate them with
    :func:`fusion_engine.alignment.reset_batchnorm` for best accuracy.
    """
    where = "zipit"
    batches = list(batches)
    spec = infer_permutation_spec(model_a) if spec is None else spec
    check_plain(spec, where)
    order = list(spec.layer_order)
    if stop_at is None:
        zipped = order
    elif isinstance(stop_at, int):
        if not 1 <= stop_at <= len(order):
            raise ConfigError(f"{where}: stop_at={stop_at} must be between 1 and {len(order)}")
        zipped = order[:stop_at]
    else:
        if stop_at not in order:
            raise ConfigError(f"{where}: stop_at={stop_at!r} is not a permutation of the spec ({order})")
        zipped = order[:order.index(stop_at) + 1]
    zipped_set = set(zipped)
    axes = spec.axes_to_perm
    for name, per_axis in axes.items():
        out = per_axis[0]
        ins = [a for a in per_axis[1:] if a is not None]
        if out in zipped_set and any(q not in zipped_set for q in ins):
            raise ConfigError(f"{where}: {name!r} writes zipped {out!r} but reads unzipped "
                              f"{[q for q in ins if q not in zipped_set]}; choose stop_at at a layer boundary "
                              f"(e.g. the end of a ResNet stage)")
    stats = unit_statistics(spec, [model_a, model_b], batches, perms=zipped)
    mats = {}
    for p in zipped:
        if p not in stats:
            raise ConfigError(f"{where}: permutation {p!r} has no activation site; build the spec from the module")
        n = spec.perm_sizes[p]
        pairs = greedy_feature_matching(stats[p].correlation(), within_model=within_model)
        m, u = merge_unmerge(pairs, n)
        mats[p] = ((m[:, :n], m[:, n:]), (u[:n], u[n:]))
    sds = [model_a.state_dict(), model_b.state_dict()]
    heads = [dict(), dict()]
    merged = {}
    for name, ref in sds[0].items():
        per_axis = axes.get(name)
        if per_axis is None or not ref.is_floating_point() or not any(q in zipped_set for q in per_axis if q):
            for k in (0, 1):
                heads[k][name] = sds[k][name]
            continue
        parts = []
        for k in (0, 1):
            x = sds[k][name].double()
            for q in [a for a in per_axis if a is not None and a in zipped_set]:
                for s in spec.slots[q]:
                    if s.param != name:
                        continue
                    (m_a, m_b), (u_a, u_b) = mats[q]
                    if s.axis == 0:
                        x = map_axis(x, s, (m_a, m_b)[k])
                    else:
                        x = map_axis(x, s, (u_a, u_b)[k].T)
            parts.append(x)
        if per_axis[0] in zipped_set:
            merged[name] = (parts[0] + parts[1]).to(ref.dtype)
        else:  # reads zipped features, writes a model's own: each head keeps its own, reading through U_k
            for k in (0, 1):
                heads[k][name] = parts[k].to(ref.dtype)
    if len(zipped) == len(order):
        out = copy.deepcopy(model_a)
        state = {}
        for name, ref in sds[0].items():
            if name in merged:
                state[name] = merged[name]
            elif ref.is_floating_point():
                state[name] = ((heads[0][name].double() + heads[1][name].double()) / 2).to(ref.dtype)
            else:
                state[name] = ref.clone()
        out.load_state_dict(state)
        return out
    return PartialZip([_with_state(model_a, {**heads[0], **merged}), _with_state(model_a, {**heads[1], **merged})])


def _with_state(model: nn.Module, state: dict) -> nn.Module:
    out = copy.deepcopy(model)
    out.load_state_dict(state)
    return out


class PartialZip(nn.Module):
    """Two heads sharing identical zipped layers; ``forward`` averages their outputs.

    Each head is a full copy of the architecture (the zipped layers are identical in both, so they
    are computed once per head: simple, at the cost of recomputing the shared trunk).
    """

    def __init__(self, heads: list[nn.Module]):
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, *args, **kwargs):
        outs = [h(*args, **kwargs) for h in self.heads]
        return sum(outs) / len(outs)
