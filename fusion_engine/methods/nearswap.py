"""``nearswap``: take the other model's value where it is close to the base's.

.. math::  w_j = \\operatorname{clamp}\\!\\Big(\\frac{t}{\\max(|a_j - b_j|, 10^{-6})}, 0, 1\\Big), \\qquad
           y_j = w_j b_j + (1 - w_j) a_j

with a the base and b the other input (elementwise, plain torch in the accumulation dtype).
Reference: https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001
"""

from __future__ import annotations

import torch

from ..ops._common import accum_dtype
from .registry import BASE_REQUIRED, SHARED, Group, Method, Parameter, register


def merge_nearswap(group: Group, *, t: float) -> torch.Tensor:
    acc = accum_dtype(group.base.dtype)
    a = group.base.to(acc)
    (b,) = group.non_base
    b = b.to(acc)
    weight = (t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return (weight * b + (1 - weight) * a).to(group.out_dtype)


register(Method(
    name="nearswap", merge=merge_nearswap,
    parameters=(Parameter("t", float, SHARED, low=0.0, doc="distance below which the other value is taken"),),
    base=BASE_REQUIRED, min_inputs=2, max_inputs=2,
    summary="swap in the other model's values near the base's",
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
))
