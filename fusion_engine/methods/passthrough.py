"""``passthrough``: copy the single input, optionally scaled (frankenmerge slices).

.. math::  y = x \\quad\\text{or}\\quad y = s\\,x

Like mergekit, without a scale and without a dtype change the input itself is returned (no copy).
"""

from __future__ import annotations

import torch

from .registry import INPUT, Group, Method, Parameter, register


def merge_passthrough(group: Group, *, scale: list[float | None]) -> torch.Tensor:
    x = group.tensors[0]
    if scale[0] is None:
        return x.to(group.out_dtype)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(acc) * scale[0]).to(group.out_dtype)


PASSTHROUGH = register(Method(
    name="passthrough",
    merge=merge_passthrough,
    parameters=(Parameter("scale", float, INPUT, default=None, optional=True, doc="s, or null for none"),),
    max_inputs=1,
    differentiable=True,  # plain torch: x or s·x
    summary="copy the one input, optionally scaled",
))
