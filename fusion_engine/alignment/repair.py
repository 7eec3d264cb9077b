"""REPAIR: restore each channel's activation statistics after an aligned interpolation (Jordan et al.).

Interpolating two aligned networks shrinks the variance of their hidden units ("variance collapse"),
which compounds with depth. REPAIR rescales every channel c of every corrected site so that its
mean and standard deviation in the merged network equal the interpolation of the endpoints':

.. math::  \\mu^\\star_c = \\sum_k w_k\\,\\mu_{k,c}, \\qquad \\sigma^\\star_c = \\sum_k w_k\\,\\sigma_{k,c}, \\qquad
           y_c \\leftarrow \\frac{\\sigma^\\star_c}{\\sigma_c}\\,(y_c - \\mu_c) + \\mu^\\star_c

where :math:`\\mu_c, \\sigma_c` are the merged network's statistics at that site. At an RMSNorm
(``nn.RMSNorm``, or any ``*RMSNorm`` class such as transformers' ``LlamaRMSNorm``), whose output has a
per-channel scale and no shift, the correction is the scale that gives the channel the interpolated
root mean square, :math:`y_c \\leftarrow (\\rho^\\star_c / \\rho_c)\\,y_c` with
:math:`\\rho = \\sqrt{E[y^2]}` and :math:`\\rho^\\star_c = \\sum_k w_k\\,\\rho_{k,c}` (exact: a scale
multiplies the RMS). The affine correction
is folded into the module producing the channel (a Linear/Conv layer's rows and bias, or a
BatchNorm/LayerNorm/GroupNorm's affine weight and bias), so the result is a plain network of the same
architecture. Sites are corrected in forward order, each measured with the earlier ones already
corrected (as the paper's reset layers do); statistics are streamed over the batches in float64
(every sample, token or pixel is an observation), one pass per endpoint and one per site.

It applies to networks with BatchNorm (where it subsumes re-estimating the running statistics: the
BN's affine output is corrected), LayerNorm, RMSNorm (pass the norms as ``sites`` for a transformer:
folding a shift into a bias-free Linear would add a bias the architecture does not have), or no
normalisation at all.

Reference: Jordan, Sedghi, Saukh, Entezari & Neyshabur, "REPAIR: REnormalizing Permuted Activations
for Interpolation Repair", ICLR 2023.
"""

from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .activation_matching import _run, _units

STD_EPS = 1e-8
_LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def _rms_norm(module: nn.Module) -> bool:
    """An RMS normalisation (a per-channel scale, no shift): torch's, or a library's ``*RMSNorm`` class."""
    return isinstance(module, nn.RMSNorm) or type(module).__name__.endswith("RMSNorm")


def _affine(module: nn.Module) -> bool:
    return isinstance(module, _LINEAR + _NORMS) or _rms_norm(module)


def default_sites(model: nn.Module) -> list[str]:
    """The modules REPAIR corrects by default: each Linear/Conv not followed by a norm, and each norm with
    affine parameters (the unit-carrying outputs of a feed-forward network), except the last layer."""
    leaves = [(n, m) for n, m in model.named_modules() if _affine(m)]
    sites = []
    for i, (name, m) in enumerate(leaves[:-1]):
        nxt = leaves[i + 1][1]
        is_norm = not isinstance(m, _LINEAR)
        if is_norm and getattr(m, "weight", None) is None:
            continue
        if not is_norm and not isinstance(nxt, _LINEAR):
            continue  # a norm follows: correct the norm instead
        sites.append(name)
    return sites


