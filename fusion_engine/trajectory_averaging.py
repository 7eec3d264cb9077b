"""Averaging along one training run: LAWA, SWAG, Lookahead, snapshot ensembles and FGE.

The training-time methods of the weight-averaging family beyond SWA/EMA (:mod:`fusion_engine.averaging`),
each on the fused multi-tensor updates (``torch._foreach_*``: one kernel launch per device and dtype):

* :class:`LatestWeightAverage` — LAWA: the uniform average of the k latest checkpoints.
* :class:`SWAG` — a Gaussian over the weights from the SWA moments plus a low-rank deviation matrix;
  :meth:`SWAG.sample` draws weights, :func:`bayesian_model_average` averages the samples' predictions.
* :class:`Lookahead` — an optimizer wrapper: k fast steps of any optimizer, then the slow weights
  move a fraction α towards the fast ones and the fast weights restart from them.
* :class:`CyclicSnapshots` with :func:`snapshot_ensemble_lr` / :func:`fge_lr` — a cyclic learning rate
  that collects one model per cycle (snapshot ensembles, fast geometric ensembling); the collected models
  form an :class:`~fusion_engine.ensemble.Ensemble`.

Models are ``nn.Module`` instances or state dicts (name → tensor); what a collector keeps are detached
copies, so training goes on untouched.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Callable, Sequence

import torch
from torch import nn

from .averaging import StateDict, average_state_dicts, check_compatible, load_state, state_dict_of
from .ensemble import Ensemble
from .errors import ConfigError


def _positive_int(op: str, name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{op}: {name}={value!r} must be an integer >= {minimum}")
    return value


def _snapshot(model, what: str) -> StateDict:
    """A detached copy of the model's tensors (training may go on changing the originals)."""
    return {name: t.detach().clone() for name, t in state_dict_of(model, what).items()}


# ----------------------------------------------------------------------------------------------
# LAWA


class LatestWeightAverage:
    """LAWA: the uniform average of the k latest checkpoints of one training run.

    .. math::  \\theta_{\\text{LAWA}}(t) = \\frac{1}{k} \\sum_{i=t-k+1}^{t} \\theta_i

    where θ_i is the checkpoint taken at the end of epoch i (fewer than k while fewer were collected).
    Call :meth:`update` after each epoch; :meth:`state_dict` gives the average at any time, computed by
    the fused :func:`~fusion_engine.ops.linear_merge` over the stored checkpoints (one read of each).

    Parameters
    ----------
    k : how many of the latest checkpoints to average (the paper's default is 6).

    Example
    -------
    >>> lawa = LatestWeightAverage(k=6)
    >>> for epoch in range(epochs):
    ...     train_one_epoch(model)
    ...     lawa.update(model)
    >>> model.load_state_dict(lawa.state_dict())

    Reference: Kaddour, "Stop Wasting My Time! Saving Days of ImageNet and BERT Training with Latest
    Weight Averaging", NeurIPS 2022 workshop (arXiv:2209.14981).
    """

    def __init__(self, k: int = 6):
        self.k = _positive_int("LatestWeightAverage", "k", k)
        self.checkpoints: deque[StateDict] = deque(maxlen=self.k)

    def __len__(self) -> int:
        return len(self.checkpoints)

    def update(self, model) -> None:
        """Store a copy of ``model``'s tensors as the newest checkpoint (the oldest beyond k is dropped)."""
        sd = _snapshot(model, "LatestWeightAverage.update: model")
        if self.checkpoints:
            check_compatible([self.checkpoints[0], sd], ["the first checkpoint", "model"])
        self.checkpoints.append(sd)

    def state_dict(self) -> StateDict:
        """The average of the stored checkpoints (integer tensors from the oldest one)."""
        if not self.checkpoints:
            raise ConfigError("LatestWeightAverage.state_dict: no checkpoint yet; call update(model) first")
        return average_state_dicts(list(self.checkpoints))


# ----------------------------------------------------------------------------------------------
# SWAG


