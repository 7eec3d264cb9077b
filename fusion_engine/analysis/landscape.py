"""The loss landscape between models: interpolation curves, barriers per layer, and a 2-D loss plane.

* :func:`interpolation_curve` — loss and accuracy along φ(t) = (1 − t) θ_a + t θ_b, with the barrier of each:
  B_loss = max_t [L(φ(t)) − ((1 − t) L(θ_a) + t L(θ_b))] and B_acc = max_t [((1 − t) A(θ_a) + t A(θ_b)) − A(φ(t))].
* :func:`layerwise_barriers` — the same loss barrier when only one layer moves: φ_l(t) takes layer l's
  tensors from the linear path and every other tensor from θ_a (Frankle et al.'s layer-wise probe; it tells
  which layers carry the barrier).
* :func:`loss_plane` — the loss on the plane through three models (Garipov et al., 2018): with
  u = θ_2 − θ_1 and v = θ_3 − θ_1 − (⟨θ_3 − θ_1, û⟩) û, orthonormal û, v̂, the point of coordinates (x, y)
  is θ_1 + x û + y v̂; the models sit at (0, 0), (‖u‖, 0) and (⟨θ_3 − θ_1, û⟩, ‖v‖).

``evaluate(model) -> (loss, accuracy)`` is the user's (accuracy may be None); floating-point tensors
move, integer tensors stay θ_a's (θ_1's).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..averaging import check_compatible, load_state, state_dict_of
from ..errors import ConfigError

Evaluate = Callable[[nn.Module], tuple]


@dataclass
class Curve1D:
    """Loss (and accuracy) at ``ts`` along a path, with the barrier heights."""

    ts: list[float]
    losses: list[float]
    accuracies: list[float] | None

    @property
    def loss_barrier(self) -> float:
        a, b = self.losses[0], self.losses[-1]
        return max(loss - ((1 - t) * a + t * b) for t, loss in zip(self.ts, self.losses))

    @property
    def accuracy_barrier(self) -> float | None:
        if self.accuracies is None:
            return None
        a, b = self.accuracies[0], self.accuracies[-1]
        return max(((1 - t) * a + t * b) - acc for t, acc in zip(self.ts, self.accuracies))


def _split(value) -> tuple[float, float | None]:
    if isinstance(value, (tuple, list)):
        loss, acc = value[0], value[1] if len(value) > 1 else None
    elif hasattr(value, "loss"):
        loss, acc = value.loss, getattr(value, "accuracy", None)
    else:
        loss, acc = value, None
    return float(loss), (None if acc is None else float(acc))


def _ts(steps: int) -> list[float]:
    if not isinstance(steps, int) or steps < 2:
        raise ConfigError(f"steps={steps!r} must be an integer >= 2")
    return [i / (steps - 1) for i in range(steps)]


def _scan(template: nn.Module, states, evaluate: Evaluate, ts) -> Curve1D:
    losses, accs = [], []
    for sd in states:
        loss, acc = _split(evaluate(load_state(template, sd)))
        losses.append(loss)
        accs.append(acc)
    return Curve1D(list(ts), losses, None if any(a is None for a in accs) else accs)


def _pair(model_a, model_b):
    sa, sb = state_dict_of(model_a, "model_a"), state_dict_of(model_b, "model_b")
    check_compatible([sa, sb], ["model_a", "model_b"])
    return sa, sb


@torch.no_grad()
def interpolation_curve(model_a: nn.Module, model_b: nn.Module, evaluate: Evaluate, steps: int = 11) -> Curve1D:
    """Loss / accuracy along the linear path from ``model_a`` (t = 0) to ``model_b`` (t = 1), ``steps`` points."""
    sa, sb = _pair(model_a, model_b)
    ts = _ts(steps)
    states = ({k: torch.lerp(a, sb[k], t) if a.is_floating_point() else a for k, a in sa.items()} for t in ts)
    return _scan(model_a, states, evaluate, ts)


def layer_groups(names: Sequence[str]) -> "OrderedDict[str, list[str]]":
    """Tensor names grouped by their module (the name without its last component: ``0.weight`` → ``0``)."""
    groups: OrderedDict[str, list[str]] = OrderedDict()
    for name in names:
        groups.setdefault(name.rsplit(".", 1)[0] if "." in name else name, []).append(name)
    return groups


@torch.no_grad()
def layerwise_barriers(model_a: nn.Module, model_b: nn.Module, evaluate: Evaluate, steps: int = 11,
                       groups: "dict[str, list[str]] | None" = None) -> "OrderedDict[str, Curve1D]":
    """Per layer l: the loss curve when only l's tensors follow the linear path (others stay θ_a's)."""
    sa, sb = _pair(model_a, model_b)
    groups = groups if groups is not None else layer_groups([k for k, v in sa.items() if v.is_floating_point()])
    ts = _ts(steps)
    out: OrderedDict[str, Curve1D] = OrderedDict()
    for layer, names in groups.items():
        unknown = [n for n in names if n not in sa]
        if unknown:
            raise ConfigError(f"layerwise_barriers: layer {layer!r} names unknown tensors {unknown[:3]}")
        states = ({**sa, **{n: torch.lerp(sa[n], sb[n], t) for n in names}} for t in ts)
        out[layer] = _scan(model_a, states, evaluate, ts)
    return out


@dataclass
class LossPlane:
    """Loss on a grid of the plane through three models: ``losses[iy, ix]`` at (xs[ix], ys[iy])."""

    xs: list[float]
    ys: list[float]
    losses: torch.Tensor
    model_coordinates: list[tuple[float, float]]


@torch.no_grad()
def loss_plane(model_1: nn.Module, model_2: nn.Module, model_3: nn.Module, evaluate: Evaluate, *,
               grid: int = 11, margin: float = 0.25) -> LossPlane:
    """The loss on the plane spanned by three models (see the module doc), on a ``grid``×``grid`` lattice that
    covers the three models plus ``margin`` of the plane's extent on every side."""
    s1, s2, s3 = (state_dict_of(m, f"model_{i}") for i, m in enumerate((model_1, model_2, model_3), 1))
    check_compatible([s1, s2, s3], ["model_1", "model_2", "model_3"])
    if not isinstance(grid, int) or grid < 2:
        raise ConfigError(f"loss_plane: grid={grid!r} must be an integer >= 2")
    keys = [k for k, v in s1.items() if v.is_floating_point()]
    flat = [torch.cat([s[k].double().reshape(-1) for k in keys]) for s in (s1, s2, s3)]
    u, w = flat[1] - flat[0], flat[2] - flat[0]
    u_norm = float(u.norm())
    if u_norm == 0:
        raise ConfigError("loss_plane: model_1 and model_2 are identical; the plane is undefined")
    u_hat = u / u_norm
    w_u = float(w @ u_hat)
    v = w - w_u * u_hat
    v_norm = float(v.norm())
    if v_norm <= 1e-12 * max(u_norm, 1.0):
        raise ConfigError("loss_plane: the three models are collinear; the plane is undefined")
    v_hat = v / v_norm
    coords = [(0.0, 0.0), (u_norm, 0.0), (w_u, v_norm)]
    xs_c, ys_c = [c[0] for c in coords], [c[1] for c in coords]
    span_x, span_y = max(xs_c) - min(xs_c), max(ys_c) - min(ys_c)
    xs = torch.linspace(min(xs_c) - margin * span_x, max(xs_c) + margin * span_x, grid).tolist()
    ys = torch.linspace(min(ys_c) - margin * span_y, max(ys_c) + margin * span_y, grid).tolist()
    losses = torch.empty(grid, grid, dtype=torch.float64)
    sizes = [s1[k].numel() for k in keys]
    for iy, y in enumerate(ys):
        for ix, x in enumerate(xs):
            point = flat[0] + x * u_hat + y * v_hat
            sd = dict(s1)
            for k, chunk in zip(keys, torch.split(point, sizes)):
                sd[k] = chunk.reshape(s1[k].shape).to(s1[k].dtype)
            losses[iy, ix] = _split(evaluate(load_state(model_1, sd)))[0]
    return LossPlane(xs, ys, losses, coords)


__all__ = ["Curve1D", "LossPlane", "interpolation_curve", "layer_groups", "layerwise_barriers", "loss_plane"]
