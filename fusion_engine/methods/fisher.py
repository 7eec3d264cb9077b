"""``fisher``: Fisher-weighted averaging with given diagonal Fisher tensors (not in mergekit).

.. math::  y = \\frac{\\sum_i w_i F_i \\odot x_i}{\\sum_i w_i F_i + \\varepsilon}

Parameters: ``fisher`` (one per input: a tensor shaped like it, or the path of the model's statistics
file written by ``fusion-engine measure``, whose ``fisher.<tensor name>`` is used), ``weight`` (one per
input, default 1), ``eps`` (default 1e-8). Runs on the fused :func:`fisher_merge` op.

In a merge YAML::

    merge_method: fisher
    models:
      - model: ./chat
        parameters: {fisher: ./chat.stats.safetensors}
      - model: ./code
        parameters: {fisher: ./code.stats.safetensors, weight: 0.5}

Reference: Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022.
"""

from __future__ import annotations

import torch

from ..io.statistics import tensor_statistics
from ..ops import fisher_merge
from .registry import INPUT, Group, Method, Parameter, register


def merge_fisher(group: Group, *, fisher: list, weight: list[float], eps: float) -> torch.Tensor:
    """Fisher-weighted average; Fisher tensors not in the working dtype are used in float32."""
    dtype = group.tensors[0].dtype
    fisher = [f if isinstance(f, torch.Tensor) else tensor_statistics(f, group.name, "fisher").fisher().to(
        group.tensors[0].device) for f in fisher]
    fishers = [f if f.dtype == dtype else f.to(torch.float32) for f in fisher]
    if len({f.dtype for f in fishers}) > 1:
        fishers = [f.to(torch.float32) for f in fishers]
    return fisher_merge(group.tensors, fishers, weight, eps=eps, **group.ops_kwargs)


FISHER = register(Method(
    name="fisher",
    merge=merge_fisher,
    parameters=(
        Parameter("fisher", torch.Tensor, INPUT, statistics=True,
                  doc="F_i, the diagonal Fisher of input i (a tensor or a statistics file)"),
        Parameter("weight", float, INPUT, default=1.0, doc="w_i"),
        Parameter("eps", float, default=1e-8, low=0.0, doc="ε added to the denominator"),
    ),
    summary="Fisher-weighted average (given Fisher tensors)",
    reference="https://arxiv.org/abs/2111.09832",
))
