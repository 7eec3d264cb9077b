"""Mode connectivity: paths between two models, the loss barrier along them, and fitted curves.

Paths φ(t), t ∈ [0, 1], from θ_a (t = 0) to θ_b (t = 1), with a control point θ_c for curves:

* ``linear``:    φ(t) = (1 − t) θ_a + t θ_b
* ``polychain``: φ(t) = lerp(θ_a, θ_c, 2t) for t ≤ ½, lerp(θ_c, θ_b, 2t − 1) after (two segments via θ_c)
* ``bezier``:    φ(t) = (1 − t)² θ_a + 2t(1 − t) θ_c + t² θ_b (quadratic Bezier, de Casteljau's form)

Every point is built from ``torch.lerp`` steps, so identical endpoints give exactly that model at
every t. :func:`loss_barrier` scans a path; :func:`fit_curve` trains the control point so the whole
curve has low loss (Garipov et al., 2018).

References: Garipov et al., "Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs",
NeurIPS 2018; Frankle et al., "Linear Mode Connectivity and the Lottery Ticket Hypothesis", ICML 2020;
Li et al., "Deep Model Fusion: A Survey", 2023 (the barrier B(w₁, w₂)).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from .averaging import StateDict, check_compatible, load_state, state_dict_of
from .errors import ConfigError

KINDS = ("linear", "polychain", "bezier")


def _check_t(op: str, t) -> float:
    try:
        t = float(t)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{op}: t={t!r} must be a float in [0, 1]") from exc
    if not 0.0 <= t <= 1.0:
        raise ConfigError(f"{op}: t={t} must be in [0, 1] (0 is the first model, 1 the second)")
    return t


def _point(kind: str, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None, t: float) -> torch.Tensor:
    """φ(t) for one tensor (differentiable in a, b, c)."""
    if kind == "linear":
        return torch.lerp(a, b, t)
    if kind == "polychain":
        return torch.lerp(a, c, 2.0 * t) if t <= 0.5 else torch.lerp(c, b, 2.0 * t - 1.0)
    return torch.lerp(torch.lerp(a, c, t), torch.lerp(c, b, t), t)  # bezier


def _path_state(kind: str, a: StateDict, b: StateDict, c: StateDict | None, t: float) -> StateDict:
    out = {}
    for name, ta in a.items():
        if ta.is_floating_point():
            out[name] = _point(kind, ta, b[name], None if c is None else c[name], t)
        else:  # integer counters: the nearer endpoint's
            out[name] = (ta if t < 0.5 else b[name]).clone()
    return out


def interpolate(a, b, t: float):
    """The point (1 − t) θ_a + t θ_b (``torch.lerp``) between two models.

    Parameters
    ----------
    a, b : ``nn.Module`` or state dicts with the same tensor names, shapes and dtypes
    t : in [0, 1]; 0 gives ``a``, 1 gives ``b``

    Returns
    -------
    A new module (a copy of ``a``) when ``a`` is a module, else a state dict. Integer tensors come from
    the nearer endpoint. The inputs are not modified.
    """
    t = _check_t("interpolate", t)
    sa, sb = state_dict_of(a, "a"), state_dict_of(b, "b")
    check_compatible([sa, sb], ["a", "b"])
    with torch.no_grad():
        sd = _path_state("linear", sa, sb, None, t)
    return load_state(a, sd) if isinstance(a, nn.Module) else sd


class Curve:
    """A path φ(t) from ``start`` (t = 0) to ``end`` (t = 1): linear, polygonal chain or quadratic Bezier.

    Parameters
    ----------
    start, end : ``nn.Module`` or state dicts (same names, shapes, dtypes)
    kind : ``"linear"``, ``"polychain"`` or ``"bezier"``
    control : the control point θ_c for polychain / bezier (module or state dict); default the midpoint
        ½(θ_a + θ_b), where both curves coincide with the linear path
    template : module to load points into (default: ``start`` when it is a module)

    ``state_at(t)`` gives φ(t) as a state dict, ``model_at(t)`` as a module, ``scan(evaluate, steps)``
    the loss along the path.
    """

    def __init__(self, start, end, kind: str = "linear", control=None, *, template: nn.Module | None = None):
        if kind not in KINDS:
            raise ConfigError(f"Curve: kind={kind!r}; choose one of {', '.join(KINDS)}")
        self.kind = kind
        self.start = state_dict_of(start, "start")
        self.end = state_dict_of(end, "end")
        check_compatible([self.start, self.end], ["start", "end"])
        if kind == "linear":
            if control is not None:
                raise ConfigError("Curve: a linear path has no control point; use kind='polychain' or 'bezier'")
            self.control = None
        elif control is None:
            self.control = _path_state("linear", self.start, self.end, None, 0.5)
        else:
            self.control = state_dict_of(control, "control")
            check_compatible([self.start, self.control], ["start", "control"])
        self.template = template if template is not None else (start if isinstance(start, nn.Module) else None)

    def state_at(self, t: float) -> StateDict:
        """φ(t) as a state dict."""
        t = _check_t("Curve.state_at", t)
        with torch.no_grad():
            return _path_state(self.kind, self.start, self.end, self.control, t)

    def model_at(self, t: float) -> nn.Module:
        """φ(t) loaded into a copy of the template module."""
        if self.template is None:
            raise ConfigError("Curve.model_at: the endpoints are state dicts; build the Curve with template=<module>")
        return load_state(self.template, self.state_at(t))

    def scan(self, evaluate: Callable[[nn.Module], float], steps: int = 11) -> "PathScan":
        """Evaluate the loss at ``steps`` evenly spaced t in [0, 1]."""
        if not isinstance(steps, int) or steps < 2:
            raise ConfigError(f"Curve.scan: steps={steps!r} must be an int >= 2 (the endpoints are included)")
        if not callable(evaluate):
            raise ConfigError("Curve.scan: evaluate must be a callable model -> loss (lower is better)")
        ts = [i / (steps - 1) for i in range(steps)]
        losses = []
        for t in ts:
            value = evaluate(self.model_at(t))
            try:
                losses.append(float(value))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"Curve.scan: evaluate returned {value!r}; it must return a number (the loss)") from exc
        return PathScan(self.kind, ts, losses)


@dataclass(frozen=True)
class PathScan:
    """Losses L(φ(t)) at the points ``ts`` of a path.

    height : the barrier max_t [L(φ(t)) − ((1 − t) L(θ_a) + t L(θ_b))] (0 for a path with no bump);
    t_max : where it is reached; max_loss : max_t L(φ(t)). ``float(scan)`` is the height.
    """

    kind: str
    ts: list[float]
    losses: list[float]

    @property
    def excess(self) -> list[float]:
        l0, l1 = self.losses[0], self.losses[-1]
        return [loss - ((1.0 - t) * l0 + t * l1) for t, loss in zip(self.ts, self.losses)]

    @property
    def height(self) -> float:
        return max(self.excess)

    @property
    def t_max(self) -> float:
        excess = self.excess
        return self.ts[excess.index(max(excess))]

    @property
    def max_loss(self) -> float:
        return max(self.losses)

    def __float__(self) -> float:
        return self.height


def loss_barrier(model_a, model_b, evaluate: Callable[[nn.Module], float], steps: int = 11, *,
                 kind: str = "linear", control=None, template: nn.Module | None = None) -> PathScan:
    """The loss barrier between two models along a path (linear by default).

    .. math::  B(\\theta_a, \\theta_b) = \\max_{t \\in [0, 1]} \\Big[ L(\\varphi(t))
               - \\big((1 - t) L(\\theta_a) + t L(\\theta_b)\\big) \\Big]

    the survey's B(w₁, w₂) with φ(t) = (1 − t) θ_a + t θ_b, the sup taken over ``steps`` evenly spaced
    t (endpoints included). B ≈ 0: linearly mode-connected; B > 0: a loss bump between them.

    Parameters
    ----------
    model_a, model_b : ``nn.Module`` (or state dicts with ``template``)
    evaluate : model → loss (lower is better), e.g. mean cross-entropy on held-out data
    steps : number of points (≥ 2)
    kind, control : scan a ``"polychain"`` / ``"bezier"`` curve instead (see :class:`Curve`)

    Returns
    -------
    :class:`PathScan`: ``.height`` (= ``float(result)``), ``.t_max``, ``.max_loss``, ``.ts``, ``.losses``.
    """
    return Curve(model_a, model_b, kind, control, template=template).scan(evaluate, steps)


def fit_curve(model_a, model_b, batches: Iterable, kind: str = "bezier", *, epochs: int = 10, lr: float = 1e-2,
              weight_decay: float = 0.0, loss_fn: Callable = F.cross_entropy, init=None, seed: int = 0,
              template: nn.Module | None = None) -> Curve:
    """Train the control point θ_c of a polychain / Bezier curve so the loss is low all along it.

    .. math::  \\min_{\\theta_c} \\; \\mathbb{E}_{t \\sim U(0, 1)} \\; \\mathbb{E}_{(x, y)}
               \\; \\ell\\big(f(x; \\varphi_{\\theta_c}(t)), y\\big)

    one t drawn per minibatch (seeded), the endpoints held fixed, Adam on θ_c's parameters.
    Buffers (if any) stay at their initial control value; integer tensors come from the endpoints.

    Parameters
    ----------
    model_a, model_b : ``nn.Module`` (or state dicts with ``template``), the endpoints
    batches : a re-iterable of ``(inputs, targets)`` minibatches (a list, a DataLoader), one pass per epoch
    kind : ``"bezier"`` or ``"polychain"``
    epochs, lr, weight_decay : the optimisation
    loss_fn : ``loss_fn(outputs, targets)`` → scalar (default cross-entropy)
    init : the initial control point (module or state dict); default the midpoint ½(θ_a + θ_b)
    seed : seeds the draws of t

    Returns
    -------
    The fitted :class:`Curve` (``curve.control`` holds θ_c).
    """
    op = "fit_curve"
    if kind not in ("bezier", "polychain"):
        raise ConfigError(f"{op}: kind={kind!r}; choose 'bezier' or 'polychain' (a linear path has nothing to fit)")
    if not isinstance(epochs, int) or epochs < 0:
        raise ConfigError(f"{op}: epochs={epochs!r} must be a non-negative int")
    if not lr > 0:
        raise ConfigError(f"{op}: lr={lr!r} must be > 0")
    if isinstance(batches, Mapping) or not isinstance(batches, Iterable):
        raise ConfigError(f"{op}: batches must be a re-iterable of (inputs, targets) minibatches")
    curve = Curve(model_a, model_b, kind, init, template=template)
    if curve.template is None:
        raise ConfigError(f"{op}: the endpoints are state dicts; pass template=<an nn.Module of their architecture>")
    module = copy.deepcopy(curve.template).train()
    trainable = {name for name, _ in module.named_parameters()}
    control = {name: (t.detach().clone().requires_grad_(name in trainable and t.is_floating_point()))
               for name, t in curve.control.items()}
    params = [t for t in control.values() if t.requires_grad]
    if not params:
        raise ConfigError(f"{op}: the model has no floating-point parameters to fit")
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        n_batches = 0
        for batch in batches:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ConfigError(f"{op}: each batch must be an (inputs, targets) pair, got {type(batch).__name__}")
            inputs, targets = batch
            t = float(torch.rand((), generator=generator))
            point = _path_state(kind, curve.start, curve.end, control, t)
            optimizer.zero_grad(set_to_none=True)
            loss_fn(functional_call(module, point, (inputs,)), targets).backward()
            optimizer.step()
            n_batches += 1
        if n_batches == 0:
            raise ConfigError(f"{op}: batches yielded nothing (a generator is exhausted after one pass; pass a list)")
    curve.control = {name: t.detach() for name, t in control.items()}
    return curve


__all__ = ["Curve", "KINDS", "PathScan", "fit_curve", "interpolate", "loss_barrier"]
