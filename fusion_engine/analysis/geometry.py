"""Task-vector geometry: cosine similarity, sign conflicts and shared singular directions, per tensor.

With base θ_0 and models θ_1..θ_K, the task vectors are τ_i = θ_i − θ_0 (per tensor). For every
floating-point tensor (a "layer" of the report) and every pair (i, j):

* cosine similarity   cos_ij = ⟨τ_i, τ_j⟩ / (‖τ_i‖ ‖τ_j‖)          (0 where a task vector is zero);
* sign-conflict rate  c_ij = #{e : τ_i[e] τ_j[e] < 0} / #{e : τ_i[e] ≠ 0 ≠ τ_j[e]};
* subspace overlap    (2-D tensors) o_ij = ½ (‖U_iᵀ U_j‖_F² + ‖V_iᵀ V_j‖_F²) / min(r_i, r_j) ∈ [0, 1],
  where U_i, V_i hold the top r_i left / right singular vectors of τ_i and r_i is the smallest rank keeping
  ``energy`` of ‖τ_i‖_F² (0: no shared direction, 1: one subspace inside the other). ‖U_iᵀU_j‖_F² itself is
  the number of directions the two share (a sum of squared cosines of principal angles).

Whole-model cosines accumulate ⟨τ_i, τ_j⟩ over all tensors. Tensors are visited one at a time (``base``
and ``models`` may be checkpoints opened with :func:`fusion_engine.io.open_checkpoint`), so memory stays at
K + 1 tensors.

References: Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023 (cosines of task vectors);
Yadav et al., "TIES-Merging", NeurIPS 2023 (sign conflicts); Gargiulo et al., "Task Singular Vectors:
Reducing Task Interference in Model Merging", CVPR 2025 (singular subspaces of task matrices).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError, MissingTensorError, ShapeMismatchError
from ..io import Checkpoint


@dataclass
class TensorGeometry:
    """The pairwise measures of one tensor; K×K matrices (float64), ``overlap``/``ranks`` only for 2-D tensors."""

    name: str
    shape: tuple[int, ...]
    norms: torch.Tensor
    cosine: torch.Tensor
    sign_conflict: torch.Tensor
    overlap: torch.Tensor | None = None
    ranks: list[int] | None = None


@dataclass
class TaskVectorGeometry:
    """Per-tensor geometry of K task vectors, plus the whole-model cosine matrix."""

    labels: list[str]
    tensors: list[TensorGeometry] = field(default_factory=list)
    cosine: torch.Tensor | None = None

    def mean_offdiagonal(self, what: str) -> list[float]:
        """Per tensor, the mean of ``what`` ("cosine", "sign_conflict" or "overlap") over pairs i < j."""
        k = len(self.labels)
        iu = torch.triu_indices(k, k, 1)
        out = []
        for t in self.tensors:
            m = getattr(t, what)
            out.append(float("nan") if m is None or k < 2 else float(m[iu[0], iu[1]].mean()))
        return out


class _Source:
    """name → tensor for a state dict, an nn.Module or an open checkpoint."""

    def __init__(self, model, label: str):
        self.label = label
        if isinstance(model, Checkpoint):
            self.names, self.get = model.names(), model.load
        elif isinstance(model, nn.Module):
            sd = model.state_dict()
            self.names, self.get = list(sd), sd.__getitem__
        elif isinstance(model, dict):
            self.names, self.get = list(model), model.__getitem__
        else:
            raise ConfigError(f"{label} is a {type(model).__name__}; pass an nn.Module, a state dict or a "
                              f"checkpoint from fusion_engine.io.open_checkpoint")


def models_and_labels(where: str, models: Sequence, labels: Sequence[str] | None) -> tuple[list, list[str]]:
    """The models as a non-empty list and one label each (default ``model 1`` … ``model K``)."""
    models = list(models)
    if not models:
        raise ConfigError(f"{where}: pass at least one model")
    labels = list(labels) if labels is not None else [f"model {i + 1}" for i in range(len(models))]
    if len(labels) != len(models):
        raise ConfigError(f"{where}: {len(labels)} labels for {len(models)} models")
    return models, labels


def effective_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest r with Σ_{k≤r} σ_k² ≥ energy · Σ_k σ_k² (0 for a zero matrix)."""
    sq = singular_values.double() ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 0
    return int(torch.searchsorted(torch.cumsum(sq, 0), energy * total * (1 - 1e-12)).item()) + 1


