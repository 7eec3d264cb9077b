"""Fisher merging: diagonal Fisher information from per-example gradients, then Fisher-weighted averaging.

.. math::

    \\hat F_j = \\frac{1}{N} \\sum_{n=1}^{N} \\mathbb{E}_{y \\sim q_n}
                \\left[\\left(\\frac{\\partial \\log p_\\theta(y \\mid x_n)}{\\partial \\theta_j}\\right)^2\\right],
    \\qquad
    \\theta^\\star_j = \\frac{\\sum_i w_i F_{ij} \\theta_{ij}}{\\sum_i w_i F_{ij} + \\varepsilon}

where q_n is the point mass on the label y_n (the *empirical* Fisher) or the model's own predictive
distribution p_θ(· | x_n) (the *model*, or true, Fisher).

Reference: Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from ..errors import ConfigError, FusionEngineError, MissingTensorError, ShapeMismatchError
from ..ops import fisher_merge, linear_merge
from ..ops import _common as C
from ._inputs import accum_dtype, eval_mode, iterate_batches, module_device, state_dicts_of
from ._per_example import LayerTaps

FISHER_KINDS = ("empirical", "model")
_BATCHED_BACKWARD_ELEMENTS = 1 << 24   # output gradients of one batched backward (kind="model")


def _cross_entropy_per_example(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def estimate_fisher(model: nn.Module, batches: Iterable, *, kind: str = "empirical", per_example: bool = True,
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Diagonal Fisher information of every parameter of ``model``, averaged over the examples of ``batches``.

    .. math::

        \\text{empirical:}\\quad \\hat F = \\frac{1}{N}\\sum_n \\left(\\nabla_\\theta \\ell(f_\\theta(x_n), y_n)\\right)^{2}
        \\qquad
        \\text{model:}\\quad \\hat F = \\frac{1}{N}\\sum_n \\sum_{c=1}^{C} p_\\theta(c \\mid x_n)
                                         \\left(\\nabla_\\theta \\log p_\\theta(c \\mid x_n)\\right)^{2}

    With ``per_example=True`` (the default) the gradients are per-example gradients computed in one
    vectorised pass per batch (``torch.func.vmap`` of ``grad``, or of ``jacrev`` over the C classes for
    ``kind="model"``), squared and summed straight into one accumulator per parameter: nothing is kept
    per batch. ``kind="model"`` takes the exact expectation over the classes (no sampling, so it is
    deterministic), one class at a time (C per-example gradient passes per batch); ``f_θ(x)`` must
    then return logits ``[batch, C]`` of a categorical distribution. Memory: one batch of
    per-example gradients, batch size × number of parameters; choose the batch size accordingly.

    ``per_example=False`` is FusionBench's (MergeLM's) estimator, kept for comparison: per batch the
    gradient of the *summed* loss (``kind="model"``: of Σ_n Σ_c √p_c log p_c) is squared, which adds
    the cross terms between examples (and classes); it equals the per-example estimate only for
    batches of one example.

    Parameters
    ----------
    model : nn.Module returning a tensor of outputs (logits) for a batch ``x``. It is run in eval mode
        (its training flags are restored afterwards) and never modified.
    batches : iterable of ``(x, y)`` pairs or of ``x`` alone (``kind="model"`` ignores ``y``). Inputs
        are moved to the model's device.
    kind : ``"empirical"`` (gradients of the loss at the given labels) or ``"model"`` (expectation over
        the model's predictive distribution).
    per_example : per-example gradients (exact) or FusionBench's squared batch gradient (approximate).
    loss_fn : ``loss_fn(outputs, targets) -> [batch]`` per-example losses (``reduction="none"``);
        default cross-entropy. Only for ``kind="empirical"``.

    Returns
    -------
    ``{parameter name: F}`` with F shaped like the parameter, in float32 (float64 for float64
    parameters), on the model's device.

    Example
    -------
    >>> model = nn.Linear(3, 2)
    >>> fisher = estimate_fisher(model, [(torch.randn(8, 3), torch.randint(0, 2, (8,)))])
    >>> sorted(fisher), fisher["weight"].shape
    (['bias', 'weight'], torch.Size([2, 3]))
    """
    where = "estimate_fisher"
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{where}: model is a {type(model).__name__}; pass an nn.Module")
    C.choice(where, "kind", kind, FISHER_KINDS)
    if kind == "model" and loss_fn is not None:
        raise ConfigError(f"{where}: loss_fn applies to kind='empirical' only; kind='model' uses the "
                          f"categorical log-likelihood of the logits")
    loss_fn = loss_fn or _cross_entropy_per_example
    params = {n: p.detach() for n, p in model.named_parameters()}
    if not params:
        raise ConfigError(f"{where}: the model has no parameters")
    for n, p in params.items():
        if p.dtype not in C.FLOAT_DTYPES:
            raise ConfigError(f"{where}: parameter {n!r} has dtype {p.dtype}; only floating parameters have a Fisher")
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    device = module_device(model)
    sums = {n: torch.zeros(p.shape, dtype=accum_dtype(p.dtype), device=p.device) for n, p in params.items()}
    taps = LayerTaps.for_model(model, params) if per_example else None
    count = 0
    with eval_mode(model):
        for x, y in iterate_batches(where, batches):
            x = x.to(device)
            if kind == "empirical":
                if y is None:
                    raise ConfigError(f"{where}: kind='empirical' needs labels; pass (x, y) batches, "
                                      f"or use kind='model'")
                y = y.to(device)
                if y.shape[:1] != x.shape[:1]:
                    raise ShapeMismatchError(f"{where}: a batch has {x.shape[0]} inputs but {y.shape[0]} targets")
            if x.shape[0] == 0:
                continue
            if per_example:
                if taps is None or not taps.usable or not _factored_step(taps, model, params, buffers, x, y,
                                                                           kind, loss_fn, sums):
                    _per_example_step(model, params, buffers, x, y, kind, loss_fn, sums)
            else:
                _batch_step(model, params, buffers, x, y, kind, loss_fn, sums)
            count += x.shape[0]
    if count == 0:
        raise ConfigError(f"{where}: the batches hold no examples")
    for s in sums.values():
        s.div_(count)
    return sums


