"""RegMean: merge every Linear layer by the least-squares fit of the models' outputs on their own inputs.

For a Linear layer with weights W_i ∈ R^{out×in} in model i and inputs X_i ∈ R^{n_i×in}, RegMean
minimises Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖²_F, whose solution is

.. math::

    W^\\star{}^{\\top} = \\Big(\\sum_i \\tilde G_i\\Big)^{-1} \\sum_i \\tilde G_i W_i^{\\top},
    \\qquad G_i = X_i^{\\top} X_i,
    \\qquad \\tilde G_i = \\alpha\\, G_i + (1 - \\alpha)\\, \\mathrm{diag}(G_i)

α < 1 shrinks the off-diagonal entries of the Gram matrices (the paper's regulariser): α = 1 is the
exact least-squares merge; α → 0 weights each input column of W_i by that input's energy
(G_i)_{jj}, which is simple averaging when those energies are equal across models.

Reference: Jin, Ren, Preotiuc-Pietro & Cheng, "Dataless Knowledge Fusion by Merging Weights of
Language Models", ICLR 2023; RegMean++: Nguyen et al., arXiv:2508.03121, 2025.
"""

from __future__ import annotations

import copy
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import ConfigError, FusionEngineError, MissingTensorError, ShapeMismatchError
from ..ops import linear_merge
from ..ops import _common as C
from ._inputs import accum_dtype, eval_mode, iterate_batches, module_device, state_dicts_of


class _StopForward(Exception):
    """Raised by a hook once the input it waited for has been seen (RegMean++ stops the forward there)."""


def collect_gram(model: nn.Module, batches: Iterable, *, average: bool = False) -> dict[str, torch.Tensor]:
    """Gram matrices XᵀX of the inputs of every ``nn.Linear`` in ``model``, summed over ``batches``.

    .. math::  G_m = \\sum_{\\text{batches}} X_m^{\\top} X_m \\in \\mathbb{R}^{in \\times in}

    where X_m holds the inputs of Linear module m as rows (leading dimensions flattened: a
    ``[batch, tokens, in]`` input gives batch·tokens rows). Forward pre-hooks add each batch's XᵀX
    into one running sum per module (``addmm_``); nothing is stored per batch. For inputs at least
    ``_TRIANGLE_FROM`` wide only the block upper triangle of XᵀX is accumulated (block rows of
    ``_block(in)`` columns: (b+1)/(2b) of the GEMM work for b blocks) and mirrored once at the end.

    Parameters
    ----------
    model : nn.Module, run in eval mode under ``torch.no_grad`` (flags restored, never modified)
    batches : iterable of ``x`` or ``(x, y)`` (``y`` unused); inputs are moved to the model's device
    average : divide each sum by its number of rows (FusionBench's convention). The default sum is
        RegMean's objective over all examples, so a model seen on more data weighs more.

    Returns
    -------
    ``{module name: G}`` for every Linear the batches reached, float32 (float64 for float64
    weights), keyed like ``model.named_modules()`` (so ``name + ".weight"`` is the weight's key;
    a model that is itself one Linear has the name ``""`` and the key ``"weight"``).

    Example
    -------
    >>> grams = collect_gram(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), [torch.randn(5, 4)])
    >>> {k: tuple(v.shape) for k, v in grams.items()}
    {'0': (4, 4), '2': (3, 3)}
    """
    where = "collect_gram"
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{where}: model is a {type(model).__name__}; pass an nn.Module")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not linears:
        raise ConfigError(f"{where}: the model has no nn.Linear module; RegMean merges Linear layers")
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    device = module_device(model)
    handles = [m.register_forward_pre_hook(_gram_hook(name, m, sums, rows)) for name, m in linears.items()]
    try:
        with eval_mode(model), torch.no_grad():
            for x, _ in iterate_batches(where, batches):
                model(x.to(device))
    finally:
        for h in handles:
            h.remove()
    for g in sums.values():
        _mirror_upper(g)
    if average:
        for name, g in sums.items():
            g.div_(max(rows[name], 1))
    return {name: sums[name] for name in linears if name in sums}


_TRIANGLE_FROM = 512   # input width from which the block upper triangle beats one full XᵀX GEMM


def _block(width: int) -> int:
    return 128 if width < 2048 else 256