class SWAG:
    """SWA-Gaussian: a Gaussian posterior over the weights collected along an SGD trajectory.

    After n collected models θ_1..θ_n (one per epoch, at a high constant learning rate):

    .. math::  \\bar\\theta = \\frac{1}{n}\\sum_i \\theta_i, \\qquad
               \\overline{\\theta^2} = \\frac{1}{n}\\sum_i \\theta_i^2, \\qquad
               \\Sigma_{\\text{diag}} = \\max(\\overline{\\theta^2} - \\bar\\theta^2, \\epsilon), \\qquad
               \\hat D = [\\theta_i - \\bar\\theta_i]_{\\text{last } K}

    where θ̄_i is the running mean right after θ_i was folded in. A sample is

    .. math::  \\tilde\\theta = \\bar\\theta + \\sqrt{s}\\,\\big(\\Sigma_{\\text{diag}}^{1/2} z_1
               + \\tfrac{1}{\\sqrt{K-1}} \\hat D z_2\\big), \\qquad z_1 \\sim N(0, I_d),\\ z_2 \\sim N(0, I_K)

    with s = ``scale``: s = 1/2 is the paper's SWAG, N(θ̄, ½(Σ_diag + D̂D̂ᵀ/(K−1))); with
    ``low_rank=False`` and s = 1 it is SWAG-Diagonal, N(θ̄, Σ_diag). One z_2 is shared by every tensor
    (the low-rank part couples the whole model). The moments are updated with fused ``_foreach_lerp_``.

    Parameters
    ----------
    max_rank : K, the number of latest deviations kept (0: diagonal only; the paper uses 20).
    var_clamp : ε, the smallest variance (keeps Σ_diag^{1/2} real under rounding).

    Floating-point tensors are modelled; integer tensors (e.g. BatchNorm's counters) are taken from the
    last collected model. Sampled weights of a network with BatchNorm need fresh running statistics
    (``torch.optim.swa_utils.update_bn``) before use.

    Example
    -------
    >>> swag = SWAG(max_rank=20)
    >>> for epoch in range(swa_start, epochs):
    ...     train_one_epoch(model)
    ...     swag.collect(model)
    >>> models = [load_state(model, swag.sample(generator=g)) for _ in range(30)]
    >>> probs = bayesian_model_average(models)(x)

    Reference: Maddox, Garipov, Izmailov, Vetrov, Wilson, "A Simple Baseline for Bayesian Uncertainty in
    Deep Learning", NeurIPS 2019.
    """

    def __init__(self, max_rank: int = 20, var_clamp: float = 1e-30):
        self.max_rank = _positive_int("SWAG", "max_rank", max_rank, minimum=0)
        if not (isinstance(var_clamp, (int, float)) and var_clamp >= 0):
            raise ConfigError(f"SWAG: var_clamp={var_clamp!r} must be a number >= 0")
        self.var_clamp = float(var_clamp)
        self.n_collected = 0
        self._names: list[str] = []
        self._mean: list[torch.Tensor] = []
        self._sq_mean: list[torch.Tensor] = []
        self._deviations: deque[list[torch.Tensor]] = deque(maxlen=max(self.max_rank, 1))
        self._others: StateDict = {}

    @torch.no_grad()
    def collect(self, model) -> None:
        """Fold one model into the moments and append its deviation from the updated mean."""
        sd = state_dict_of(model, "SWAG.collect: model")
        floats = {k: t.detach() for k, t in sd.items() if t.is_floating_point()}
        if self.n_collected == 0:
            self._names = list(floats)
            self._mean = [t.clone() for t in floats.values()]
            self._sq_mean = [t * t for t in floats.values()]
        else:
            if list(floats) != self._names:
                raise ConfigError("SWAG.collect: the model's floating-point tensors differ from the first "
                                  "collected model's; collect one architecture")
            current = [floats[k].to(m.dtype) for k, m in zip(self._names, self._mean)]
            check_compatible([dict(zip(self._names, self._mean)), dict(zip(self._names, current))],
                             ["the collected models", "model"])
            weight = 1.0 / (self.n_collected + 1)
            torch._foreach_lerp_(self._mean, current, weight)
            torch._foreach_lerp_(self._sq_mean, torch._foreach_mul(current, current), weight)
        self.n_collected += 1
        if self.max_rank:
            current = [floats[k].to(m.dtype) for k, m in zip(self._names, self._mean)]
            self._deviations.append(torch._foreach_sub(current, self._mean))
        self._others = {k: t.detach().clone() for k, t in sd.items() if not t.is_floating_point()}

    def _require(self, op: str, at_least: int = 1) -> None:
        if self.n_collected < at_least:
            raise ConfigError(f"SWAG.{op}: {self.n_collected} model(s) collected, {at_least} needed; "
                              f"call collect(model) once per epoch first")

    def mean(self) -> StateDict:
        """θ̄, the SWA solution (integer tensors from the last collected model)."""
        self._require("mean")
        return {**dict(zip(self._names, (m.clone() for m in self._mean))), **self._others}

    def variance(self) -> StateDict:
        """Σ_diag = max(E[θ²] − θ̄², var_clamp) per floating-point tensor."""
        self._require("variance")
        return {k: torch.clamp(sq - m * m, min=self.var_clamp) for k, m, sq in
                zip(self._names, self._mean, self._sq_mean)}

    @property
    def rank(self) -> int:
        """K, the number of deviation columns held now (≤ max_rank)."""
        return len(self._deviations) if self.max_rank else 0

    @torch.no_grad()
    def sample(self, *, scale: float | None = None, low_rank: bool = True,
               generator: torch.Generator | None = None) -> StateDict:
        """One draw θ̃ (see the class doc). ``scale`` defaults to 1/2 with the low-rank part (SWAG) and to 1
        without it (SWAG-Diagonal). ``low_rank`` needs at least two deviation columns."""
        self._require("sample")
        use_low_rank = low_rank and self.max_rank > 0
        if use_low_rank and self.rank < 2:
            raise ConfigError(f"SWAG.sample: the low-rank part needs >= 2 collected models, have {self.rank}; "
                              f"collect more or pass low_rank=False")
        s = (0.5 if use_low_rank else 1.0) if scale is None else float(scale)
        if not s >= 0:
            raise ConfigError(f"SWAG.sample: scale={scale!r} must be >= 0")
        out = {}
        z2 = None
        if use_low_rank:
            z2 = torch.randn(self.rank, generator=generator, dtype=torch.float64).tolist()
        for i, (name, m, var) in enumerate(zip(self._names, self._mean, self.variance().values())):
            z1 = torch.randn(m.shape, generator=generator, dtype=m.dtype, device=m.device)
            noise = var.sqrt() * z1
            if z2 is not None:
                low = sum(z * dev[i] for z, dev in zip(z2, self._deviations)) / math.sqrt(self.rank - 1)
                noise = noise + low
            out[name] = m + math.sqrt(s) * noise
        out.update({k: t.clone() for k, t in self._others.items()})
        return out


