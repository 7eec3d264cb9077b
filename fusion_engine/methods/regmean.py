"""``regmean``: RegMean from per-model Gram matrices in statistics files (not in mergekit).

For a Linear weight W (its module m measured by ``fusion-engine measure``), with G_i = X_iᵀX_i the Gram
of m's inputs in model i:

.. math::  W^\\star{}^{\\top} = \\Big(\\sum_i \\tilde G_i\\Big)^{-1} \\sum_i \\tilde G_i W_i^{\\top},
           \\qquad \\tilde G_i = \\alpha G_i + (1-\\alpha)\\,\\mathrm{diag}(G_i)

solved by Cholesky (the same solver as :func:`fusion_engine.data_aware.regmean_merge`, so a streamed YAML
merge equals the in-memory one). Every other tensor (biases, norms, embeddings, weights without a Gram) is
the plain average, as in RegMean.

Parameters: ``gram`` (one per input: the model's statistics file; or the Gram tensor of the tensor's
module), ``alpha`` (default 0.95, in [0, 1]).

In a merge YAML::

    merge_method: regmean
    parameters: {alpha: 0.95}
    models:
      - model: ./chat
        parameters: {gram: ./chat.stats.safetensors}
      - model: ./code
        parameters: {gram: ./code.stats.safetensors}

Reference: Jin, Ren, Preotiuc-Pietro, Cheng, "Dataless Knowledge Fusion by Merging Weights of Language
Models", ICLR 2023.
"""

from __future__ import annotations

import torch

from ..data_aware.regmean import _solve_group
from ..errors import MissingTensorError
from ..io.statistics import tensor_statistics
from ..ops import linear_merge
from .registry import INPUT, Group, Method, Parameter, register


def merge_regmean(group: Group, *, gram: list, alpha: float) -> torch.Tensor:
    """RegMean for a Linear weight with a Gram in every input's statistics; the average otherwise."""
    grams = [g if isinstance(g, torch.Tensor) else tensor_statistics(g, group.name, "regmean").gram() for g in gram]
    measured = [g is not None for g in grams]
    if group.tensors[0].dim() != 2 or not any(measured):
        return linear_merge(group.tensors, **group.ops_kwargs)
    if not all(measured):
        missing = [str(gram[i].file.path) for i, ok in enumerate(measured) if not ok]
        raise MissingTensorError(f"regmean: tensor {group.name!r} has a Gram in some statistics files but not in "
                                 f"{missing}; measure every model on the same architecture")
    device = group.tensors[0].device
    solved = _solve_group([list(group.tensors)], [[g.to(device) for g in grams]], float(alpha), [group.name or "weight"],
                          "regmean")[0]
    return solved.to(group.out_dtype)


REGMEAN = register(Method(
    name="regmean",
    merge=merge_regmean,
    parameters=(
        Parameter("gram", torch.Tensor, INPUT, statistics=True,
                  doc="G_i: the model's statistics file (or the Gram of this tensor's module)"),
        Parameter("alpha", float, default=0.95, low=0.0, high=1.0, doc="share of the off-diagonal Gram kept"),
    ),
    min_inputs=1,
    summary="RegMean from measured Gram matrices (non-Linear tensors averaged)",
    reference="https://arxiv.org/abs/2212.09849",
))