def _logits(where: str, model, params, buffers, x: torch.Tensor) -> torch.Tensor:
    out = functional_call(model, (params, buffers), (x,))
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"{where}: the model returned a {type(out).__name__}; it must return a tensor "
                          f"of outputs (wrap it to return the logits)")
    return out


def _factored_step(taps: LayerTaps, model, params, buffers, x, y, kind, loss_fn, sums) -> bool:
    """Σ_n g_n² for one batch from one batched forward and backward pass (:mod:`._per_example`): for
    models whose parameters all sit in Linear / LayerNorm modules. Returns False, having added nothing,
    when the forward pass does not allow it (then ``taps`` is switched off and vmap takes over)."""
    where = "estimate_fisher"
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}   # new leaves, same storage
    n = x.shape[0]
    with torch.enable_grad():
        out = taps.run(lambda: _logits(where, model, leaves, buffers, x))
        if kind == "empirical":
            losses = loss_fn(out, y)
            if not taps.consistent(n) or tuple(losses.shape) != (n,):
                taps.usable = False       # e.g. a reducing loss_fn: vmap's one-example calls handle it
                return False
            grads = torch.autograd.grad(losses.sum(), taps.outputs(), allow_unused=True)
            taps.accumulate([None if g is None else g.unsqueeze(0) for g in grads], None, sums)
            return True
        if out.dim() != 2:
            raise ConfigError(f"{where}: kind='model' needs logits shaped [batch, classes]; the model "
                              f"returned shape {tuple(out.shape)}")
        if not taps.consistent(n):
            taps.usable = False
            return False
        log_p = torch.log_softmax(out.to(accum_dtype(out.dtype)), -1)
        prob = log_p.detach().exp()
        outputs = taps.outputs()
        classes = log_p.shape[1]
        # Σ_c p_c (∇ log p_c)²: the C backward passes batched (is_grads_batched), a chunk of classes at a time
        chunk = max(1, min(classes, _BATCHED_BACKWARD_ELEMENTS // max(1, n * taps.out_elements())))
        eye = torch.eye(classes, dtype=log_p.dtype, device=log_p.device)
        for c0 in range(0, classes, chunk):
            c1 = min(classes, c0 + chunk)
            seeds = eye[c0:c1, None, :].expand(c1 - c0, n, classes)
            grads = torch.autograd.grad(log_p, outputs, grad_outputs=seeds, is_grads_batched=True,
                                        allow_unused=True, retain_graph=c1 < classes)
            taps.accumulate(grads, prob[:, c0:c1].t(), sums)
    return True


def _per_example_step(model, params, buffers, x, y, kind, loss_fn, sums) -> None:
    """Σ_n g_n² for one batch, from per-example gradients, added into ``sums``."""
    where = "estimate_fisher"
    if kind == "empirical":
        def example_loss(p, xn, yn):
            loss = loss_fn(_logits(where, model, p, buffers, xn.unsqueeze(0)), yn.unsqueeze(0))
            return loss.sum()

        per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, y)
        for n, g in per_example.items():
            g = g.to(sums[n].dtype)
            sums[n].add_(g.square_().sum(0))
    else:
        with torch.no_grad():
            logits = _logits(where, model, params, buffers, x)
        if logits.dim() != 2:
            raise ConfigError(f"{where}: kind='model' needs logits shaped [batch, classes]; the model "
                              f"returned shape {tuple(logits.shape)}")
        prob = torch.softmax(logits.to(accum_dtype(logits.dtype)), -1)

        def class_log_likelihood(p, xn, c: int):
            out = _logits(where, model, p, buffers, xn.unsqueeze(0))
            return torch.log_softmax(out.to(accum_dtype(out.dtype)), -1)[0, c]

        per_example_grad = vmap(grad(class_log_likelihood), in_dims=(None, 0, None))
        for c in range(logits.shape[1]):  # one class at a time: memory stays [batch, *parameter]
            for n, g in per_example_grad(params, x, c).items():
                g = g.to(sums[n].dtype)
                sums[n].add_(torch.tensordot(prob[:, c].to(g.dtype), g.square_(), dims=1))


def _batch_step(model, params, buffers, x, y, kind, loss_fn, sums) -> None:
    """FusionBench's estimator: (∇ of the batch-summed objective)², added into ``sums``."""
    where = "estimate_fisher"
    leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    with torch.enable_grad():
        out = _logits(where, model, leaves, buffers, x)
        if kind == "empirical":
            losses = loss_fn(out, y)
            if losses.shape != (x.shape[0],) and not (x.shape[0] == 1 and losses.numel() == 1):
                raise ConfigError(f"{where}: loss_fn returned shape {tuple(losses.shape)}; it must return one "
                                  f"loss per example (reduction='none')")
            objective = losses.sum()
        else:
            lp = torch.log_softmax(out.float(), -1)
            objective = (lp.exp().detach().sqrt() * lp).sum()
        grads = torch.autograd.grad(objective, list(leaves.values()), allow_unused=True)
    for n, g in zip(leaves, grads):
        if g is not None:
            sums[n].add_(g.to(sums[n].dtype).square())


def fisher_merge_models(models_or_state_dicts: Sequence, fishers: Sequence[Mapping[str, torch.Tensor]], *,
                        weights=None, eps: float = 1e-8, normalize_fisher: bool = False,
                        fisher_floor: float = 0.0) -> dict[str, torch.Tensor]:
    """Fisher-weighted average of K models, tensor by tensor (:func:`fusion_engine.ops.fisher_merge`).

    .. math::

        \\theta^\\star_j = \\frac{\\sum_i v_i (F_{ij} + \\phi)\\, \\theta_{ij}}{\\sum_i v_i (F_{ij} + \\phi) + \\varepsilon},
        \\qquad v_i = w_i \\text{, or with normalize\\_fisher: }
        v_i = w_i \\frac{1 / (\\lVert F_i \\rVert_2 + \\varepsilon)}{\\sum_k 1 / (\\lVert F_k \\rVert_2 + \\varepsilon)}

    where ‖F_i‖₂ is the L2 norm of *all* Fisher entries of model i (FusionBench's
    ``normalize_fisher_weight``: it keeps a model whose Fisher is large overall, e.g. from a sharper
    loss, from dominating every tensor) and φ is ``fisher_floor`` (FusionBench's
    ``minimal_fisher_weight``, 1e-6 there): entries no model is sensitive to then fall back to the
    weighted average instead of shrinking toward zero.

    Tensors that no Fisher covers (buffers, say) are averaged with the weights; non-floating tensors
    (integer buffers) are taken from the first model.

    Parameters
    ----------
    models_or_state_dicts : K nn.Modules of one architecture, or K state dicts
    fishers : K dicts ``{name: F}`` as returned by :func:`estimate_fisher`, all with the same names
    weights : K floats w_i (or a scalar, or None for all 1)
    eps : ε ≥ 0 of the op
    normalize_fisher : FusionBench's per-model norm weighting (above)
    fisher_floor : φ ≥ 0, added to every Fisher entry

    Returns
    -------
    A state dict ``{name: merged tensor}`` in the models' key order and dtypes.
    """
    where = "fisher_merge_models"
    sds = state_dicts_of(where, models_or_state_dicts)
    K = len(sds)
    if isinstance(fishers, Mapping):
        raise ConfigError(f"{where}: fishers must be a list of K dicts (one per model), not one dict")
    fishers = list(fishers)
    if len(fishers) != K:
        raise ConfigError(f"{where}: got {len(fishers)} fishers for {K} models; give one per model")
    if not (math.isfinite(fisher_floor) and fisher_floor >= 0):
        raise ConfigError(f"{where}: fisher_floor={fisher_floor} must be a finite number >= 0")
    w = C.per_model_floats(where, "weights", weights, K, default=1.0)
    covered = list(fishers[0])
    for i, fi in enumerate(fishers):
        if not isinstance(fi, Mapping):
            raise ConfigError(f"{where}: fishers[{i}] is a {type(fi).__name__}; pass a dict {{name: tensor}}")
        if set(fi) != set(covered):
            odd = sorted(set(fi) ^ set(covered))[0]
            raise MissingTensorError(f"{where}: fishers[{i}] and fishers[0] differ on {odd!r}; estimate every "
                                     f"Fisher over the same parameters")
        for name, f in fi.items():
            if name not in sds[0]:
                raise MissingTensorError(f"{where}: fishers[{i}] has {name!r}, which the models lack")
            if not isinstance(f, torch.Tensor) or f.shape != sds[0][name].shape:
                shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
                raise ShapeMismatchError(f"{where}: fishers[{i}][{name!r}] is {shape} but the parameter has "
                                         f"shape {tuple(sds[0][name].shape)}")
    if normalize_fisher:
        w = [wi * s for wi, s in zip(w, _inverse_norm_shares(where, fishers, covered, eps))]
    covered = set(covered)
    merged = {}
    for name, ref in sds[0].items():
        tensors = [sd[name] for sd in sds]
        try:
            if ref.dtype not in C.FLOAT_DTYPES:
                merged[name] = ref.clone()
            elif name in covered:
                fs = [_fisher_operand(fi[name], ref.dtype, fisher_floor) for fi in fishers]
                merged[name] = fisher_merge(tensors, fs, w, eps=eps)
            else:
                merged[name] = linear_merge(tensors, w, normalize=True)
        except FusionEngineError as e:
            raise type(e)(f"{where}: tensor {name!r}: {e}") from e
    return merged


def _fisher_operand(f: torch.Tensor, dtype: torch.dtype, floor: float) -> torch.Tensor:
    if f.dtype not in (dtype, torch.float32):
        f = f.float()
    return f + floor if floor > 0 else f


def _inverse_norm_shares(where: str, fishers, names, eps: float) -> list[float]:
    """(1/(‖F_i‖+ε)) / Σ_k (1/(‖F_k‖+ε)) with ‖F_i‖ the L2 norm over all of model i's Fisher entries."""
    inverse = []
    for i, fi in enumerate(fishers):
        norm = math.sqrt(sum(float(fi[n].double().square().sum()) for n in names))
        if norm + eps <= 0 or not math.isfinite(norm):
            raise ConfigError(f"{where}: the Fisher of model {i} has norm {norm}; normalize_fisher needs a "
                              f"finite, non-zero Fisher (or eps > 0)")
        inverse.append(1.0 / (norm + eps))
    total = sum(inverse)
    return [v / total for v in inverse]