def _add_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += XᵀX for x [rows, in]: the full GEMM, or, from ``_TRIANGLE_FROM`` columns on, only the
    block upper triangle (block row i: X_iᵀ X_{i:}), completed later by :func:`_mirror_upper`."""
    width = x.shape[1]
    if width < _TRIANGLE_FROM:
        acc.addmm_(x.t(), x)
        return
    b = _block(width)
    for i in range(0, width, b):
        acc[i:i + b, i:].addmm_(x[:, i:i + b].t(), x[:, i:])


def _mirror_upper(acc: torch.Tensor) -> None:
    """Complete a Gram accumulated by :func:`_add_gram`: its lower triangle becomes the mirror of the upper."""
    if acc.shape[0] >= _TRIANGLE_FROM:
        upper = torch.triu(acc)
        acc.copy_(upper + torch.triu(acc, 1).t())


def _gram_hook(name: str, module: nn.Linear, sums: dict, rows: dict, stop: bool = False):
    def hook(_module, inputs):
        x = inputs[0]
        x = x.reshape(-1, x.shape[-1])
        x = x.to(accum_dtype(module.weight.dtype))
        if name not in sums:
            sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
            rows[name] = 0
        _add_gram(sums[name], x)
        rows[name] += x.shape[0]
        if stop:
            raise _StopForward
    return hook


def regmean_merge(models: Sequence, grams: Sequence[Mapping[str, torch.Tensor]] | None, *, alpha: float = 0.95,
                  plus_plus: bool = False, batches: Sequence[Iterable] | None = None,
                  template: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Merge K models: RegMean for every Linear weight, the plain average for every other tensor.

    .. math::

        W^\\star{}^{\\top} = \\Big(\\sum_i \\tilde G_i\\Big)^{-1} \\sum_i \\tilde G_i W_i^{\\top},
        \\qquad \\tilde G_i = \\alpha G_i + (1-\\alpha)\\,\\mathrm{diag}(G_i)

    The systems of all layers with the same input width are solved together by one batched
    Cholesky factorisation and ``cholesky_solve`` (no explicit inverse). An input feature that no
    model ever activated (a zero row and column of Σ G̃_i) leaves its column of W undetermined; it
    gets the models' average. A system that is still numerically singular is solved with a small
    ridge toward the average, λ = 10⁻⁶·mean(diag), growing tenfold until Cholesky succeeds.
    Biases and every non-Linear tensor are averaged; integer buffers come from the first model.

    ``plus_plus=True`` is RegMean++: the Linear layers are merged one at a time in forward order,
    and the Gram of layer l for model i is computed from model i's ``batches`` run through the
    partially merged model (layers before l already merged, everything else averaged), so each
    layer is fitted to the inputs it will see in the merged model.

    Parameters
    ----------
    models : K nn.Modules of one architecture, or K state dicts (RegMean++ with state dicts needs
        ``template``)
    grams : K dicts ``{Linear module name: G}`` from :func:`collect_gram` (None for RegMean++)
    alpha : α ∈ [0, 1], the share of the off-diagonal Gram entries kept (the paper's default is
        0.9–0.95; 1 gives the exact least-squares merge)
    plus_plus : RegMean++ (above)
    batches : RegMean++ only: K iterables of batches, one per model (each is read once per Linear
        layer, so generators are materialised)
    template : RegMean++ only: a module of the architecture (default: ``models[0]``); it is copied,
        never modified

    Returns
    -------
    The merged state dict, in the models' key order and dtypes.
    """
    where = "regmean_merge"
    if not (isinstance(alpha, (int, float)) and 0.0 <= float(alpha) <= 1.0):
        raise ConfigError(f"{where}: alpha={alpha!r} must be a number in [0, 1] (the share of the "
                          f"off-diagonal Gram entries kept)")
    sds = state_dicts_of(where, models)
    if plus_plus:
        if grams is not None:
            raise ConfigError(f"{where}: RegMean++ recomputes the Gram matrices layer by layer from `batches`; "
                              f"pass grams=None")
        return _regmean_plus_plus(where, models, sds, float(alpha), batches, template)
    if batches is not None or template is not None:
        raise ConfigError(f"{where}: `batches` and `template` are for plus_plus=True; plain RegMean takes grams")
    grams = _check_grams(where, grams, sds)
    merged = _average(where, sds)
    names = list(grams[0])
    solved = _solve_layers(where, [[sd[_weight_key(n)] for sd in sds] for n in names],
                           [[g[n] for g in grams] for n in names], float(alpha), names)
    for n, w in zip(names, solved):
        merged[_weight_key(n)] = w
    return merged


def _weight_key(module_name: str) -> str:
    """The state-dict key of a Linear module's weight (the root module has the empty name)."""
    return f"{module_name}.weight" if module_name else "weight"


