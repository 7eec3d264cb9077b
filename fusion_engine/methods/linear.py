"""``linear``: the weighted average of the inputs (model soups), on the fused :func:`linear_merge` op.

.. math::  y = \\frac{\\sum_i w_i x_i}{\\sum_i w_i} \\text{ (normalize)} \\quad\\text{or}\\quad y = \\sum_i w_i x_i

Reference: Wortsman et al., "Model soups", ICML 2022 (https://arxiv.org/abs/2203.05482).
"""

from __future__ import annotations

import torch

from ..ops import linear_merge
from .registry import INPUT, Group, Method, Parameter, register


def merge_linear(group: Group, *, weight: list[float], normalize: bool) -> torch.Tensor:
    """y = Σ w_i x_i / Σ w_i (or Σ w_i x_i without ``normalize``); a base, if given, is one more input."""
    return linear_merge(group.tensors, weight, normalize=normalize, **group.ops_kwargs)


LINEAR = register(Method(
    name="linear",
    merge=merge_linear,
    parameters=(
        Parameter("weight", float, INPUT, doc="w_i, one per input"),
        Parameter("normalize", bool, default=True, doc="divide by Σ w_i"),
    ),
    summary="weighted average of the inputs (model soups)",
    reference="https://arxiv.org/abs/2203.05482",
))
