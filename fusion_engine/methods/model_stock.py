"""``model_stock``: interpolate between the base and the average of the fine-tuned models by the
angle between their task vectors (Jang et al., 2024; mergekit 0.1.5 semantics).

With δ_i = x_i − b (K ≥ 2 of them), cos θ = the mean over pairs i < j of
⟨δ_i, δ_j⟩ / max(‖δ_i‖‖δ_j‖, 1e-6) (each clamped to [−1, 1]), and

.. math::  t = \\frac{K \\cos\\theta}{1 + (K-1)\\cos\\theta}, \\qquad y = t\\,\\bar x + (1 - t)\\,b

(t = 0 where |1 + (K−1) cos θ| < 1e-6). With ``filter_wise`` the angle and t are computed per
row (last dim; a 1-D tensor is one row), else over the whole tensor. The whole-tensor form is
two passes: the Gram matrix of the δ_i (:func:`_common.inner_products`, one read of every input)
and one fused linear_merge.

Reference: Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024.
"""

from __future__ import annotations

import math

import torch

from ..ops import linear_merge
from ..ops._common import accum_dtype
from . import _common as M
from .registry import BASE_REQUIRED, SHARED, Group, Method, Parameter, register


def stock_ratio(cos_theta, count: int):
    """t = K cos θ / (1 + (K − 1) cos θ), 0 at the singularity (floats or tensors)."""
    den = 1 + (count - 1) * cos_theta
    if isinstance(den, torch.Tensor):
        singular = den.abs() < 1e-6
        return torch.where(singular, 0.0, count * cos_theta / torch.where(singular, 1.0, den))
    return 0.0 if abs(den) < 1e-6 else count * cos_theta / den


def merge_model_stock(group: Group, *, filter_wise: bool) -> torch.Tensor:
    base, xs = group.base, group.non_base
    count = len(xs)
    if not filter_wise and not M.exact_path(group):
        gram, nonfinite = M.inner_products(xs, base, group.backend)
        M.require_finite(group, nonfinite)
        norms = [max(0.0, gram[i][i]) ** 0.5 for i in range(count)]
        cosines = [max(-1.0, min(1.0, gram[i][j] / max(norms[i] * norms[j], 1e-6)))
                   for i in range(count) for j in range(i + 1, count)]
        t = stock_ratio(sum(cosines) / len(cosines), count)
        if math.isnan(t):  # NaN inputs merged with check_finite=False
            return torch.full_like(base, math.nan, dtype=group.out_dtype)
        return linear_merge([base, *xs], [1.0 - t] + [t / count] * count, normalize=False, **group.ops_kwargs)
    # one ratio per row (filter_wise), or over the whole flattened tensor on the exact path
    if not group.grad:
        M.require_finite(group, M.any_nonfinite(group.tensors))
    acc = accum_dtype(base.dtype)
    if not filter_wise:
        rows = lambda v: v.reshape(1, -1)  # noqa: E731
    else:
        rows = (lambda v: v.unsqueeze(0)) if base.dim() <= 1 else (lambda v: v)  # noqa: E731
    b = rows(base).to(acc)
    deltas_norm = [rows(M.task_vector(x, base)).to(acc).norm(dim=-1) for x in xs]
    cos_sum = torch.zeros_like(deltas_norm[0])
    for i in range(count):
        di = rows(M.task_vector(xs[i], base)).to(acc)
        for j in range(i + 1, count):
            dj = rows(M.task_vector(xs[j], base)).to(acc)
            cos_sum += ((di * dj).sum(-1) / (deltas_norm[i] * deltas_norm[j]).clamp(min=1e-6)).clamp(-1, 1)
    t = stock_ratio(cos_sum / (count * (count - 1) // 2), count).unsqueeze(-1)
    average = sum(rows(x).to(acc) for x in xs) / count
    return (t * average + (1 - t) * b).reshape(base.shape).to(group.out_dtype)


register(Method(
    name="model_stock", merge=merge_model_stock,
    parameters=(Parameter("filter_wise", bool, SHARED, default=False, doc="one ratio per row"),),
    base=BASE_REQUIRED, min_inputs=3, differentiable=True,
    summary="base-to-average interpolation from task-vector angles", reference="https://arxiv.org/abs/2403.19522",
))
