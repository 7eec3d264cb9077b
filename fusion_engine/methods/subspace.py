"""Subspace merges of task vectors: ``tsv`` (Task Singular Vectors), ``iso_c`` and ``iso_cts``
(isotropic merging in the common / common-and-task subspaces), FusionBench's semantics.

With τ_i = x_i − b (K task vectors) and, per 2-D tensor of shape m × n, k = min(m, n):

* ``tsv`` (TSV-M, Gargiulo et al., 2025): τ_i = U_i S_i V_iᵀ; task i's top r = ⌊k / K⌋ singular
  triplets fill block i of U = [U_1[:, :r] … U_K[:, :r]], S, V. U and Vᵀ are replaced by their
  orthogonal polar factors (from an SVD: polar(X) = P Qᵀ for X = P Σ Qᵀ), and
  y = b + λ · polar(U) diag(S) polar(Vᵀ).
* ``iso_c`` (Iso-C, Marczak et al., 2025): Σ_i τ_i = U S Vᵀ, every singular value replaced by their
  mean s̄: y = b + λ · s̄ U Vᵀ.
* ``iso_cts`` (Iso-CTS): a common subspace of c = k − round((k − ⌊k·f⌋)/K)·K directions, f =
  ``common_space_fraction`` (the top c singular triplets of Σ τ_i), and for each task the top
  (k − c)/K singular triplets of its task vector with the common space projected out,
  τ_i − U_c U_cᵀ τ_i. The k columns are stacked (tasks first, the common space last), U and Vᵀ
  replaced by their polar factors and every singular value by their mean:
  y = b + λ · s̄ polar(U) polar(Vᵀ). When the rounding rule would give c < 0 (K large next to k;
  FusionBench then slices with a negative index) the task-specific size is rounded down instead.

Every other tensor (1-D norms and biases, > 2-D): y = b + λ · mean_i τ_i (the task_arithmetic op).

Speed: the K per-task SVDs of one tensor run as one batched ``torch.linalg.svd`` (one call, the
device's batched solver on CUDA), on the tall orientation of each matrix (:func:`thin_svd`). The SVDs are exact (full thin SVDs): each method uses exact
singular triplets (TSV the top r of each task, Iso-C all of them), so no randomized low-rank SVD.
The arithmetic runs in float32 (float64 for float64 inputs); the result is rounded once.

Note: TSV takes r = ⌊k / K⌋; FusionBench computes ``int(k * (1 / K))``, which is one less in the rare
cases where k / K is an integer that the floating-point product rounds below (e.g. k = K = 49).

References: Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
CVPR 2025 (https://arxiv.org/abs/2412.00081); Marczak et al., "No Task Left Behind: Isotropic Model
Merging with Common and Task-Specific Subspaces", ICML 2025 (https://arxiv.org/abs/2502.04959).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..ops import task_arithmetic
from ..ops._common import accum_dtype
from .registry import BASE_REQUIRED, SHARED, Group, Method, Parameter, register

LAMBDA = Parameter("lambda", float, SHARED, default=1.0, doc="λ, scales the merged task vector")


def stacked_task_vectors(group: Group) -> torch.Tensor:
    """The K task vectors τ_i = x_i − b as one K × m × n tensor in the accumulation dtype."""
    acc = accum_dtype(group.base.dtype)
    base = group.base.to(acc)
    return torch.stack([x.to(acc) for x in group.non_base]).sub_(base)


def thin_svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(x, full_matrices=False)`` (batched over leading dims), computed on the tall
    orientation: LAPACK's divide and conquer runs about 1.5× faster on xᵀ than on a wide x."""
    if x.shape[-2] >= x.shape[-1]:
        return torch.linalg.svd(x, full_matrices=False)
    u, s, vh = torch.linalg.svd(x.mT, full_matrices=False)
    return vh.mT, s, u.mT


