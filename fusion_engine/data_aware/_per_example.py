"""Squared per-example gradients of Linear and LayerNorm parameters without per-example gradients.

For a Linear layer y = W x + b inside a model whose loss is a sum of per-example losses
ℓ = Σ_n ℓ_n, the gradient of ℓ with respect to the layer's output rows is g_n = ∂ℓ_n/∂y_n (example n
only reaches row n), so one forward and one backward pass of the whole batch give every
per-example gradient in factored form: ∇_W ℓ_n = g_n x_nᵀ, ∇_b ℓ_n = g_n. The Fisher sums then need
no [N, out, in] tensor:

.. math::

    \\sum_n w_n (\\nabla_W \\ell_n)^{\\circ 2} = (w \\circ G^{\\circ 2})^{\\top} X^{\\circ 2}, \\qquad
    \\sum_n w_n (\\nabla_b \\ell_n)^{\\circ 2} = \\sum_n w_n g_n^{\\circ 2}

(one GEMM; ∘ is elementwise). Inputs with extra dimensions [N, T, in] (tokens) have per-example
gradients Σ_t g_{nt} x_{nt}ᵀ, formed per example with one batched matmul (in chunks of examples,
so at most ``_CHUNK_ELEMENTS`` are live). LayerNorm: ∇_γ ℓ_n = Σ_t g_{nt} ∘ x̂_{nt}, ∇_β ℓ_n = Σ_t g_{nt}
with x̂ the normalised input. This is the per-example-gradient-norm trick of Goodfellow (2015),
"Efficient per-example gradient computations" (BackPACK's BatchGrad / SumGradSquared).

It holds when examples do not interact in the forward pass (true of models in eval mode) and the
hooked modules see the batch as their leading dimension. :class:`LayerTaps` checks what it can (every
parameter belongs to exactly one supported module, each such module ran once with the batch as its
leading dimension, nothing it recorded was modified in place) and otherwise reports failure so that
the caller falls back to ``vmap`` over single examples.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

_SUPPORTED = (nn.Linear, nn.LayerNorm)
_CHUNK_ELEMENTS = 1 << 24   # per-example gradients live at once on the token path (64 MiB in fp32)


class LayerTaps:
    """Forward hooks on the model's Linear / LayerNorm modules recording each module's input and output."""

    def __init__(self, modules: dict[str, nn.Module], param_slots: dict[str, tuple[str, str]]):
        self.modules = modules            # module name -> module
        self.param_slots = param_slots    # parameter name -> (module name, "weight" | "bias")
        self.records: dict[str, list] = {}
        self.usable = True

    @classmethod
    def for_model(cls, model: nn.Module, param_names) -> "LayerTaps | None":
        """Taps covering every parameter in ``param_names``, or None when some parameter is not the own
        weight or bias of exactly one supported module (then only ``vmap`` is exact)."""
        owners: dict[int, list[tuple[str, str, nn.Module]]] = {}
        for mod_name, module in model.named_modules(remove_duplicate=False):
            for attr, p in module.named_parameters(recurse=False):
                owners.setdefault(id(p), []).append((mod_name, attr, module))
        named = dict(model.named_parameters())
        modules, slots = {}, {}
        for name in param_names:
            found = owners.get(id(named[name]), [])
            if len(found) != 1:
                return None                       # tied (shared) parameters
            mod_name, attr, module = found[0]
            if type(module) not in _SUPPORTED or attr not in ("weight", "bias"):
                return None
            modules[mod_name] = module
            slots[name] = (mod_name, attr)
        return cls(modules, slots)

    def _hook(self, name: str):
        def hook(_module, inputs, output):
            x = inputs[0] if inputs else None
            self.records.setdefault(name, []).append(
                (x.detach() if isinstance(x, torch.Tensor) else None, output,
                 x._version if isinstance(x, torch.Tensor) else None,
                 output._version if isinstance(output, torch.Tensor) else None))
        return hook

    def run(self, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Call ``forward`` with the hooks in place; the records are kept for :meth:`consistent`."""
        self.records = {}
        handles = [m.register_forward_hook(self._hook(name)) for name, m in self.modules.items()]
        try:
            return forward()
        finally:
            for h in handles:
                h.remove()

    def consistent(self, batch: int) -> bool:
        """Whether the recorded forward allows the factored per-example formulas (see the module doc)."""
        for name, module in self.modules.items():
            rec = self.records.get(name, [])
            if len(rec) != 1:
                return False                     # never reached or called more than once
            x, out, x_version, out_version = rec[0]
            if x is None or not isinstance(out, torch.Tensor) or not out.requires_grad:
                return False
            if x._version != x_version or out._version != out_version:
                return False                     # modified in place after the module ran
            if x.dim() < 2 or x.shape[0] != batch or out.shape[0] != batch:
                return False
            if isinstance(module, nn.Linear) and (x.shape[-1] != module.in_features or out.shape != (
                    *x.shape[:-1], module.out_features)):
                return False
            if isinstance(module, nn.LayerNorm):
                ns = tuple(module.normalized_shape)
                if tuple(x.shape[-len(ns):]) != ns or out.shape != x.shape or x.dim() <= len(ns):
                    return False
        return True

    def outputs(self) -> list[torch.Tensor]:
        return [self.records[name][0][1] for name in self.modules]

    def out_elements(self) -> int:
        """Elements of all tapped outputs of one example (memory of one batched backward per example)."""
        return sum(rec[0][1][0].numel() for rec in self.records.values())

    def accumulate(self, grads, weights: torch.Tensor | None, sums: dict[str, torch.Tensor]) -> None:
        """Add Σ_c Σ_n w_cn (∇θ ℓ_cn)² of every tapped parameter into ``sums``.

        ``grads``: per module ∂ℓ_c/∂output stacked over C objectives ([C, N, ...]; C = 1 for the
        empirical Fisher) or None (the output did not reach the loss); ``weights`` [C, N] or None (all 1).
        """
        by_module = {name: g for name, g in zip(self.modules, grads)}
        targets: dict[str, dict[str, torch.Tensor]] = {}
        for pname, (mod_name, attr) in self.param_slots.items():
            targets.setdefault(mod_name, {})[attr] = sums[pname]
        for mod_name, slots in targets.items():
            g = by_module[mod_name]
            if g is None:
                continue
            module = self.modules[mod_name]
            x = self.records[mod_name][0][0]
            acc = next(iter(slots.values())).dtype
            g, x = g.to(acc), x.to(acc)
            w = None if weights is None else weights.to(acc)
            if isinstance(module, nn.Linear):
                _linear(g, x, w, slots.get("weight"), slots.get("bias"))
            else:
                _layer_norm(module, g, x, w, slots.get("weight"), slots.get("bias"))


