"""Activation matching: align units whose activations are most correlated on the same data.

For each permutation ℓ with activation sites, stream over the batches the first and second moments
of the concatenated unit activations of the models (every spatial position / token is a sample),
then solve

.. math::  P_\\ell = \\arg\\max_P \\sum_i \\rho\\big(a_i, b_{P(i)}\\big), \\qquad
           \\rho(a_i, b_j) = \\frac{E[a_i b_j] - E[a_i] E[b_j]}{\\sigma(a_i)\\,\\sigma(b_j) + \\varepsilon}

one linear assignment per permutation. Statistics are accumulated in float64 with forward hooks;
no activation is kept beyond its batch.

Attention heads (a spec's ``head_dims``): the input of the output projection holds, per query head,
``head_dim`` value features; with grouped-query attention ``r`` consecutive query heads share a
key/value head g. With C the cross-correlation of A's and B's features viewed as
``[G, r, d] × [G, r, d]``, the score of A's group g against B's group g' is

.. math::  V_{gg'} = \\max_{\\sigma} \\sum_{q < r} \\sum_{k < d} C_{(g,q,k),(g',q,\\sigma(k))}

(one batched d × d assignment for all G² pairs; the identity σ when the spec does not permute head
dimensions), and the heads are the assignment maximising :math:`\\sum_g V_{g\\pi(g)}`; B's head
π(g) gets the dimension permutation σ of the pair (g, π(g)). GPT-2's query/key dimensions are left
as they are (attention scores are invariant to them; weight matching aligns them).

Reference: Ainsworth et al., "Git Re-Basin", ICLR 2023 (§3.1); Li et al., "Convergent Learning",
ICLR 2016.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .. import ops
from .spec import PermutationSpec

CORRELATION_EPS = 1e-8


@dataclass
class UnitStatistics:
    """Moments of the concatenated unit activations ``x = [x_1; …; x_K]`` of K models at one permutation."""

    count: int
    sum: torch.Tensor  # [K·n]
    outer: torch.Tensor  # [K·n, K·n], Σ x xᵀ
    n_units: int

    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    def covariance(self) -> torch.Tensor:
        m = self.mean()
        return self.outer / self.count - m[:, None] * m[None, :]

    def correlation(self) -> torch.Tensor:
        cov = self.covariance()
        std = cov.diagonal().clamp_min(0).sqrt()
        return cov / (std[:, None] * std[None, :] + CORRELATION_EPS)

    def block(self, matrix: torch.Tensor, i: int, j: int) -> torch.Tensor:
        n = self.n_units
        return matrix[i * n:(i + 1) * n, j * n:(j + 1) * n]


def _units(t, where: str) -> torch.Tensor:
    """Activations as ``[samples, units]``: channel dim 1 of 2-D/4-D outputs, the last dim of 3-D ones."""
    if isinstance(t, (tuple, list)):
        t = t[0]
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"activation site {where!r} produced a {type(t).__name__}, not a tensor")
    if t.dim() == 2:
        return t
    if t.dim() == 3:
        return t.reshape(-1, t.shape[-1])
    if t.dim() >= 4:
        return t.movedim(1, -1).reshape(-1, t.shape[1])
    raise ConfigError(f"activation site {where!r} produced a {t.dim()}-D tensor; expected 2-D, 3-D or 4-D")


def _run(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@torch.no_grad()
def unit_statistics(spec: PermutationSpec, models: Sequence[nn.Module], batches: Iterable,
                    perms: Sequence[str] | None = None) -> dict[str, UnitStatistics]:
    """Stream the moments of every model's activations at each permutation's sites over ``batches``.

    ``batches`` yields model inputs (a tensor, a tuple of positional arguments or a dict of keyword
    arguments; a ``(x, y)`` pair from a DataLoader: pass ``(x for x, _ in loader)``). Every model
    sees the same batches, in eval mode (their training flags are restored afterwards).
    """
    names = [p for p in (perms if perms is not None else spec.perm_sizes) if spec.activation_sites.get(p)]
    if not names:
        raise ConfigError("unit_statistics: the spec has no activation sites; build it from the nn.Module "
                          "(e.g. mlp_permutation_spec(model)) rather than from a state dict")
    K = len(models)
    current: list[dict[str, list[torch.Tensor]]] = [dict() for _ in range(K)]
    handles = []
    active = [-1]
    for k, model in enumerate(models):
        modules = dict(model.named_modules())
        for p in names:
            if spec.copies.get(p, 1) > 1:
                continue
            for site in spec.activation_sites[p]:
                mod_name, _, kind = site.partition(":")
                if mod_name not in modules:
                    raise ConfigError(f"unit_statistics: model {k} has no module {mod_name!r} (activation site of {p!r})")

                def hook(_m, args, out, k=k, p=p, site=site, kind=kind):
                    if active[0] != k:  # the same module object may be hooked for two models
                        return
                    x = _units(args if kind == "input" else out, site)
                    current[k].setdefault(p, []).append(x.detach().double())

                handles.append(modules[mod_name].register_forward_hook(hook))
    stats: dict[str, UnitStatistics] = {}
    flags = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        for batch in batches:
            for k, model in enumerate(models):
                current[k].clear()
                active[0] = k
                _run(model, batch)
            for p in names:
                if p not in current[0]:
                    continue
                x = torch.cat([torch.cat(current[k][p], 0) for k in range(K)], 1)  # [samples, K·n]
                n = spec.perm_sizes[p]
                if x.shape[1] != K * n and not (p in spec.head_dims and x.shape[1] % (K * n) == 0):
                    raise ConfigError(f"unit_statistics: sites of {p!r} produced {x.shape[1] // K} units, the spec "
                                      f"says {n}")
                s = stats.get(p)
                if s is None:
                    stats[p] = UnitStatistics(x.shape[0], x.sum(0), x.T @ x, x.shape[1] // K)
                else:
                    s.count += x.shape[0]
                    s.sum += x.sum(0)
                    s.outer += x.T @ x
    finally:
        for h in handles:
            h.remove()
        for m, f in zip(models, flags):
            m.train(f)
    if not stats:
        raise ConfigError("unit_statistics: batches was empty; pass at least one batch of inputs")
    return stats


def activation_matching(spec: PermutationSpec, model_a: nn.Module, model_b: nn.Module, batches: Iterable, *,
                        backend: str | None = None) -> dict[str, torch.Tensor]:
    """Permutations of B's units maximising the correlation of their activations with A's.

    Parameters
    ----------
    spec : a spec built from the module (so it has ``activation_sites``)
    model_a, model_b : the two models (same architecture); not modified
    batches : iterable of inputs both models are run on (see :func:`unit_statistics`)
    backend : forwarded to :func:`fusion_engine.ops.linear_assignment`

    Returns
    -------
    dict permutation name → int64 tensor, for :func:`apply_permutation` on B. Attention heads and
    their value dimensions are matched together (above); other permutations without activation sites
    (GPT-2's query/key dimensions) are returned as identities.

    Example
    -------
    >>> perms = activation_matching(spec, model_a, model_b, [x_train[:512]])
    """
    stats = unit_statistics(spec, [model_a, model_b], batches)
    perms = spec.identity()
    for p, s in stats.items():
        perms.update(assign_from_correlation(spec, p, s.block(s.correlation(), 0, 1), backend))
    return perms


def assign_from_correlation(spec: PermutationSpec, p: str, corr: torch.Tensor,
                            backend: str | None = None) -> dict[str, torch.Tensor]:
    """The permutation(s) of B maximising the total correlation ``corr`` [A's features, B's features] at
    ``p``'s site: ``{p: perm}``, or for attention heads ``{heads, value dims}`` (:func:`match_heads`)."""
    if p not in spec.head_dims:
        return {p: ops.linear_assignment(corr, maximize=True, backend=backend)[1].long()}
    dims = spec.head_dims[p]
    heads, v = match_heads(corr, spec.perm_sizes[p], spec.perm_sizes[dims] if dims else None, backend)
    return {p: heads, dims: v} if dims else {p: heads}


def match_heads(corr: torch.Tensor, groups: int, head_dim: int | None,
                backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Heads ``[G]`` and per-head dimension permutations ``[G, d]`` (None when ``head_dim`` is None: dims
    kept) from the ``[G·r·d, G·r·d]`` cross-correlation of two attention outputs (module docstring)."""
    width = corr.shape[0] // groups  # features per group, r·d
    if head_dim is None:  # no dimension permutation: the score is the correlation of equal dimensions
        values = corr.reshape(groups, width, groups, width).diagonal(dim1=1, dim2=3).sum(-1)
        return ops.linear_assignment(values, maximize=True, backend=backend)[1].long(), None
    d = head_dim
    c = corr.reshape(groups, width // d, d, groups, width // d, d)
    pairs = c.diagonal(dim1=1, dim2=4).sum(-1).permute(0, 2, 1, 3).reshape(groups * groups, d, d)
    _, sigma = ops.linear_assignment(pairs, maximize=True, backend=backend)  # [G·G, d]
    values = pairs.gather(-1, sigma[..., None]).sum((1, 2)).reshape(groups, groups)
    _, heads = ops.linear_assignment(values, maximize=True, backend=backend)
    heads = heads.long()
    sigma = sigma.reshape(groups, groups, d)
    dims = torch.empty(groups, d, dtype=torch.int64)
    dims[heads] = sigma[torch.arange(groups), heads]
    return heads, dims