def polar_factor(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Qᵀ of x = P Σ Qᵀ (thin SVD; batched over leading dims)."""
    p, _, qh = thin_svd(x)
    return p @ qh


def mean_task_vector(group: Group, lam: float) -> torch.Tensor:
    """y = b + λ · mean_i τ_i: how the subspace methods merge tensors that are not matrices."""
    count = len(group.non_base)
    return task_arithmetic(group.base, group.non_base, [1.0 / count] * count, lam=lam, **group.ops_kwargs)


def merge_matrices(group: Group, lam: float, merged_task_vector: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """y = b + λ · f(τ) for a 2-D tensor, f = ``merged_task_vector`` of the K × m × n task vectors
    (accumulation dtype, rounded once); y = b + λ · mean_i τ_i for every other tensor. NaN
    everywhere for NaN/Inf inputs (reached only with check_finite=False: the merge API rejects
    them otherwise), where an SVD is undefined."""
    if group.base.dim() != 2:
        return mean_task_vector(group, lam)
    tv = stacked_task_vectors(group)
    if not bool(torch.isfinite(tv).all()):
        return torch.full(group.base.shape, math.nan, dtype=group.out_dtype, device=group.base.device)
    merged = merged_task_vector(tv)
    return torch.add(group.base.to(merged.dtype), merged, alpha=lam).to(group.out_dtype)


def _blocks(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, r: int):
    """The top r triplets of each of K SVDs side by side: U (m × Kr), S (Kr), Vᵀ (Kr × n)."""
    k_tasks, m, _ = u.shape
    return (u[:, :, :r].permute(1, 0, 2).reshape(m, k_tasks * r), s[:, :r].reshape(-1),
            vh[:, :r, :].reshape(k_tasks * r, vh.shape[-1]))


def tsv_task_vector(tv: torch.Tensor) -> torch.Tensor:
    """TSV-M: per-task top singular triplets, orthogonalized by polar factors (module docstring)."""
    k_tasks = tv.shape[0]
    r = min(tv.shape[1:]) // k_tasks
    if r == 0:  # fewer directions than tasks: every block is empty
        return torch.zeros_like(tv[0])
    u, s, vh = _blocks(*thin_svd(tv), r)
    return (polar_factor(u) * s) @ polar_factor(vh)


def iso_c_task_vector(tv: torch.Tensor) -> torch.Tensor:
    """Iso-C: the sum of the task vectors with a flat spectrum (module docstring)."""
    u, s, vh = thin_svd(tv.sum(0))
    return (u @ vh).mul_(s.mean())


def common_space_size(k: int, tasks: int, fraction: float) -> int:
    """Iso-CTS's c = k − round((k − ⌊k·f⌋)/K)·K, so that K task blocks of equal size fill the rest
    (Python's round: half to even, as FusionBench); rounded down where round() would overshoot k."""
    specific = round((k - int(k * fraction)) / tasks) * tasks
    if specific > k:
        specific -= tasks
    return k - specific


def iso_cts_task_vector(tv: torch.Tensor, fraction: float) -> torch.Tensor:
    """Iso-CTS: common subspace of Σ τ_i plus per-task subspaces, flat spectrum (module docstring)."""
    k_tasks, m, n = tv.shape
    k = min(m, n)
    c = common_space_size(k, k_tasks, fraction)
    per_task = (k - c) // k_tasks
    u, s, vh = thin_svd(tv.sum(0))
    u, s, vh = u[:, :c], s[:c], vh[:c]
    if per_task:
        specific = tv - u @ (u.T @ tv)  # the common space projected out of every task vector
        ut, st, vht = _blocks(*thin_svd(specific), per_task)
        u, s, vh = torch.cat([ut, u], 1), torch.cat([st, s]), torch.cat([vht, vh], 0)
    return (polar_factor(u) @ polar_factor(vh)).mul_(s.mean())


def merge_tsv(group: Group, **p) -> torch.Tensor:
    return merge_matrices(group, p["lambda"], tsv_task_vector)


def merge_iso_c(group: Group, **p) -> torch.Tensor:
    return merge_matrices(group, p["lambda"], iso_c_task_vector)


def merge_iso_cts(group: Group, **p) -> torch.Tensor:
    return merge_matrices(group, p["lambda"], lambda tv: iso_cts_task_vector(tv, p["common_space_fraction"]))


def _register(name, merge, parameters, summary, reference):
    return register(Method(name=name, merge=merge, parameters=parameters, base=BASE_REQUIRED, min_non_base=1,
                           summary=summary, reference=reference))


_register("tsv", merge_tsv, (LAMBDA,), "per-task top singular vectors, orthogonalized (TSV-M)",
          "https://arxiv.org/abs/2412.00081")
_register("iso_c", merge_iso_c, (LAMBDA,), "summed task vectors with a flat singular spectrum (Iso-C)",
          "https://arxiv.org/abs/2502.04959")
_register("iso_cts", merge_iso_cts,
          (LAMBDA, Parameter("common_space_fraction", float, SHARED, default=0.8, low=0.0, high=1.0,
                             doc="f, the share of directions given to the common subspace")),
          "common plus task-specific subspaces with a flat spectrum (Iso-CTS)", "https://arxiv.org/abs/2502.04959")
