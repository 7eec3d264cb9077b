"""``linear``: the weighted average of the inputs (model soups), on the fused :func:`linear_merge` op.

.. math::  y = \\frac{\\sum_i w_i x_i}{\\sum_i w_i} \\text{ (normalize)} \\quad\\text{or}\\quad y = \\sum_i w_i x_i

Reference: Wortsman et al., "Model soups", ICML 2022 (https://arxiv.org/abs/2203.05482).
"""

from __future__ import annotations

import torch

from ..ops import linear_merge
from ..ops._common import accum_dtype
from . import _common as M
from .registry import INPUT, Group, Method, Parameter, register


def merge_linear(group: Group, *, weight: list[float], normalize: bool) -> torch.Tensor:
    """y = Σ w_i x_i / Σ w_i (or Σ w_i x_i without ``normalize``); a base, if given, is one more input.
    The exact path (inputs requiring grad) sums in the accumulation dtype and then divides, as mergekit."""
    if not M.exact_path(group):
        return linear_merge(group.tensors, weight, normalize=normalize, **group.ops_kwargs)
    if normalize:
        M.nonzero_sum_weights("linear", weight)  # a zero sum is a ConfigError
    acc = accum_dtype(group.tensors[0].dtype)
    total = sum(w * x.to(acc) for w, x in zip(weight, group.tensors))
    return (total / sum(weight) if normalize else total).to(group.out_dtype)


LINEAR = register(Method(
    name="linear",
    merge=merge_linear,
    parameters=(
        Parameter("weight", float, INPUT, doc="w_i, one per input"),
        Parameter("normalize", bool, default=True, doc="divide by Σ w_i"),
    ),
    summary="weighted average of the inputs (model soups)",
    differentiable=True,
    reference="https://arxiv.org/abs/2203.05482",
))
