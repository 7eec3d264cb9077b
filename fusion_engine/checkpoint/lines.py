"""LiNeS on in-memory state dicts: the Python side of a merge config's ``lines: {alpha, beta}``
(:mod:`fusion_engine.methods.lines`), with the layer of each tensor read from its name by the merge
planner's rule.

>>> merged = fe.merge_state_dicts({"base": b, "a": a, "c": c}, "ties", base="base")
>>> scaled = lines_state_dict(b, merged, alpha=0.3, beta=0.7)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import MissingTensorError
from ..methods.lines import check_lines, lines_scale, scale_task_vector
from .planner import layer_index, layout_of


def lines_state_dict(base: Mapping[str, torch.Tensor], merged: Mapping[str, torch.Tensor], alpha: float,
                     beta: float, num_layers: int | None = None) -> dict[str, torch.Tensor]:
    """Every floating tensor of ``merged`` rescaled against ``base`` by its layer's LiNeS factor
    α + β · l / (L − 1) (α outside the layers); non-floating buffers copied. ``num_layers`` (L)
    defaults to the depth of the main layer stack found in the names."""
    alpha, beta = check_lines(alpha, beta)
    missing = sorted(set(merged) - set(base))
    if missing:
        raise MissingTensorError(f"LiNeS: the base state dict has no tensor(s) {missing[:5]}; pass the base model "
                                 f"the merge started from")
    layout = layout_of(list(merged))
    depth = layout.num_layers if num_layers is None else num_layers
    out = {}
    for name, y in merged.items():
        if not y.is_floating_point():
            out[name] = y.clone()
            continue
        scale = lines_scale(layer_index(name, layout.layer_prefix), depth, alpha, beta)
        out[name] = scale_task_vector(base[name], y, scale)
    return out
