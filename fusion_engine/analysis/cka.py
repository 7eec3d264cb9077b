"""Linear CKA between two models' representations, layer by layer, streamed through forward hooks.

For representations X ∈ ℝ^{n×p} and Y ∈ ℝ^{n×q} of the same n inputs (tokens), with H the centering
matrix:

.. math::  \\mathrm{CKA}(X, Y) = \\frac{\\lVert Y^\\top H X \\rVert_F^2}
           {\\lVert X^\\top H X \\rVert_F \\, \\lVert Y^\\top H Y \\rVert_F}

It is invariant to orthogonal transforms and isotropic scaling of either side (so a permuted copy of a
network has CKA 1 with it at every layer) and lies in [0, 1]. Streaming: over batches we accumulate
Σx, Σy, XᵀX, YᵀY, XᵀY in float64 and centre at the end (XᵀHY = XᵀY − Σx Σyᵀ / n), so memory is p×q per
layer pair whatever n is.

Reference: Kornblith, Norouzi, Lee, Hinton, "Similarity of Neural Network Representations Revisited",
ICML 2019.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..errors import ConfigError


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations [n, p] and [n, q] of the same n inputs (see the module doc)."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ConfigError(f"linear_cka: x {tuple(x.shape)} and y {tuple(y.shape)} must be [n, p] and [n, q]")
    acc = _CrossMoments(x.shape[1], y.shape[1])
    acc.add(x, y)
    return acc.cka()


class _CrossMoments:
    """Running Σx, Σy, XᵀX, YᵀY, XᵀY (float64) of paired rows."""

    def __init__(self, p: int, q: int):
        self.n = 0
        self.sx, self.sy = torch.zeros(p, dtype=torch.float64), torch.zeros(q, dtype=torch.float64)
        self.xx = torch.zeros(p, p, dtype=torch.float64)
        self.yy = torch.zeros(q, q, dtype=torch.float64)
        self.xy = torch.zeros(p, q, dtype=torch.float64)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.detach().double().cpu(), y.detach().double().cpu()
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.xx += x.T @ x
        self.yy += y.T @ y
        self.xy += x.T @ y

    def cka(self) -> float:
        if self.n == 0:
            raise ConfigError("CKA: no inputs were seen")
        kxy = self.xy - torch.outer(self.sx, self.sy) / self.n
        kxx = self.xx - torch.outer(self.sx, self.sx) / self.n
        kyy = self.yy - torch.outer(self.sy, self.sy) / self.n
        denom = float(torch.linalg.matrix_norm(kxx) * torch.linalg.matrix_norm(kyy))
        return 0.0 if denom == 0.0 else float(kxy.pow(2).sum()) / denom


@dataclass
class LayerCKA:
    """CKA between layer ``layers_a[i]`` of model A and ``layers_b[j]`` of model B in ``matrix[i, j]``."""

    layers_a: list[str]
    layers_b: list[str]
    matrix: torch.Tensor

    def diagonal(self) -> list[float]:
        """CKA of corresponding layers (same position in both lists)."""
        return [float(self.matrix[i, i]) for i in range(min(self.matrix.shape))]


def default_layers(model: nn.Module) -> list[str]:
    """Names of the modules whose outputs are compared by default: every ``nn.Linear`` (and ``nn.Conv*d``)."""
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, *_CONVS))]


def _rows(output, module: nn.Module) -> torch.Tensor:
    """A module's output as [examples, features]: channels are the features of a convolution (every
    position an example); otherwise the last dimension is, and the leading ones (batch, tokens) are examples."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if isinstance(module, _CONVS):
        return output.movedim(1, -1).reshape(-1, output.shape[1])
    return output.reshape(-1, output.shape[-1]) if output.dim() > 1 else output.reshape(-1, 1)


@torch.no_grad()
def representation_cka(model_a: nn.Module, model_b: nn.Module, batches: Iterable, *,
                       layers_a: Sequence[str] | None = None, layers_b: Sequence[str] | None = None,
                       pairs: str = "all", forward: Callable | None = None) -> LayerCKA:
    """Linear CKA between the outputs of ``layers_a`` of A and ``layers_b`` of B on the same inputs.

    Parameters
    ----------
    model_a, model_b : the two networks (any architectures)
    batches : an iterable of inputs; each is passed as ``model(batch)`` (or ``forward(model, batch)``)
    layers_a, layers_b : module names (default :func:`default_layers`: every Linear / Conv)
    pairs : ``"all"`` (every layer of A against every layer of B) or ``"diagonal"`` (layer i against
        layer i: both lists must have the same length; a matrix with NaN off the diagonal)
    forward : ``forward(model, batch)`` when a batch is not a single positional input (e.g. a dict of
        token ids: ``lambda m, b: m(**b)``)

    Returns
    -------
    :class:`LayerCKA` with the matrix of CKA values (float64).
    """
    if pairs not in ("all", "diagonal"):
        raise ConfigError(f"representation_cka: pairs={pairs!r} must be 'all' or 'diagonal'")
    layers_a = list(layers_a) if layers_a is not None else default_layers(model_a)
    layers_b = list(layers_b) if layers_b is not None else default_layers(model_b)
    if not layers_a or not layers_b:
        raise ConfigError("representation_cka: no layer to compare; pass layers_a / layers_b (module names)")
    if pairs == "diagonal" and len(layers_a) != len(layers_b):
        raise ConfigError(f"representation_cka: pairs='diagonal' needs as many layers on both sides "
                          f"({len(layers_a)} vs {len(layers_b)})")
    run = forward or (lambda model, batch: model(batch))
    moments: dict[tuple[int, int], _CrossMoments] = {}
    for batch in batches:
        outs_a = _capture(model_a, layers_a, lambda: run(model_a, batch), "model_a")
        outs_b = _capture(model_b, layers_b, lambda: run(model_b, batch), "model_b")
        for i, xa in enumerate(outs_a):
            for j, yb in enumerate(outs_b):
                if pairs == "diagonal" and i != j:
                    continue
                if xa.shape[0] != yb.shape[0]:
                    raise ConfigError(f"representation_cka: layer {layers_a[i]!r} gives {xa.shape[0]} rows, "
                                      f"{layers_b[j]!r} gives {yb.shape[0]}; compare layers over the same inputs")
                acc = moments.get((i, j))
                if acc is None:
                    acc = moments[(i, j)] = _CrossMoments(xa.shape[1], yb.shape[1])
                acc.add(xa, yb)
    if not moments:
        raise ConfigError("representation_cka: batches was empty")
    matrix = torch.full((len(layers_a), len(layers_b)), float("nan"), dtype=torch.float64)
    for (i, j), acc in moments.items():
        matrix[i, j] = acc.cka()
    return LayerCKA(layers_a, layers_b, matrix)


def _capture(model: nn.Module, layers: Sequence[str], call: Callable, who: str) -> list[torch.Tensor]:
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ConfigError(f"representation_cka: {who} has no module(s) {missing[:5]}; "
                          f"see [n for n, _ in model.named_modules()]")
    outputs: dict[str, torch.Tensor] = {}
    handles = [modules[name].register_forward_hook(
        lambda m, _inp, out, name=name: outputs.__setitem__(name, _rows(out, m))) for name in layers]
    was_training = model.training
    model.eval()
    try:
        call()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [outputs[name] for name in layers]


__all__ = ["LayerCKA", "default_layers", "linear_cka", "representation_cka"]
