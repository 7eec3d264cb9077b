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

Transformers (GPT-2 / Llama specs): the residual stream and each FFN are zipped as above (the norms'
parameters are merged like the features they scale); attention heads are zipped one to one across
the models, A's head g with B's head π(g) and its value dimensions by σ, π and σ from activation
matching's joint head/dimension assignment (merging two heads of one model is not defined: the
softmax of each head mixes its own dimensions). A transformer is zipped whole (the residual stream
runs through every layer).

Reference: Stoica, Bolya, Bjorner, Ramesh, Hearn & Hoffman, "ZipIt! Merging Models from Different
Tasks without Training", ICLR 2024.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from ..errors import ConfigError
from ._transport import head_groups, map_axis, one_hot
from .activation_matching import match_heads, unit_statistics
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


def _head_merges(spec: PermutationSpec, heads: str, stats) -> dict:
    """Merge/unmerge matrices of one layer's heads and per-head dims: A's head g and B's head π(g) (dims
    by σ) averaged, π and σ from :func:`match_heads`; the ½ sits on the heads (dims share their axis)."""
    dims = spec.head_dims[heads]
    G = spec.perm_sizes[heads]
    pairing, sigma = match_heads(stats.block(stats.correlation(), 0, 1), G,
                                 spec.perm_sizes[dims] if dims else None)
    out = {heads: _one_to_one(one_hot(pairing), 0.5)}
    if dims:
        out[dims] = _one_to_one(one_hot(sigma), 1.0)
    for q in head_groups(spec, "zipit")[heads]:
        if q != dims:  # GPT-2's query/key dims: activation matching leaves them as they are
            eye = torch.eye(spec.perm_sizes[q], dtype=torch.float64).expand(spec.copies[q], -1, -1)
            out[q] = _one_to_one(eye, 1.0)
    return out


def _one_to_one(p_b: torch.Tensor, weight: float):
    """``((M_a, M_b), (U_a, U_b))`` of a one-to-one merge: merged i = weight·(a_i + b_{π(i)})."""
    eye = torch.eye(p_b.shape[-1], dtype=torch.float64).expand_as(p_b)
    return (weight * eye, weight * p_b), (eye, p_b.transpose(-1, -2))


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
    spec : their :class:`PermutationSpec` (default: inferred): MLP, VGG, ResNet or GPT-2 / Llama (GQA)
        specs; which axes a tensor reads and writes comes from the slots (:attr:`AxisSlot.is_input`).
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
    groups = head_groups(spec, where)
    if groups and stop_at is not None:
        raise ConfigError(f"{where}: a transformer's residual stream runs through every layer, so it is zipped "
                          f"whole; leave stop_at=None")
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
    table = spec.axis_perms()
    writes: dict[str, set[str]] = {}
    reads: dict[str, set[str]] = {}
    for (name, _), entries in table.items():
        for q, s in entries:
            (reads if s.is_input else writes).setdefault(name, set()).add(q)
    for name in writes:
        out, ins = writes[name], reads.get(name, set())
        if out & zipped_set and ins - zipped_set:
            raise ConfigError(f"{where}: {name!r} writes zipped {sorted(out & zipped_set)} but reads unzipped "
                              f"{sorted(ins - zipped_set)}; choose stop_at at a layer boundary "
                              f"(e.g. the end of a ResNet stage)")
    in_groups = {q for dims in groups.values() for q in dims}
    stats = unit_statistics(spec, [model_a, model_b], batches, perms=[p for p in zipped if p not in in_groups])
    mats = {}
    for p in zipped:
        if p in in_groups:
            continue
        if p in groups:  # heads are zipped one to one, across the models (module docstring)
            mats.update(_head_merges(spec, p, stats[p]))
            continue
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
        touched = writes.get(name, set()) | reads.get(name, set())
        if not ref.is_floating_point() or not touched & zipped_set:
            for k in (0, 1):
                heads[k][name] = sds[k][name]
            continue
        parts = []
        for k in (0, 1):
            x = sds[k][name].double()
            for axis in range(x.dim()):
                for q, s in table.get((name, axis), ()):
                    if q in zipped_set:
                        (m_a, m_b), (u_a, u_b) = mats[q]
                        x = map_axis(x, s, (u_a, u_b)[k].transpose(-1, -2) if s.is_input else (m_a, m_b)[k])
            parts.append(x)
        if writes.get(name, set()) & zipped_set:
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