def _check_grams(where: str, grams, sds) -> list[Mapping[str, torch.Tensor]]:
    if grams is None or isinstance(grams, Mapping):
        raise ConfigError(f"{where}: grams must be a list of K dicts (one per model, from collect_gram)")
    grams = list(grams)
    if len(grams) != len(sds):
        raise ConfigError(f"{where}: got {len(grams)} grams for {len(sds)} models; give one per model")
    names = list(grams[0])
    for i, g in enumerate(grams):
        if not isinstance(g, Mapping):
            raise ConfigError(f"{where}: grams[{i}] is a {type(g).__name__}; pass a dict {{module name: G}}")
        if set(g) != set(names):
            odd = sorted(set(g) ^ set(names))[0]
            raise MissingTensorError(f"{where}: grams[{i}] and grams[0] differ on module {odd!r}; collect every "
                                     f"Gram over the same layers")
        for n in names:
            key = _weight_key(n)
            if key not in sds[0]:
                raise MissingTensorError(f"{where}: grams[{i}] has module {n!r} but the models have no {key!r}")
            w = sds[0][key]
            if w.dim() != 2:
                raise ShapeMismatchError(f"{where}: {key!r} has shape {tuple(w.shape)}; RegMean merges 2-D "
                                         f"Linear weights [out, in]")
            gi = g[n]
            if not isinstance(gi, torch.Tensor) or tuple(gi.shape) != (w.shape[1], w.shape[1]):
                shape = tuple(gi.shape) if isinstance(gi, torch.Tensor) else type(gi).__name__
                raise ShapeMismatchError(f"{where}: grams[{i}][{n!r}] is {shape}; {key!r} has {w.shape[1]} "
                                         f"inputs, so its Gram must be [{w.shape[1]}, {w.shape[1]}]")
            if gi.device != w.device:
                raise ShapeMismatchError(f"{where}: grams[{i}][{n!r}] is on {gi.device} but {key!r} on {w.device}")
    return grams


def _average(where: str, sds) -> dict[str, torch.Tensor]:
    """Every floating tensor averaged (linear_merge), others from the first model."""
    merged = {}
    for name, ref in sds[0].items():
        if ref.dtype not in C.FLOAT_DTYPES:
            merged[name] = ref.clone()
            continue
        try:
            merged[name] = linear_merge([sd[name] for sd in sds])
        except FusionEngineError as e:
            raise type(e)(f"{where}: tensor {name!r}: {e}") from e
    return merged


def _solve_layers(where: str, weights: list[list[torch.Tensor]], grams: list[list[torch.Tensor]], alpha: float,
                  names: list[str]) -> list[torch.Tensor]:
    """RegMean weights of L layers; layers with one input width, dtype and device share one batched solve."""
    groups: dict[tuple, list[int]] = {}
    for layer, ws in enumerate(weights):
        groups.setdefault((ws[0].shape[1], ws[0].dtype, ws[0].device), []).append(layer)
    out: list[torch.Tensor | None] = [None] * len(weights)
    for (_, dtype, _), layers in groups.items():
        for layer, w in zip(layers, _solve_group([weights[i] for i in layers], [grams[i] for i in layers],
                                                 alpha, [names[i] for i in layers], where)):
            out[layer] = w.to(dtype)
    return out


def _solve_group(weights, grams, alpha: float, names: list[str], where: str) -> list[torch.Tensor]:
    """One batched Cholesky solve for layers of one input width (their output widths may differ)."""
    acc = accum_dtype(weights[0][0].dtype)
    lhs, rhs, avg = [], [], []
    for ws, gs, name in zip(weights, grams, names):
        a = torch.zeros_like(gs[0], dtype=acc)
        b = torch.zeros(ws[0].shape[1], ws[0].shape[0], dtype=acc, device=ws[0].device)
        for w, g in zip(ws, gs):
            g = g.to(acc)
            if not bool(torch.isfinite(g).all()):
                raise C.NonFiniteError(f"{where}: the Gram of {name!r} holds NaN or Inf; check the batches")
            if alpha != 1.0:  # α G + (1 − α) diag(G): scale, then restore the diagonal
                diagonal = torch.diagonal(g).clone()
                g = g * alpha
                torch.diagonal(g).copy_(diagonal)
            a += g
            b.addmm_(g, w.to(acc).t())
        mean_t = sum(w.to(acc) for w in ws).t() / len(ws)
        # an input no model ever activated: zero row and column of a; its column of W gets the average
        idle = torch.diagonal(a) <= 0
        if bool(idle.any()):
            a[idle, :] = 0
            a[:, idle] = 0
            a[idle, idle] = 1
            b[idle] = mean_t[idle]
        lhs.append(a)
        rhs.append(b)
        avg.append(mean_t)
    width = max(b.shape[1] for b in rhs)  # pad output widths to one batch; padded columns are zeros
    a = torch.stack(lhs)
    b = torch.stack([torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in rhs])
    m = torch.stack([torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in avg])
    solution = _cholesky_solve_with_ridge(a, b, m)
    return [solution[i, :, :rhs[i].shape[1]].t().contiguous() for i in range(len(rhs))]


