"""AdaMerging: merging coefficients learned by entropy minimisation on unlabeled data.

.. math::

    \\theta(\\lambda)_l = \\theta_{0,l} + \\sum_{k=1}^{K} \\lambda_{k,l}\\, \\tau_{k,l},
    \\qquad \\tau_{k,l} = \\theta_{k,l} - \\theta_{0,l},
    \\qquad \\min_\\lambda\\; \\mathbb{E}_x\\, H\\big(\\mathrm{softmax}(f_{\\theta(\\lambda)}(x))\\big)

with one coefficient per task (``mode="task"``: λ_{k,l} = λ_k) or per task and parameter tensor
(``mode="layer"``). Each merged tensor is one matrix-vector product θ_{0,l} + T_lᵀ λ_{·,l} over its
task vectors stacked as T_l ∈ R^{K×n_l} (each τ read once, one write) and the coefficient gradient
is ∂L/∂λ_{k,l} = ⟨∂L/∂θ_l, τ_{k,l}⟩, all k in one product T_l g_l: no per-task copy of any weight
is made, forward or backward, and all L tensors form one autograd node.

Reference: Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.func import functional_call

from ..errors import ConfigError, MissingTensorError, ShapeMismatchError
from ..ops import linear_merge
from ..ops import _common as C
from ._inputs import eval_mode, iterate_batches, module_device, state_dicts_of

MODES = ("task", "layer")


_BLAS_DTYPES = (torch.float32, torch.float64)


def _merge_flat(base: torch.Tensor, stacked: torch.Tensor | None, rows, coefficients: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """b + Σ_k c_k τ_k for a flat b. fp32 / fp64 task vectors stacked as [K, n] (rows contiguous, any row
    stride): one ``addmv`` (b + Tᵀc, T read once, no coefficient sync to the host); otherwise the fused
    :func:`linear_merge` (fp32 accumulation for fp16 / bf16)."""
    if stacked is not None and base.dtype in _BLAS_DTYPES:
        c = coefficients.detach().to(base.dtype)
        return torch.addmv(base, stacked.t(), c) if out is None else torch.addmv(base, stacked.t(), c, out=out)
    merged = linear_merge([base, *rows], [1.0, *coefficients.detach().tolist()], normalize=False,
                          check_finite=False)
    return merged if out is None else out.copy_(merged)


def _coefficient_gradient(stacked: torch.Tensor | None, rows, grad: torch.Tensor) -> torch.Tensor:
    """⟨grad, τ_k⟩ for every k: one ``mv`` over the stacked [K, n] task vectors (each read once)."""
    g = grad.reshape(-1).to(rows[0].dtype if stacked is None else stacked.dtype)
    if stacked is not None:
        return torch.mv(stacked, g)
    return torch.stack([torch.dot(r, g) for r in rows])


class _MergeWithCoefficients(torch.autograd.Function):
    """y = b + Σ_k c_k τ_k on flat tensors; backward: ∂L/∂c_k = ⟨∂L/∂y, τ_k⟩ (one pass), ∂L/∂b = ∂L/∂y."""

    @staticmethod
    def forward(ctx, base: torch.Tensor, coefficients: torch.Tensor, stacked: torch.Tensor | None, rows):
        ctx.stacked, ctx.rows = stacked, rows
        ctx.coefficient_dtype = coefficients.dtype
        return _merge_flat(base, stacked, rows, coefficients)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_base = grad_out if ctx.needs_input_grad[0] else None
        grad_coefficients = None
        if ctx.needs_input_grad[1]:
            grad_coefficients = _coefficient_gradient(ctx.stacked, ctx.rows, grad_out).to(ctx.coefficient_dtype)
        return grad_base, grad_coefficients, None, None


class _MergeModel(torch.autograd.Function):
    """All L merged parameters θ_l = θ_{0,l} + Σ_k λ_{k,l} τ_{k,l} in one autograd node.

    Forward: one ``addmv`` per tensor over its stacked task vectors [K, n_l] (K + 1 reads, one write),
    into ``outs`` when given (buffers reused across optimisation steps). Backward: one ``mv`` per tensor,
    ∂L/∂λ_{k,l} = ⟨∂L/∂θ_l, τ_{k,l}⟩, summed over l for task-wise λ [K], a column of λ [K, L] otherwise.
    """

    @staticmethod
    def forward(ctx, coefficients: torch.Tensor, bases, stacked, layer_wise: bool, outs):
        ctx.stacked, ctx.layer_wise, ctx.coefficient_dtype = stacked, layer_wise, coefficients.dtype
        merged = []
        for l, (base, tv) in enumerate(zip(bases, stacked)):
            c = coefficients[:, l] if layer_wise else coefficients
            flat = _merge_flat(base.reshape(-1), tv, None if tv.dtype in _BLAS_DTYPES else list(tv.unbind(0)), c,
                               None if outs is None else outs[l])
            merged.append(flat.view(base.shape))
        return tuple(merged)

    @staticmethod
    def backward(ctx, *grads):
        stacked = ctx.stacked
        K, L = stacked[0].shape[0], len(stacked)
        per_tensor = torch.zeros((L, K), dtype=ctx.coefficient_dtype, device=stacked[0].device)
        for l, (tv, g) in enumerate(zip(stacked, grads)):
            if g is not None:
                per_tensor[l] = _coefficient_gradient(tv, None, g)
        grad = per_tensor.t() if ctx.layer_wise else per_tensor.sum(0)
        return grad, None, None, None, None


def merge_with_coefficients(base: torch.Tensor, task_vectors, coefficients: torch.Tensor) -> torch.Tensor:
    """Differentiable ``base + Σ_k coefficients[k] · task_vectors[k]`` without per-task weight copies.

    .. math::

        y = b + \\sum_{k=1}^{K} c_k \\tau_k, \\qquad
        \\frac{\\partial L}{\\partial c_k} = \\Big\\langle \\frac{\\partial L}{\\partial y}, \\tau_k \\Big\\rangle, \\qquad
        \\frac{\\partial L}{\\partial b} = \\frac{\\partial L}{\\partial y}

    With the task vectors given stacked, in fp32 or fp64, the forward pass is one matrix-vector
    product y = b + Tᵀc (``torch.addmv``: one read of each input, one write, no host sync on c);
    otherwise it is the fused :func:`fusion_engine.ops.linear_merge` (fp32 accumulation for fp16 /
    bf16). The backward pass computes all K inner products in one matrix-vector product Tg over the
    stacked task vectors (one read of each τ_k). The task vectors get no gradient.

    Parameters
    ----------
    base : tensor b, any shape
    task_vectors : a tensor [K, *b.shape] (preferred: rows are read in place) or a list of K tensors
        shaped like b; the dtype and device of b
    coefficients : 1-D tensor c of K entries (usually requiring grad)

    Returns
    -------
    y, shaped like b, in b's dtype.

    Example
    -------
    >>> c = torch.tensor([0.5, 2.0], requires_grad=True)
    >>> y = merge_with_coefficients(torch.zeros(3), torch.ones(2, 3), c)
    >>> y.sum().backward(); c.grad
    tensor([3., 3.])
    """
    where = "merge_with_coefficients"
    if not isinstance(base, torch.Tensor):
        raise ConfigError(f"{where}: base is a {type(base).__name__}, not a tensor")
    if not isinstance(coefficients, torch.Tensor) or coefficients.dim() != 1:
        raise ConfigError(f"{where}: coefficients must be a 1-D tensor of K values (one per task vector)")
    n = base.numel()
    if isinstance(task_vectors, torch.Tensor):
        if task_vectors.dim() < 1 or tuple(task_vectors.shape[1:]) != tuple(base.shape):
            raise ShapeMismatchError(f"{where}: stacked task_vectors have shape {tuple(task_vectors.shape)}; "
                                     f"expected [K, {', '.join(map(str, base.shape))}]")
        stacked = task_vectors.reshape(task_vectors.shape[0], n)   # a view for contiguous rows
        rows = [C.flat(r) for r in stacked.unbind(0)]
    else:
        task_vectors = C.tensor_list(where, task_vectors, "task_vectors")
        for k, t in enumerate(task_vectors):
            if not isinstance(t, torch.Tensor) or t.shape != base.shape:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ShapeMismatchError(f"{where}: task_vectors[{k}] is {shape} but base has {tuple(base.shape)}")
        stacked, rows = None, [C.flat(t) for t in task_vectors]
    if len(rows) != coefficients.numel():
        raise ConfigError(f"{where}: got {coefficients.numel()} coefficients for {len(rows)} task vectors; "
                          f"give one per task vector")
    if not rows:
        raise ConfigError(f"{where}: task_vectors is empty; pass at least one")
    for k, r in enumerate(rows):
        if r.dtype != base.dtype or r.device != base.device:
            raise ShapeMismatchError(f"{where}: task_vectors[{k}] is {r.dtype} on {r.device} but base is "
                                     f"{base.dtype} on {base.device}; convert them first")
    if stacked is not None and stacked.stride(-1) != 1:
        stacked = None  # rows were copied to contiguous ones: take the dot-product path
    out = _MergeWithCoefficients.apply(C.flat(base), coefficients, stacked, rows)
    return out.view(base.shape)


@dataclass
class AdaMergingResult:
    """What :func:`adamerging` learned.

    state_dict : the merged model's state dict (pretrained buffers, merged parameters)
    coefficients : λ, ``[K]`` (``mode="task"``) or ``[K, L]`` (``mode="layer"``; column l is
        ``parameter_names[l]``)
    history : the mean prediction entropy of each step's batch, before that step's update
    parameter_names : the L merged parameters, in the model's order
    """

    state_dict: dict[str, torch.Tensor]
    coefficients: torch.Tensor
    history: list[float] = field(default_factory=list)
    parameter_names: list[str] = field(default_factory=list)


def adamerging(pretrained: nn.Module, finetuned: Sequence, batches: Iterable, *, mode: str = "task",
               steps: int = 100, lr: float = 1e-3, init=0.3, clamp: tuple[float, float] | None = (0.0, 1.0)
               ) -> AdaMergingResult:
    """Learn task-wise or layer-wise merging coefficients by minimising the prediction entropy.

    .. math::

        \\min_{\\lambda}\\; \\frac{1}{B}\\sum_{b=1}^{B} -\\sum_c p_c(x_b) \\log p_c(x_b),
        \\qquad p(x) = \\mathrm{softmax}\\, f_{\\theta(\\lambda)}(x),
        \\qquad \\theta(\\lambda)_l = \\theta_{0,l} + \\sum_k \\lambda_{k,l} \\tau_{k,l}

    Adam (learning rate ``lr``) takes one step per batch, cycling through ``batches`` for ``steps``
    steps; after each step λ is projected onto ``clamp``. The model runs through
    ``torch.func.functional_call`` with the merged parameters, built as in
    :func:`merge_with_coefficients` from task vectors stacked once per parameter ([K, numel], the
    same memory as K task-vector state dicts), all of them in one autograd node, into buffers reused
    from step to step.

    Parameters
    ----------
    pretrained : the pre-trained nn.Module θ₀ (run in eval mode, never modified); it must return
        logits ``[batch, classes]``
    finetuned : K nn.Modules or state dicts θ_k holding (at least) every parameter of ``pretrained``
    batches : iterable of unlabeled batches ``x`` (or ``(x, y)``; y is ignored), read once and cycled
    mode : ``"task"`` (λ ∈ R^K) or ``"layer"`` (λ ∈ R^{K×L}, one per task and parameter tensor)
    steps : number of optimisation steps (0 returns the merge at ``init``)
    lr : Adam's learning rate (the paper's 1e-3)
    init : initial λ: a scalar (the paper's 0.3), or a tensor shaped like λ

    Entropy minimisation presumes the fine-tuned models are confident on their own tasks; where the
    pre-trained model is more confident on the tasks' inputs than they are (briefly fine-tuned
    models), the entropy falls toward λ = 0 and AdaMerging returns the pre-trained model. Long runs
    at a high learning rate can also over-sharpen: watch ``history`` and accuracy on held-out data.
    clamp : (low, high) bounds λ is projected onto after every step, or None

    Returns
    -------
    :class:`AdaMergingResult`.
    """
    where = "adamerging"
    if not isinstance(pretrained, nn.Module):
        raise ConfigError(f"{where}: pretrained is a {type(pretrained).__name__}; pass the pre-trained nn.Module")
    C.choice(where, "mode", mode, MODES)
    if not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"{where}: steps={steps!r} must be an integer >= 0")
    if not lr > 0:
        raise ConfigError(f"{where}: lr={lr!r} must be > 0")
    if clamp is not None:
        if len(clamp) != 2 or not float(clamp[0]) <= float(clamp[1]):
            raise ConfigError(f"{where}: clamp={clamp!r} must be a pair (low, high) with low <= high, or None")
        clamp = (float(clamp[0]), float(clamp[1]))
    names, bases, stacked = _task_vector_bank(where, pretrained, finetuned)
    K = stacked[0].shape[0]
    shape = (K,) if mode == "task" else (K, len(names))
    coefficients = _initial_coefficients(where, init, shape, bases[0].device)
    data = [x for x, _ in iterate_batches(where, batches)]
    buffers = {n: b.detach() for n, b in pretrained.named_buffers()}
    device = module_device(pretrained)
    history: list[float] = []
    if steps:
        coefficients.requires_grad_(True)
        optimizer = torch.optim.Adam([coefficients], lr=lr)
        bank = _Bank(names, bases, stacked)
        with eval_mode(pretrained):
            for step in range(steps):
                x = data[step % len(data)].to(device)
                loss = _entropy_step(pretrained, buffers, bank, coefficients, mode, optimizer, clamp, x)
                history.append(float(loss))
        coefficients = coefficients.detach()
    with torch.no_grad():
        merged = _merged_parameters(names, bases, stacked, coefficients, mode)
    state_dict = {k: merged[k] if k in merged else v.detach().clone() for k, v in pretrained.state_dict().items()}
    return AdaMergingResult(state_dict, coefficients.clone(), history, list(names))


def _task_vector_bank(where: str, pretrained: nn.Module, finetuned):
    """Names, base tensors and stacked task vectors [K, numel] of every floating parameter."""
    sds = state_dicts_of(where, finetuned)
    names, bases, stacked = [], [], []
    for name, p in pretrained.named_parameters():
        if p.dtype not in C.FLOAT_DTYPES:
            continue
        base = p.detach()
        tv = torch.empty((len(sds), base.numel()), dtype=base.dtype, device=base.device)
        for k, sd in enumerate(sds):
            if name not in sd:
                raise MissingTensorError(f"{where}: finetuned[{k}] lacks parameter {name!r} of the pretrained model")
            t = sd[name]
            if t.shape != base.shape:
                raise ShapeMismatchError(f"{where}: {name!r} has shape {tuple(t.shape)} in finetuned[{k}] but "
                                         f"{tuple(base.shape)} in the pretrained model")
            if not bool(torch.isfinite(t).all()):
                raise C.NonFiniteError(f"{where}: {name!r} of finetuned[{k}] holds NaN or Inf values")
            torch.sub(t.to(device=base.device, dtype=base.dtype).reshape(-1), base.reshape(-1), out=tv[k])
        names.append(name)
        bases.append(base)
        stacked.append(tv)
    if not names:
        raise ConfigError(f"{where}: the pretrained model has no floating parameters to merge")
    return names, bases, stacked


def _initial_coefficients(where: str, init, shape: tuple[int, ...], device) -> torch.Tensor:
    if isinstance(init, torch.Tensor):
        if tuple(init.shape) != shape:
            raise ConfigError(f"{where}: init has shape {tuple(init.shape)}; expected {shape} for this mode")
        return init.detach().to(device=device, dtype=torch.float32).clone()
    if not isinstance(init, (int, float)):
        raise ConfigError(f"{where}: init must be a number or a tensor of shape {shape}")
    return torch.full(shape, float(init), dtype=torch.float32, device=device)


class _Bank:
    """The stacked task vectors of the merged parameters and the buffers their merged values are
    written to (a step's merged weights are dead once its backward pass has run: their memory is
    reused by the next step)."""

    def __init__(self, names, bases, stacked):
        self.names, self.bases, self.stacked = names, bases, stacked
        self.outs = [torch.empty(b.numel(), dtype=b.dtype, device=b.device) for b in bases]


def _entropy_step(pretrained, buffers, bank: _Bank, coefficients, mode: str, optimizer, clamp, x) -> torch.Tensor:
    """One AdaMerging step: merge, forward, mean entropy, backward, Adam, projection; returns the loss."""
    params = _merged_parameters(bank.names, bank.bases, bank.stacked, coefficients, mode, bank.outs)
    loss = _mean_entropy("adamerging", functional_call(pretrained, (params, buffers), (x,)))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if clamp is not None:
        with torch.no_grad():
            coefficients.clamp_(*clamp)
    return loss.detach()


def _merged_parameters(names, bases, stacked, coefficients: torch.Tensor, mode: str, outs=None
                       ) -> dict[str, torch.Tensor]:
    """{name: θ_{0,l} + Σ_k λ_{k,l} τ_{k,l}}, differentiable in λ (one :class:`_MergeModel` node)."""
    merged = _MergeModel.apply(coefficients, bases, stacked, mode == "layer", outs)
    return dict(zip(names, merged))


def _mean_entropy(where: str, logits) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2:
        raise ConfigError(f"{where}: the model must return logits [batch, classes]")
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()