def _weighted_square_sum(per_example: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Σ_{c,n} w_cn per_example[c, n]² over the two leading dimensions (w None: all 1)."""
    sq = per_example.square()
    if weights is None:
        return sq.sum((0, 1))
    return torch.tensordot(weights, sq, dims=2)


def _linear(g, x, weights, w_sum, b_sum) -> None:
    """g [C, N, ..., out], x [N, ..., in]."""
    C, n = g.shape[:2]
    if x.dim() == 2:
        g2 = g.square()
        if weights is not None:
            g2.mul_(weights[..., None])
        g2 = g2.sum(0)                                   # Σ_c w_c ∘ G_c²: [N, out]
        if w_sum is not None:
            w_sum.addmm_(g2.t(), x.square())             # (Σ_c w_c ∘ G_c²)ᵀ X²: one GEMM
        if b_sum is not None:
            b_sum.add_(g2.sum(0))
        return
    g4 = g.reshape(C, n, -1, g.shape[-1])                # [C, N, T, out]
    x3 = x.reshape(n, -1, x.shape[-1])                   # [N, T, in]
    if b_sum is not None:
        b_sum.add_(_weighted_square_sum(g4.sum(2), weights))
    if w_sum is None:
        return
    chunk = max(1, _CHUNK_ELEMENTS // max(1, w_sum.numel()))
    for c in range(C):
        for s in range(0, n, chunk):
            per_example = torch.bmm(g4[c, s:s + chunk].transpose(1, 2), x3[s:s + chunk])   # Σ_t g_t x_tᵀ
            w = None if weights is None else weights[c:c + 1, s:s + chunk]
            w_sum.add_(_weighted_square_sum(per_example.unsqueeze(0), w))


def _layer_norm(module: nn.LayerNorm, g, x, weights, w_sum, b_sum) -> None:
    """g [C, N, ..., *normalized_shape], x [N, ..., *normalized_shape]."""
    ns = tuple(module.normalized_shape)
    C, n = g.shape[:2]
    if w_sum is not None:
        x_hat = F.layer_norm(x, ns, None, None, module.eps)
        w_sum.add_(_weighted_square_sum((g * x_hat).reshape(C, n, -1, *ns).sum(2), weights))
    if b_sum is not None:
        b_sum.add_(_weighted_square_sum(g.reshape(C, n, -1, *ns).sum(2), weights))
