"""Many models into one shared universe: MergeMany (Git Re-Basin, Algorithm 3) for weights and activations.

Aligning K models pairwise to a reference makes the result depend on that reference; MergeMany
aligns every model to the *universe*, the average of the others as currently aligned, and repeats
until no permutation changes:

.. math::  \\pi_k \\leftarrow \\arg\\max_{\\pi}
           \\Big\\langle \\tfrac{1}{K-1} \\sum_{j \\ne k} \\pi_j(\\theta_j),\\ \\pi(\\theta_k) \\Big\\rangle

(weight matching, :func:`weight_matching_many`) or the correlation of each unit's activations with
the average aligned activation of the other models (:func:`activation_matching_many`). The models
are visited in a seeded random order per sweep. Every model gets a permutation into the same
universe, so the alignments are cycle-consistent by construction: the map from model i to model j is
:math:`\\pi_j^{-1} \\circ \\pi_i`.

The activation variant streams the first and second moments of all K models' units once
(:func:`unit_statistics`); every sweep then works on the blocks of that covariance (the universe's
covariance with model k is :math:`\\tfrac{1}{K-1}\\sum_j C_{jk}[\\pi_j, :]`), with no further forward pass.

Reference: Ainsworth, Hayase & Srinivasa, "Git Re-Basin", ICLR 2023, Appendix (MergeMany).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .activation_matching import CORRELATION_EPS, assign_from_correlation, unit_statistics
from .merge import interpolate_many
from .spec import PermutationSpec, apply_permutation, axis_index_map, check_state_dict
from .weight_matching import weight_matching


def _check_count(models, where):
    if len(models) < 2:
        raise ConfigError(f"{where}: need at least two models, got {len(models)}")


def _changed(old, new) -> bool:
    return any(not torch.equal(old[p], new[p]) for p in new)


def weight_matching_many(spec: PermutationSpec, state_dicts: Sequence[Mapping[str, torch.Tensor]], *,
                         max_sweeps: int = 20, seed: int = 0,
                         backend: str | None = None) -> list[dict[str, torch.Tensor]]:
    """One permutation set per model, aligning all K models to their shared average (MergeMany).

    Returns
    -------
    list of K dicts permutation name → int64 tensor; ``apply_permutation(spec, state_dicts[k], perms[k])``
    are the aligned models (average them with :func:`interpolate_many`).
    """
    where = "weight_matching_many"
    sds = list(state_dicts)
    _check_count(sds, where)
    for k, sd in enumerate(sds):
        check_state_dict(spec, sd, where, f"state_dicts[{k}]")
    K = len(sds)
    perms = [spec.identity() for _ in range(K)]
    aligned = [dict(sd) for sd in sds]
    g = torch.Generator().manual_seed(seed)
    for _ in range(max_sweeps):
        changed = False
        for k in torch.randperm(K, generator=g).tolist():
            universe = interpolate_many([aligned[j] for j in range(K) if j != k])
            new = weight_matching(spec, universe, sds[k], init_perms=perms[k], seed=seed, backend=backend)
            if _changed(perms[k], new):
                perms[k], aligned[k], changed = new, apply_permutation(spec, sds[k], new), True
        if not changed:
            break
    return perms


def _feature_map(spec: PermutationSpec, p: str, perms: Mapping[str, torch.Tensor], width: int) -> torch.Tensor:
    """Gather map of the aligned features at ``p``'s site: ``perms[p]``, or for attention heads the heads and
    per-head dims composed on the output projection's input axis."""
    if p not in spec.head_dims:
        return perms[p]
    module = spec.activation_sites[p][0].partition(":")[0]
    slot = next(s for s in spec.slots[p] if s.param == f"{module}.weight")
    return axis_index_map(spec, spec.axis_perms()[(slot.param, slot.axis)], perms, width)


def activation_matching_many(spec: PermutationSpec, models: Sequence[nn.Module], batches: Iterable, *,
                             max_sweeps: int = 20, seed: int = 0,
                             backend: str | None = None) -> list[dict[str, torch.Tensor]]:
    """One permutation set per model, aligning every model's activations to the others' average (MergeMany).

    ``batches`` as in :func:`unit_statistics` (all models see the same inputs). Permutations follow
    :func:`activation_matching` (heads with their value dimensions; GPT-2's query/key dims stay identities).
    """
    where = "activation_matching_many"
    models = list(models)
    _check_count(models, where)
    stats = unit_statistics(spec, models, batches)
    K = len(models)
    perms = [spec.identity() for _ in range(K)]
    g = torch.Generator().manual_seed(seed)
    for p, st in stats.items():
        cov, w = st.covariance(), st.n_units
        blocks = [[cov[i * w:(i + 1) * w, j * w:(j + 1) * w] for j in range(K)] for i in range(K)]
        for _ in range(max_sweeps):
            changed = False
            for k in torch.randperm(K, generator=g).tolist():
                others = [j for j in range(K) if j != k]
                maps = {j: _feature_map(spec, p, perms[j], w) for j in others}
                cross = sum(blocks[j][k][maps[j]] for j in others) / len(others)  # cov(universe_i, x_k,l)
                var_u = sum(blocks[i][j][maps[i][:, None], maps[j][None, :]].diagonal()
                            for i in others for j in others) / len(others) ** 2
                std_k = blocks[k][k].diagonal().clamp_min(0).sqrt()
                corr = cross / (var_u.clamp_min(0).sqrt()[:, None] * std_k[None, :] + CORRELATION_EPS)
                new = assign_from_correlation(spec, p, corr, backend)
                if _changed({q: perms[k][q] for q in new}, new):
                    perms[k].update(new)
                    changed = True
            if not changed:
                break
    return perms
