"""Training-time weight averaging: model soups (uniform, greedy), SWA and EMA.

* :func:`uniform_soup` — the plain average of fine-tuned models, θ = (1/K) Σ θ_i.
* :func:`greedy_soup` — Wortsman et al.'s greedy soup: ingredients sorted by held-out score, each one
  kept only if adding it to the soup does not lower the held-out score.
* :func:`ema_update_`, :func:`swa_update_` — in-place multi-tensor updates (``torch._foreach_*``, one
  fused kernel launch per device and dtype instead of one per tensor), and
  :func:`get_ema_multi_avg_fn` / :func:`get_swa_multi_avg_fn`, the same updates in the signature
  ``torch.optim.swa_utils.AveragedModel(multi_avg_fn=...)`` expects.

Models are ``nn.Module`` instances or state dicts (name → tensor). Inputs are never modified (except
the averaged tensors an ``*_update_`` function is asked to update).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .errors import ConfigError, DTypeMismatchError, MissingTensorError, ShapeMismatchError
from .ops import linear_merge

StateDict = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# models and state dicts


def state_dict_of(model, what: str = "model") -> StateDict:
    """The tensors of an ``nn.Module`` (its ``state_dict()``, detached) or of a mapping name → tensor."""
    if isinstance(model, nn.Module):
        return {name: t.detach() for name, t in model.state_dict().items()}
    if isinstance(model, Mapping):
        for name, t in model.items():
            if not isinstance(t, torch.Tensor):
                raise ConfigError(f"{what}: entry {name!r} is a {type(t).__name__}, not a tensor; pass an "
                                  f"nn.Module or a state dict of tensors")
        return dict(model)
    raise ConfigError(f"{what} is a {type(model).__name__}; pass an nn.Module or a state dict (name -> tensor)")


def check_compatible(state_dicts: Sequence[StateDict], names: Sequence[str]) -> None:
    """Raise unless every state dict has the first one's tensor names, shapes and dtypes."""
    ref = state_dicts[0]
    for sd, who in zip(state_dicts[1:], names[1:]):
        missing = [k for k in ref if k not in sd]
        extra = [k for k in sd if k not in ref]
        if missing or extra:
            raise MissingTensorError(
                f"{who} does not have the tensors of {names[0]}: missing {missing[:5]}, unexpected {extra[:5]}; "
                f"models to average must share one architecture")
        for k, t in ref.items():
            if sd[k].shape != t.shape:
                raise ShapeMismatchError(f"tensor {k!r}: {who} has shape {tuple(sd[k].shape)}, {names[0]} has "
                                         f"{tuple(t.shape)}; models to average must share one architecture")
            if sd[k].dtype != t.dtype:
                raise DTypeMismatchError(f"tensor {k!r}: {who} is {sd[k].dtype}, {names[0]} is {t.dtype}; "
                                         f"cast the models to one dtype first")


def load_state(template: nn.Module, state_dict: StateDict) -> nn.Module:
    """A deep copy of ``template`` holding ``state_dict`` (``template`` itself is untouched)."""
    model = copy.deepcopy(template)
    model.load_state_dict(state_dict)
    return model


def _as_models(models, op: str) -> tuple[list[StateDict], list[str]]:
    single = isinstance(models, Mapping) or (isinstance(models, nn.Module) and not isinstance(models, nn.ModuleList))
    models = None if single else list(models)
    if not models:
        raise ConfigError(f"{op}: pass a non-empty list of models (nn.Module or state dicts)")
    names = [f"models[{i}]" for i in range(len(models))]
    sds = [state_dict_of(m, n) for m, n in zip(models, names)]
    check_compatible(sds, names)
    return sds, names


def average_state_dicts(state_dicts: Sequence[StateDict], weights=None) -> StateDict:
    """Σ_i c_i θ_i tensor by tensor (c = weights / Σ weights, uniform by default), via :func:`linear_merge`.

    Floating-point tensors are averaged; integer and bool tensors (e.g. BatchNorm's
    ``num_batches_tracked``) are taken from the first state dict.
    """
    out: StateDict = {}
    for name, first in state_dicts[0].items():
        if first.is_floating_point():
            out[name] = linear_merge([sd[name] for sd in state_dicts], weights)
        else:
            out[name] = first.clone()
    return out


# ----------------------------------------------------------------------------------------------
# soups