class _ProbabilityAverage(nn.Module):
    """log((1/S) Σ_s softmax(f_s(x))): the log of the averaged predictive distribution."""

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        self.members = Ensemble(models, mode="mean")

    def forward(self, *args, **kwargs) -> torch.Tensor:
        outputs = self.members.member_outputs(*args, **kwargs)          # [S, ..., classes]
        return torch.logsumexp(torch.log_softmax(outputs, dim=-1), dim=0) - math.log(outputs.shape[0])


def bayesian_model_average(models: Sequence[nn.Module]) -> nn.Module:
    """The Bayesian model average of sampled models: a module whose output is the log of the mean
    predictive distribution, log((1/S) Σ_s softmax(f_s(x))) (argmax = the BMA prediction; the output is a
    valid log-probability, so cross-entropy on it is the BMA's negative log-likelihood). The members run
    as one batched forward when they share an architecture (see :class:`~fusion_engine.ensemble.Ensemble`)."""
    models = list(models)
    if not models:
        raise ConfigError("bayesian_model_average: pass at least one model")
    return _ProbabilityAverage(models)


# ----------------------------------------------------------------------------------------------
# Lookahead


class Lookahead(torch.optim.Optimizer):
    """Lookahead: k steps forward with any optimizer, then one step back towards the slow weights.

    With φ the slow weights and θ the fast weights driven by the inner optimizer A:

    .. math::  \\theta_{t,0} = \\phi_t, \\quad \\theta_{t,i} = \\theta_{t,i-1} + A(L, \\theta_{t,i-1}),\\ i = 1..k,
               \\qquad \\phi_{t+1} = \\phi_t + \\alpha(\\theta_{t,k} - \\phi_t)

    and training continues from θ_{t+1,0} = φ_{t+1}. The synchronisation is one fused
    ``_foreach_lerp_`` and one ``_foreach_copy_`` per parameter group. The inner optimizer's state
    (e.g. Adam's moments) is kept, as in the paper. ``param_groups`` and ``state`` are the inner
    optimizer's, so learning-rate schedulers work on the wrapper unchanged.

    Parameters
    ----------
    optimizer : the inner ("fast") optimizer, already built on the model's parameters
    k : fast steps per slow step (paper: 5 or 10)
    alpha : slow step size α in [0, 1] (paper: 0.5)

    Example
    -------
    >>> opt = Lookahead(torch.optim.Adam(model.parameters(), lr=1e-3), k=5, alpha=0.5)
    >>> loss.backward(); opt.step(); opt.zero_grad()

    Reference: Zhang, Lucas, Hinton, Ba, "Lookahead Optimizer: k steps forward, 1 step back", NeurIPS 2019.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"Lookahead: optimizer is a {type(optimizer).__name__}; pass a torch.optim.Optimizer")
        self.k = _positive_int("Lookahead", "k", k)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"Lookahead: alpha={alpha!r} must be a number in [0, 1]")
        self.alpha = float(alpha)
        self.optimizer = optimizer
        self.fast_steps = 0
        self.slow_weights = [[p.detach().clone() for p in group["params"]] for group in optimizer.param_groups]
        # the hook registries of torch.optim.Optimizer (the inner optimizer keeps its own)
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, optimizer={self.optimizer!r})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)
        self.slow_weights.append([p.detach().clone() for p in self.optimizer.param_groups[-1]["params"]])

    def step(self, closure: Callable[[], float] | None = None):
        """One fast step of the inner optimizer; every k-th also moves the slow weights (see the class doc)."""
        loss = self.optimizer.step(closure)
        self.fast_steps += 1
        if self.fast_steps % self.k == 0:
            self.synchronize()
        return loss

    @torch.no_grad()
    def synchronize(self) -> None:
        """φ ← φ + α(θ − φ), then θ ← φ, for every parameter group."""
        for group, slow in zip(self.optimizer.param_groups, self.slow_weights):
            fast = [p.data for p in group["params"]]
            torch._foreach_lerp_(slow, fast, self.alpha)
            torch._foreach_copy_(fast, slow)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "slow_weights": [[t.clone() for t in g] for g in
                self.slow_weights], "fast_steps": self.fast_steps, "k": self.k, "alpha": self.alpha}

    def load_state_dict(self, state_dict: dict) -> None:
        missing = {"optimizer", "slow_weights", "fast_steps", "k", "alpha"} - set(state_dict)
        if missing:
            raise ConfigError(f"Lookahead.load_state_dict: missing {sorted(missing)}; pass a Lookahead.state_dict()")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        shapes = [[tuple(p.shape) for p in g["params"]] for g in self.optimizer.param_groups]
        if [[tuple(t.shape) for t in g] for g in state_dict["slow_weights"]] != shapes:
            raise ConfigError("Lookahead.load_state_dict: the slow weights do not match the parameters' shapes")
        with torch.no_grad():
            for group, saved in zip(self.slow_weights, state_dict["slow_weights"]):
                torch._foreach_copy_(group, [t.to(g.device, g.dtype) for t, g in zip(saved, group)])
        self.fast_steps, self.k, self.alpha = state_dict["fast_steps"], state_dict["k"], state_dict["alpha"]


# ----------------------------------------------------------------------------------------------
# cyclic learning rates that collect one model per cycle


def snapshot_ensemble_lr(step: int, *, total_steps: int, cycles: int, lr_max: float) -> float:
    """The learning rate of snapshot ensembles at (1-based) ``step``: M cosine-annealing cycles over T steps.

    .. math::  \\alpha(t) = \\frac{\\alpha_0}{2}\\Big(\\cos\\Big(\\frac{\\pi\\, \\mathrm{mod}(t-1,
               \\lceil T/M \\rceil)}{\\lceil T/M \\rceil}\\Big) + 1\\Big)

    Reference: Huang, Li, Pleiss, Liu, Hopcroft, Weinberger, "Snapshot Ensembles: Train 1, get M for
    free", ICLR 2017, Eq. (2).
    """
    period = math.ceil(total_steps / cycles)
    return lr_max / 2 * (math.cos(math.pi * ((step - 1) % period) / period) + 1)


def fge_lr(step: int, *, cycle_length: int, lr_high: float, lr_low: float) -> float:
    """The learning rate of fast geometric ensembling at (1-based) ``step``: a triangular cycle of c steps.

    .. math::  t = \\frac{\\mathrm{mod}(i-1, c) + 1}{c}, \\qquad
               \\alpha(i) = \\begin{cases} (1 - 2t)\\alpha_1 + 2t\\alpha_2 & t \\le 1/2 \\\\
               (2 - 2t)\\alpha_2 + (2t - 1)\\alpha_1 & t > 1/2 \\end{cases}

    α_1 = ``lr_high``, α_2 = ``lr_low``: the rate falls to α_2 at mid-cycle, where the model is collected.

    Reference: Garipov, Izmailov, Podoprikhin, Vetrov, Wilson, "Loss Surfaces, Mode Connectivity, and Fast
    Ensembling of DNNs", NeurIPS 2018, Eq. (2).
    """
    t = ((step - 1) % cycle_length + 1) / cycle_length
    if t <= 0.5:
        return (1 - 2 * t) * lr_high + 2 * t * lr_low
    return (2 - 2 * t) * lr_low + (2 * t - 1) * lr_high


class CyclicSnapshots:
    """Drive a cyclic learning rate and keep one model per cycle, at the cycle's learning-rate minimum.

    Build it with :meth:`snapshot_ensemble` (cosine cycles, a snapshot at the end of each) or
    :meth:`fast_geometric` (triangular cycles, a snapshot at mid-cycle). It sets the learning rate of every
    parameter group for step 1 when built; call :meth:`step` after each optimizer step: it stores a
    snapshot when that step closed a collection point and sets the rate for the next step.
    :meth:`ensemble` returns the collected models as an :class:`~fusion_engine.ensemble.Ensemble`.

    Example
    -------
    >>> snaps = CyclicSnapshots.snapshot_ensemble(opt, total_steps=T, cycles=5, lr_max=0.1)
    >>> for x, y in batches:                      # T steps in all
    ...     loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
    ...     snaps.step(model)
    >>> ens = snaps.ensemble(model)               # mean of the 5 snapshots' logits
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr_at: Callable[[int], float],
                 collect_at: Callable[[int], bool]):
        self.optimizer = optimizer
        self.lr_at = lr_at
        self.collect_at = collect_at
        self.steps = 0
        self.snapshots: list[StateDict] = []
        self._set_lr(1)

    @classmethod
    def snapshot_ensemble(cls, optimizer, *, total_steps: int, cycles: int, lr_max: float) -> "CyclicSnapshots":
        """Huang et al.'s schedule (:func:`snapshot_ensemble_lr`), a snapshot when each cycle ends."""
        op = "CyclicSnapshots.snapshot_ensemble"
        total_steps = _positive_int(op, "total_steps", total_steps)
        cycles = _positive_int(op, "cycles", cycles)
        if cycles > total_steps:
            raise ConfigError(f"{op}: cycles={cycles} > total_steps={total_steps}; each cycle needs a step")
        _check_lr(op, "lr_max", lr_max)
        period = math.ceil(total_steps / cycles)
        return cls(optimizer, lambda s: snapshot_ensemble_lr(s, total_steps=total_steps, cycles=cycles, lr_max=lr_max),
                   lambda s: s % period == 0 or s == total_steps)

    @classmethod
    def fast_geometric(cls, optimizer, *, cycle_length: int, lr_high: float, lr_low: float) -> "CyclicSnapshots":
        """Garipov et al.'s FGE schedule (:func:`fge_lr`), a snapshot at each cycle's middle (c even)."""
        op = "CyclicSnapshots.fast_geometric"
        cycle_length = _positive_int(op, "cycle_length", cycle_length, minimum=2)
        if cycle_length % 2:
            raise ConfigError(f"{op}: cycle_length={cycle_length} must be even (the model is collected at "
                              f"mid-cycle, where the rate reaches lr_low)")
        _check_lr(op, "lr_high", lr_high)
        _check_lr(op, "lr_low", lr_low)
        return cls(optimizer, lambda s: fge_lr(s, cycle_length=cycle_length, lr_high=lr_high, lr_low=lr_low),
                   lambda s: (s - 1) % cycle_length + 1 == cycle_length // 2)

    def _set_lr(self, step: int) -> None:
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, model) -> None:
        """After optimizer step ``self.steps + 1``: snapshot if it closes a collection point; set the next rate."""
        self.steps += 1
        if self.collect_at(self.steps):
            self.snapshots.append(_snapshot(model, "CyclicSnapshots.step: model"))
        self._set_lr(self.steps + 1)

    def ensemble(self, template: nn.Module, mode: str = "mean") -> Ensemble:
        """The snapshots as an :class:`~fusion_engine.ensemble.Ensemble` (copies of ``template``)."""
        if not self.snapshots:
            raise ConfigError("CyclicSnapshots.ensemble: no snapshot collected yet (no cycle has reached its "
                              "collection point)")
        return Ensemble([load_state(template, sd) for sd in self.snapshots], mode=mode)


def _check_lr(op: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(f"{op}: {name}={value!r} must be a learning rate >= 0")


__all__ = ["CyclicSnapshots", "LatestWeightAverage", "Lookahead", "SWAG", "bayesian_model_average", "fge_lr",
           "snapshot_ensemble_lr"]
