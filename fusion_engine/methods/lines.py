"""LiNeS: layer-increasing network scaling of a merged task vector (Wang et al., ICLR 2025).

Any task-vector merge y = b + τ_merged is rescaled per layer by depth: for the tensors of layer l
(0-based) of an L-layer model,

.. math::  y' = b + \\left(\\alpha + \\beta \\frac{l}{L - 1}\\right)(y - b)

so shallow layers (general features) keep little of the task vectors and deep layers the most. A
tensor outside the layer stack (embeddings, final norm, head) is scaled by α, as in the authors'
``LiNeS_scaling``; with L = 1 every layer gets α. The layer index comes from the tensor's name
(``model.layers.<l>.…``, the merge planner's rule, :func:`fusion_engine.checkpoint.planner.layer_index`).

Use it from a merge config as a top-level key (the merge method's own ``lambda`` still applies to
y; the paper sets it to 1 and lets α, β scale)::

    merge_method: ties
    base_model: ./base
    lines: {alpha: 0.3, beta: 0.7}

or in Python on merged state dicts, :func:`fusion_engine.checkpoint.lines.lines_state_dict`. The paper's multi-task choice is
α = (‖Σ_i τ_i‖₁ / ‖τ_merged‖₁) / K with β tuned on validation data.

Reference: Wang et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model
Merging", ICLR 2025 (https://arxiv.org/abs/2410.17146).
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from ..ops._common import accum_dtype


def check_lines(alpha, beta, where: str = "lines") -> tuple[float, float]:
    """(α, β) as floats; a ConfigError naming ``lines.alpha`` / ``lines.beta`` otherwise."""
    values = []
    for name, value in (("alpha", alpha), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}.{name} = {value!r}: LiNeS's {name} must be a finite number "
                              f"(e.g. lines: {{alpha: 0.3, beta: 0.7}})")
        values.append(float(value))
    return values[0], values[1]


def lines_scale(layer: int | None, num_layers: int, alpha: float, beta: float) -> float:
    """α + β · l / (L − 1) for layer l of L (0-based); α outside the layers or when L = 1."""
    if layer is None or num_layers < 2:
        return alpha
    return alpha + beta * layer / (num_layers - 1)


def scale_task_vector(base: torch.Tensor, merged: torch.Tensor, scale: float,
                      out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """b + s · (y − b), computed in float32 (float64 for float64) and rounded once."""
    acc = torch.promote_types(accum_dtype(base.dtype), accum_dtype(merged.dtype))
    b = base.to(acc)
    return torch.add(b, merged.to(acc) - b, alpha=scale).to(out_dtype or merged.dtype)