def uniform_soup(models, weights=None) -> StateDict:
    """The uniform model soup: the (weighted) average of K models' parameters.

    .. math::  \\theta_{\\text{soup}} = \\sum_{i=1}^{K} c_i \\theta_i, \\qquad c_i = w_i / \\sum_j w_j
               \\; (\\text{uniform: } c_i = 1/K)

    Parameters
    ----------
    models : K ``nn.Module`` or state dicts with the same tensor names, shapes and dtypes
    weights : K floats (normalised to sum 1) or None for the uniform average

    Returns
    -------
    The soup's state dict (load it with ``model.load_state_dict`` or :func:`load_state`). Integer
    tensors are taken from ``models[0]``.

    Example
    -------
    >>> soup = uniform_soup([model_a, model_b, model_c])
    >>> model_a.load_state_dict(soup)

    Reference: Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
    accuracy without increasing inference time", ICML 2022.
    """
    sds, _ = _as_models(models, "uniform_soup")
    return average_state_dicts(sds, weights)


@dataclass
class GreedySoup:
    """Result of :func:`greedy_soup`.

    state_dict : the soup's tensors; model : a copy of the template holding them;
    ingredients : indices (into the input list) of the models in the soup, in the order they were added;
    score : the soup's held-out score; individual_scores : each model's own score;
    history : (candidate index, score of the soup with it, kept?) for every candidate tried.
    """

    state_dict: StateDict
    model: nn.Module
    ingredients: list[int]
    score: float
    individual_scores: list[float]
    history: list[tuple[int, float, bool]] = field(default_factory=list)


def greedy_soup(models, evaluate: Callable[[nn.Module], float], *, template: nn.Module | None = None) -> GreedySoup:
    """Greedy model soup: add ingredients in order of held-out score, keep one only if the score does not drop.

    With s(·) the held-out score (higher is better) and models sorted so s(θ_(1)) ≥ s(θ_(2)) ≥ …:

    .. math::  S \\leftarrow \\{(1)\\};\\quad \\text{for } i = 2..K:\\ \\text{if }
               s\\big(\\tfrac{1}{|S|+1} \\textstyle\\sum_{j \\in S \\cup \\{(i)\\}} \\theta_j\\big) \\ge s(\\text{soup}(S))
               \\text{ then } S \\leftarrow S \\cup \\{(i)\\}

    The soup starts from the best single model, so its score is never below the best ingredient's.

    Parameters
    ----------
    models : K ``nn.Module`` (or state dicts, with ``template``) sharing one architecture
    evaluate : model → held-out score, higher is better (e.g. validation accuracy; pass −loss for a loss).
        Called K times on the individual models and K − 1 times on candidate soups.
    template : the module to load state dicts into (default: ``models[0]`` when it is a module)

    Returns
    -------
    :class:`GreedySoup` (state dict, model, ingredients, score, individual scores, history).

    Reference: Wortsman et al., "Model soups", ICML 2022, Recipe 1.
    """
    op = "greedy_soup"
    if not callable(evaluate):
        raise ConfigError(f"{op}: evaluate must be a callable model -> score (higher is better)")
    models = list(models) if isinstance(models, (list, tuple, nn.ModuleList)) else models
    sds, _ = _as_models(models, op)
    if template is None:
        if not isinstance(models[0], nn.Module):
            raise ConfigError(f"{op}: models are state dicts; pass template=<an nn.Module of their architecture> "
                              f"so candidate soups can be evaluated")
        template = models[0]

    def score_of(sd: StateDict) -> float:
        value = evaluate(load_state(template, sd))
        try:
            return float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{op}: evaluate returned {value!r}; it must return a number (higher is better)") from exc

    individual = [score_of(sd) for sd in sds]
    order = sorted(range(len(sds)), key=lambda i: (-individual[i], i))  # best first, ties by index
    ingredients = [order[0]]
    soup, best = sds[order[0]], individual[order[0]]
    history: list[tuple[int, float, bool]] = []
    for i in order[1:]:
        candidate = average_state_dicts([sds[j] for j in ingredients + [i]])
        score = score_of(candidate)
        keep = score >= best
        history.append((i, score, keep))
        if keep:
            ingredients.append(i)
            soup, best = candidate, score
    soup = {name: t.clone() for name, t in soup.items()} if len(ingredients) == 1 else soup
    return GreedySoup(soup, load_state(template, soup), ingredients, best, individual, history)


# ----------------------------------------------------------------------------------------------
# SWA / EMA: fused multi-tensor updates


def _check_pairs(op: str, averaged: Sequence[torch.Tensor], current: Sequence[torch.Tensor]) -> None:
    if len(averaged) != len(current):
        raise ConfigError(f"{op}: {len(averaged)} averaged tensors but {len(current)} current ones; pass the same "
                          f"parameters of the averaged model and of the model")
    for i, (a, c) in enumerate(zip(averaged, current)):
        if a.shape != c.shape:
            raise ShapeMismatchError(f"{op}: averaged[{i}] has shape {tuple(a.shape)}, current[{i}] has "
                                     f"{tuple(c.shape)}")


