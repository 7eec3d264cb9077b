"""``nearswap``: take the other model's value where it is close to the base's.

.. math::  w_j = \\operatorname{clamp}\\!\\Big(\\frac{t}{\\max(|a_j - b_j|, 10^{-6})}, 0, 1\\Big), \\qquad
           y_j = w_j b_j + (1 - w_j) a_j

with a the base and b the other input (elementwise, plain torch in the accumulation dtype).
Computed as w = t / max(|a − b|, t, 10⁻⁶) (the same value: the clamp at 1 folded into the
denominator) and y = lerp(a, b, w), in cache-sized steps (:func:`_common.cache_chunks`): one read
of each input and one write of the result.
Reference: https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001
"""

from __future__ import annotations

import torch

from ..ops._common import accum_dtype, flat
from . import _common as M
from .registry import BASE_REQUIRED, SHARED, Group, Method, Parameter, register


def merge_nearswap(group: Group, *, t: float) -> torch.Tensor:
    base, (other,) = group.base, group.non_base
    acc = accum_dtype(base.dtype)
    if M.exact_path(group):  # the formula itself, differentiable (w depends on |a − b| where unclamped)
        a, b = base.to(acc), other.to(acc)
        w = (t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
        return (w * b + (1 - w) * a).to(group.out_dtype)
    out = torch.empty(base.shape, dtype=group.out_dtype, device=base.device)
    fa, fb, fo = flat(base), flat(other), out.view(-1)
    size = min(fa.numel(), M.CACHE_CHUNK)
    buf_a, buf_b, weight = (torch.empty(size, dtype=acc, device=base.device) for _ in range(3))
    numerator = torch.tensor(t, dtype=acc, device=base.device)
    for s, e in M.cache_chunks(fa.numel(), base.device):
        a, b, w = M.staged(fa[s:e], buf_a, acc), M.staged(fb[s:e], buf_b, acc), weight[:e - s]
        torch.sub(a, b, out=w).abs_().clamp_(min=max(t, 1e-6))
        torch.div(numerator, w, out=w)
        if fo.dtype == acc:
            torch.lerp(a, b, w, out=fo[s:e])
        else:
            fo[s:e] = torch.lerp(a, b, w, out=w)
    return out


register(Method(
    name="nearswap", merge=merge_nearswap,
    parameters=(Parameter("t", float, SHARED, low=0.0, doc="distance below which the other value is taken"),),
    base=BASE_REQUIRED, min_inputs=2, max_inputs=2, differentiable=True,
    summary="swap in the other model's values near the base's",
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
))