def _pairwise(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gram, norms, cosines and sign-conflict rates of K flattened task vectors [K, n] (float64)."""
    gram = flat @ flat.T
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = torch.outer(norms, norms)
    cosine = torch.where(denom > 0, gram / torch.where(denom > 0, denom, 1.0), 0.0)
    sign = torch.sign(flat)
    both = (sign != 0).double()
    nonzero_pairs = both @ both.T
    conflicts = ((sign < 0).double() @ (sign > 0).double().T)
    conflicts = conflicts + conflicts.T
    rate = torch.where(nonzero_pairs > 0, conflicts / nonzero_pairs.clamp_min(1), 0.0)
    return gram, norms, cosine, rate


def _subspace_overlap(taus: Sequence[torch.Tensor], energy: float, max_rank: int | None):
    bases, ranks = [], []
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        r = effective_rank(s, energy)
        if max_rank is not None:
            r = min(r, max_rank)
        bases.append((u[:, :r], vh[:r].T))
        ranks.append(r)
    k = len(taus)
    overlap = torch.zeros(k, k, dtype=torch.float64)
    for i in range(k):
        for j in range(k):
            r = min(ranks[i], ranks[j])
            if r == 0:
                continue
            left = float((bases[i][0].T @ bases[j][0]).pow(2).sum())
            right = float((bases[i][1].T @ bases[j][1]).pow(2).sum())
            overlap[i, j] = 0.5 * (left + right) / r
    return overlap, ranks


@torch.no_grad()
def task_vector_geometry(base, models: Sequence, *, labels: Sequence[str] | None = None, energy: float = 0.9,
                         max_rank: int | None = None, include: Sequence[str] | None = None) -> TaskVectorGeometry:
    """Cosines, sign conflicts and singular-subspace overlaps of the task vectors τ_i = θ_i − θ_base.

    Parameters
    ----------
    base : the common starting point (``nn.Module``, state dict, or an open checkpoint)
    models : K ≥ 1 fine-tuned models of the same kind and architecture
    labels : K names for the report (default ``model 1`` … ``model K``)
    energy : the fraction of ‖τ‖_F² the singular subspaces keep (in (0, 1])
    max_rank : an upper bound on the subspace ranks (None: no bound)
    include : tensor names to analyse (default: every floating-point tensor of ``base``)

    Returns
    -------
    :class:`TaskVectorGeometry`: ``tensors`` in ``base``'s order and the whole-model ``cosine`` matrix.

    Example
    -------
    >>> geo = task_vector_geometry(pretrained, [ft_a, ft_b], labels=["a", "b"])
    >>> geo.cosine[0, 1], geo.tensors[0].sign_conflict[0, 1]
    """
    models, labels = models_and_labels("task_vector_geometry", models, labels)
    if not 0.0 < energy <= 1.0:
        raise ConfigError(f"task_vector_geometry: energy={energy} must be in (0, 1]")
    base_src = _Source(base, "base")
    sources = [_Source(m, label) for m, label in zip(models, labels)]
    names = list(include) if include is not None else base_src.names
    result = TaskVectorGeometry(labels)
    total = torch.zeros(len(models), len(models), dtype=torch.float64)
    for name in names:
        if name not in base_src.names:
            raise MissingTensorError(f"task_vector_geometry: base has no tensor {name!r}")
        b = base_src.get(name)
        if not b.is_floating_point():
            continue
        taus = []
        for src in sources:
            if name not in src.names:
                raise MissingTensorError(f"task_vector_geometry: {src.label} has no tensor {name!r}; the models "
                                         f"must share the base's architecture")
            t = src.get(name)
            if t.shape != b.shape:
                raise ShapeMismatchError(f"task_vector_geometry: tensor {name!r} of {src.label} has shape "
                                         f"{tuple(t.shape)}, base has {tuple(b.shape)}")
            taus.append(t.double() - b.double())
        gram, norms, cosine, rate = _pairwise(torch.stack([t.reshape(-1) for t in taus]))
        total += gram
        geo = TensorGeometry(name, tuple(b.shape), norms, cosine, rate)
        if b.dim() == 2 and min(b.shape) > 0:
            geo.overlap, geo.ranks = _subspace_overlap(taus, energy, max_rank)
        result.tensors.append(geo)
    norms = total.diagonal().clamp_min(0).sqrt()
    denom = torch.outer(norms, norms)
    result.cosine = torch.where(denom > 0, total / torch.where(denom > 0, denom, 1.0), 0.0)
    return result


__all__ = ["TaskVectorGeometry", "TensorGeometry", "effective_rank", "task_vector_geometry"]