def _grouped(averaged: Sequence[torch.Tensor], current: Sequence[torch.Tensor]):
    """(averaged, current) lists grouped by the averaged tensor's (device, dtype): one fused call per group.

    ``current`` is moved/cast to the averaged tensor's device and dtype (as AveragedModel does).
    """
    groups: dict = defaultdict(lambda: ([], []))
    for a, c in zip(averaged, current):
        a = a.detach()
        c = c.detach()
        if c.device != a.device or c.dtype != a.dtype:
            c = c.to(device=a.device, dtype=a.dtype)
        avg, cur = groups[(a.device, a.dtype)]
        avg.append(a)
        cur.append(c)
    return groups.items()


def _fusible(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


@torch.no_grad()
def ema_update_(averaged: Sequence[torch.Tensor], current: Sequence[torch.Tensor], decay: float) -> None:
    """Exponential moving average, in place on ``averaged``.

    .. math::  W^{\\text{EMA}} \\leftarrow \\text{decay} \\cdot W^{\\text{EMA}} + (1 - \\text{decay}) \\cdot W
               = \\operatorname{lerp}(W^{\\text{EMA}}, W, 1 - \\text{decay})

    One ``torch._foreach_lerp_`` per (device, dtype) group; integer tensors use the same formula
    written out (the result is truncated to the integer dtype, as torch's AveragedModel does).
    """
    decay = _check_decay("ema_update_", decay)
    _check_pairs("ema_update_", averaged, current)
    for (_, dtype), (avg, cur) in _grouped(averaged, current):
        if _fusible(dtype):
            torch._foreach_lerp_(avg, cur, 1.0 - decay)
        else:
            for a, c in zip(avg, cur):
                a.copy_(a * decay + c * (1 - decay))


@torch.no_grad()
def swa_update_(averaged: Sequence[torch.Tensor], current: Sequence[torch.Tensor], n_averaged) -> None:
    """Stochastic weight averaging: fold one more model into a running mean, in place on ``averaged``.

    .. math::  W^{\\text{SWA}} \\leftarrow W^{\\text{SWA}} + \\frac{W - W^{\\text{SWA}}}{n + 1}
               = \\operatorname{lerp}\\big(W^{\\text{SWA}}, W, \\tfrac{1}{n+1}\\big)

    where n = ``n_averaged`` is the number of models already in the mean (an int or a 0-d tensor).
    One ``torch._foreach_lerp_`` per (device, dtype) group; integer tensors get the rounded mean.
    """
    n = n_averaged
    if isinstance(n, torch.Tensor) and n.numel() != 1:
        raise ConfigError(f"swa_update_: n_averaged must be a number or a 0-d tensor, got shape {tuple(n.shape)}")
    if not float(n) >= 0:
        raise ConfigError(f"swa_update_: n_averaged={float(n)} must be >= 0 (the count of models already averaged)")
    # 1/(n+1) computed as AveragedModel computes it (in float32 when n is its int64 counter tensor)
    weight = float(1 / (n + 1))
    _check_pairs("swa_update_", averaged, current)
    for (_, dtype), (avg, cur) in _grouped(averaged, current):
        if _fusible(dtype):
            torch._foreach_lerp_(avg, cur, weight)
        else:  # integer counters (e.g. num_batches_tracked): the running mean, rounded
            for a, c in zip(avg, cur):
                a.copy_(torch.lerp(a.double(), c.double(), weight).round())


def _check_decay(op: str, decay) -> float:
    try:
        decay = float(decay)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{op}: decay={decay!r} must be a float in [0, 1]") from exc
    if not 0.0 <= decay <= 1.0:
        raise ConfigError(f"{op}: decay={decay} must be in [0, 1] (e.g. 0.999)")
    return decay


def get_ema_multi_avg_fn(decay: float = 0.999):
    """An EMA ``multi_avg_fn`` for ``torch.optim.swa_utils.AveragedModel``: :func:`ema_update_` with ``decay``.

    >>> ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99))
    >>> ema.update_parameters(model)   # after each optimizer step
    """
    decay = _check_decay("get_ema_multi_avg_fn", decay)

    def ema_multi_avg_fn(averaged, current, n_averaged=None) -> None:
        ema_update_(averaged, current, decay)

    return ema_multi_avg_fn


def get_swa_multi_avg_fn():
    """An SWA ``multi_avg_fn`` for ``torch.optim.swa_utils.AveragedModel``: :func:`swa_update_`.

    >>> swa = AveragedModel(model, multi_avg_fn=get_swa_multi_avg_fn())
    """

    def swa_multi_avg_fn(averaged, current, n_averaged) -> None:
        swa_update_(averaged, current, n_averaged)

    return swa_multi_avg_fn


__all__ = ["GreedySoup", "average_state_dicts", "ema_update_", "get_ema_multi_avg_fn", "get_swa_multi_avg_fn",
           "greedy_soup", "load_state", "state_dict_of", "swa_update_", "uniform_soup"]