@torch.no_grad()
def _moments(model: nn.Module, sites: Sequence[str], batches) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per-channel (mean, std, root mean square) of each site's output over the batches, streamed in float64."""
    modules = dict(model.named_modules())
    acc: dict[str, list] = {}
    handles = []
    for name in sites:
        def hook(_m, _args, out, name=name):
            x = _units(out, name).double()
            s = acc.setdefault(name, [0, 0.0, 0.0])
            s[0] += x.shape[0]
            s[1] = s[1] + x.sum(0)
            s[2] = s[2] + (x * x).sum(0)
        handles.append(modules[name].register_forward_hook(hook))
    flag = model.training
    model.eval()
    try:
        for batch in batches:
            _run(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(flag)
    out = {}
    for name in sites:
        if name not in acc:
            raise ConfigError(f"repair: site {name!r} produced no output on the batches (is it used by forward?)")
        count, total, squares = acc[name]
        mean, mean_square = total / count, squares / count
        out[name] = mean, (mean_square - mean * mean).clamp_min(0).sqrt(), mean_square.sqrt()
    return out


def _fold(module: nn.Module, scale: torch.Tensor, shift: torch.Tensor | None, name: str) -> None:
    """``y ← scale·y + shift`` per output channel (``scale·y`` when shift is None), folded into the
    module's parameters."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise ConfigError(f"repair: site {name!r} ({type(module).__name__}) has no affine weight to fold into")
    if w.shape[0] != scale.shape[0]:
        raise ConfigError(f"repair: site {name!r} has {scale.shape[0]} channels but its weight has {w.shape[0]} "
                          f"rows; pass sites whose output channels are the weight's first axis")
    view = (-1,) + (1,) * (w.dim() - 1)
    w.mul_(scale.to(w.dtype).view(view))
    bias = getattr(module, "bias", None)
    if shift is None:
        if isinstance(bias, torch.Tensor):
            bias.mul_(scale.to(bias.dtype))
        return
    if bias is None:
        module.bias = bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    bias.mul_(scale.to(w.dtype)).add_(shift.to(w.dtype))


@torch.no_grad()
def repair(merged: nn.Module, endpoints: Sequence[nn.Module], batches: Iterable, *,
           weights: Sequence[float] | None = None, sites: Sequence[str] | None = None) -> nn.Module:
    """A copy of ``merged`` whose channels have the interpolated statistics of the ``endpoints`` (REPAIR).

    Parameters
    ----------
    merged : the interpolated network, ``Σ_k w_k·π_k(θ_k)`` (not modified)
    endpoints : the K aligned networks it interpolates (same architecture, already permuted)
    batches : model inputs (see :func:`unit_statistics`); kept in memory for the passes
    weights : the K interpolation weights (default 1/K each)
    sites : module names to correct (default :func:`default_sites`): each output's channels (dim 1 of a
        2-D/4-D output, the last dim of a 3-D one) must be the rows of the module's ``weight``

    Example
    -------
    >>> merged = align_and_merge(model_a, model_b, "weight_matching", reset_bn=False)
    >>> fixed = repair(merged, [model_a, aligned_b], [x_train[:1024]])
    """
    endpoints = list(endpoints)
    if not endpoints:
        raise ConfigError("repair: pass the aligned endpoint networks")
    w = [1.0 / len(endpoints)] * len(endpoints) if weights is None else [float(x) for x in weights]
    if len(w) != len(endpoints):
        raise ConfigError(f"repair: got {len(w)} weights for {len(endpoints)} endpoints")
    batches = list(batches)
    if not batches:
        raise ConfigError("repair: batches is empty; pass at least one batch of inputs")
    out = copy.deepcopy(merged)
    sites = list(sites) if sites is not None else default_sites(out)
    modules = dict(out.named_modules())
    for name in sites:
        if name not in modules:
            raise ConfigError(f"repair: the model has no module {name!r}")
    stats = [_moments(m, sites, batches) for m in endpoints]
    for name in sites:
        module = modules[name]
        seen: dict = {}  # the site's first call: its inputs and output, to check the fold

        def keep_first_call(_m, args, y, seen=seen):
            if "call" not in seen:
                seen["call"] = _clone(args), _clone(y)  # returns None: the output is not replaced

        handle = module.register_forward_hook(keep_first_call)
        try:
            mean, std, rms = _moments(out, [name], batches)[name]
        finally:
            handle.remove()
        if _rms_norm(module):  # a scale only: match the root mean square
            rms_t = sum(wk * s[name][2] for wk, s in zip(w, stats))
            scale, shift = rms_t / (rms + STD_EPS), None
        else:
            mean_t = sum(wk * s[name][0] for wk, s in zip(w, stats))
            std_t = sum(wk * s[name][1] for wk, s in zip(w, stats))
            scale = std_t / (std + STD_EPS)
            shift = mean_t - scale * mean
        _fold(module, scale, shift, name)
        _check_fold(module, *seen["call"], scale, shift, name)
    return out


def _clone(x):
    """Tensors of ``x`` (a tensor, or a tuple/list of arguments) copied: later in-place ops (ReLU(inplace=True))
    must not change what was seen."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_clone(v) for v in x)
    return x


def _check_fold(module: nn.Module, args, before, scale, shift, name: str) -> None:
    """The folded module's output on its first seen input is ``scale·y + shift`` per channel: a module
    whose output is not affine in its weight and bias that way (e.g. an RMSNorm computing x̂·(1 + w))
    cannot take the correction, and is named instead of silently mis-corrected."""
    y = _units(module(*args), name).double()
    expected = _units(before, name).double() * scale + (0.0 if shift is None else shift)
    if not torch.allclose(y, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max().clamp_min(1e-12))):
        raise ConfigError(f"repair: site {name!r} ({type(module).__name__}): its output does not scale with its "
                          f"weight{'' if shift is None else ' and shift with its bias'}, so the correction cannot be "
                          f"folded into it; pass other sites")