def _cholesky_solve_with_ridge(a: torch.Tensor, b: torch.Tensor, toward: torch.Tensor) -> torch.Tensor:
    """Solve a x = b (batched, a symmetric PSD) by Cholesky; a system whose factorisation fails is solved
    as (a + λI) x = b + λ·toward instead, λ = 10⁻⁶·mean(diag a), growing tenfold until it factorises."""
    factor, info = torch.linalg.cholesky_ex(a)
    pending = (info != 0).nonzero().flatten()
    if pending.numel():
        b = b.clone()
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        scale = torch.diagonal(a, dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(a.dtype).tiny)
        ridge = 1e-6
        while pending.numel():
            if ridge > 1.0 or not bool(torch.isfinite(a[pending]).all()):
                raise C.NonFiniteError("regmean_merge: a Gram matrix cannot be factorised even with a ridge of "
                                       "its mean diagonal; it probably holds NaN or Inf values")
            lam = (ridge * scale[pending]).view(-1, 1, 1)
            f, info = torch.linalg.cholesky_ex(a[pending] + lam * eye)
            ok = info == 0
            done = pending[ok]
            factor[done] = f[ok]
            b[done] = b[done] + lam[ok] * toward[done]
            pending = pending[~ok]
            ridge *= 10.0
    return torch.cholesky_solve(b, factor)


def _regmean_plus_plus(where: str, models, sds, alpha: float, batches, template) -> dict[str, torch.Tensor]:
    K = len(sds)
    if template is None:
        if not isinstance(models[0], nn.Module):
            raise ConfigError(f"{where}: RegMean++ with state dicts needs `template`, a module of the architecture")
        template = models[0]
    if not isinstance(template, nn.Module):
        raise ConfigError(f"{where}: template is a {type(template).__name__}; pass an nn.Module")
    if batches is None or isinstance(batches, torch.Tensor) or len(batches) != K:
        got = "none" if batches is None else (len(batches) if not isinstance(batches, torch.Tensor) else "a tensor")
        raise ConfigError(f"{where}: RegMean++ needs `batches`: a list of {K} iterables of batches, one per model "
                          f"(got {got})")
    data = [[x for x, _ in iterate_batches(f"{where}: batches[{i}]", b)] for i, b in enumerate(batches)]
    merged_model = copy.deepcopy(template)
    merged = _average(where, sds)
    missing = [k for k in merged_model.state_dict() if k not in merged]
    if missing:
        raise MissingTensorError(f"{where}: the template has {missing[0]!r}, which the models lack")
    merged_model.load_state_dict(merged)
    device = module_device(merged_model)
    linears = {name: m for name, m in merged_model.named_modules() if isinstance(m, nn.Linear)}
    with eval_mode(merged_model), torch.no_grad():
        for name in _forward_order(merged_model, linears, data[0][0].to(device)):
            module = linears[name]
            layer_grams = []
            for i in range(K):
                sums, rows = {}, {}
                handle = module.register_forward_pre_hook(_gram_hook(name, module, sums, rows, stop=True))
                try:
                    for x in data[i]:
                        try:
                            merged_model(x.to(device))
                        except _StopForward:
                            pass
                finally:
                    handle.remove()
                if name not in sums:
                    raise ConfigError(f"{where}: batches[{i}] never reach Linear {name!r}")
                _mirror_upper(sums[name])
                layer_grams.append(sums[name])
            key = _weight_key(name)
            (w,) = _solve_layers(where, [[sd[key] for sd in sds]], [layer_grams], alpha, [name])
            module.weight.copy_(w)
            merged[key] = w
    return merged


def _forward_order(model: nn.Module, linears: dict[str, nn.Linear], x: torch.Tensor) -> list[str]:
    """Names of the Linear modules in the order a forward pass first calls them."""
    order: list[str] = []
    handles = []
    for name, m in linears.items():
        def hook(_m, _inputs, name=name):
            if name not in order:
                order.append(name)
        handles.append(m.register_forward_pre_hook(hook))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return order
