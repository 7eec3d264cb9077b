"""Sparse upscaling of fine-tuned models into a routed mixture of experts: SMILE.

SMILE (Sparse MIxture of Low-rank Experts; Tang et al., "SMILE: Zero-Shot Sparse Mixture of Low-Rank
Experts Construction From Pre-Trained Foundation Models", 2024) turns every linear layer ``(W₀, b₀)`` of a
pre-trained model and its ``E`` fine-tuned versions ``(W_e, b_e)`` into a layer with a shared part and
``E`` low-rank experts, with no training and no data:

.. math::

    ΔW_e = W_e − W₀ = U_e Σ_e V_eᵀ \\quad (\\text{SVD}),\\qquad
    \\text{expert}_e(x) = U_e^{(k)} Σ_e^{(k)} V_e^{(k)ᵀ} x + (b_e − b₀),

    r_e(x) = \\lVert V_e^{(g)ᵀ} x \\rVert_2,\\qquad p = \\operatorname{softmax}(r),\\qquad
    y = W₀ x + b₀ + \\sum_{e ∈ \\operatorname{top}_K(p)} \\frac{p_e}{\\sum_{e' ∈ \\operatorname{top}_K(p)} p_{e'}}\\,
        \\text{expert}_e(x)

where ``k`` is the experts' rank (``k = None``: the full ΔW_e), ``g`` the router's rank (``gate_k``) and
``K`` the experts used per input (``top_k``). The router asks how much of ``x`` lies in the input
subspace each fine-tuning changed most: an input of task ``e`` is routed to expert ``e`` without any
routing data. With one expert the layer is ``W₀x + b₀ + expert(x)``, the fine-tuned layer itself at full
rank. FusionBench (``fusion_bench.method.smile_upscaling``) has the reference implementation; this one
computes every expert of a batch in two batched matmuls and a masked sum (the same function).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError, ShapeMismatchError


class SmileLinear(nn.Module):
    """A linear layer upscaled to a pre-trained part plus ``E`` routed low-rank experts (SMILE)."""

    def __init__(self, pretrained: nn.Linear, finetuned: list[nn.Linear], *, gate_k: int, k: int | None = None,
                 top_k: int = 1):
        super().__init__()
        if not finetuned:
            raise ConfigError("SMILE needs at least one fine-tuned layer")
        if not 1 <= top_k <= len(finetuned):
            raise ConfigError(f"SMILE top_k={top_k} must be in [1, {len(finetuned)}] (the number of experts)")
        for i, layer in enumerate(finetuned):
            if layer.weight.shape != pretrained.weight.shape:
                raise ShapeMismatchError(f"SMILE: fine-tuned layer {i} has weight shape {list(layer.weight.shape)}, "
                                         f"the pre-trained {list(pretrained.weight.shape)}")
        if gate_k < 1 or (k is not None and k < 1):
            raise ConfigError(f"SMILE ranks must be >= 1: gate_k={gate_k}, k={k}")
        rank = min(pretrained.weight.shape)  # ranks above the layer's are truncated to it, as in FusionBench
        self.top_k, self.gate_k, self.k = top_k, min(gate_k, rank), min(k or rank, rank)
        self.pretrained = copy.deepcopy(pretrained)
        with torch.no_grad():
            deltas = torch.stack([m.weight.float() - pretrained.weight.float() for m in finetuned])  # [E, out, in]
            u, s, vh = torch.linalg.svd(deltas, full_matrices=False)
            keep = self.k
            self.register_buffer("gate", vh[:, :self.gate_k, :].contiguous())                # [E, g, in]
            self.register_buffer("down", (s[:, :keep, None] * vh[:, :keep, :]).contiguous())  # [E, k, in]
            self.register_buffer("up", u[:, :, :keep].contiguous())                      # [E, out, k]
            bias = [(m.bias.float() - pretrained.bias.float()) if pretrained.bias is not None else
                    torch.zeros(pretrained.out_features) for m in finetuned]
            self.register_buffer("bias", torch.stack(bias))                              # [E, out]

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """The routing weights [N, E] of inputs x [N, in]: softmax of ‖V_eᵀx‖, top-K, renormalised, 0 elsewhere."""
        logits = torch.einsum("egi,ni->neg", self.gate, x).norm(dim=-1)
        probs = F.softmax(logits, dim=-1)
        top, index = probs.topk(self.top_k, dim=-1)
        return torch.zeros_like(probs).scatter_(-1, index, top / top.sum(-1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights = self.routing(x.float())
        hidden = torch.einsum("eki,ni->nek", self.down, x.float())
        experts = torch.einsum("eok,nek->neo", self.up, hidden) + self.bias                # [N, E, out]
        out = self.pretrained(x) + torch.einsum("ne,neo->no", weights, experts).to(x.dtype)
        return out.reshape(*shape[:-1], out.shape[-1])


def smile_upscale(pretrained: nn.Module, finetuned: list[nn.Module], *, gate_k: int, k: int | None = None,
                  top_k: int = 1) -> nn.Module:
    """A copy of ``pretrained`` whose every ``nn.Linear`` is a :class:`SmileLinear` over the matching layers of
    ``finetuned`` (same architecture). Other parameters (norms, embeddings) stay the pre-trained ones.

    >>> moe = smile_upscale(pretrained_mlp, [task_a_mlp, task_b_mlp], gate_k=4, k=16)   # doctest: +SKIP
    """
    model = copy.deepcopy(pretrained)
    layers = {name: m for name, m in pretrained.named_modules() if isinstance(m, nn.Linear)}
    if not layers:
        raise ConfigError("smile_upscale: the pre-trained model has no nn.Linear layer to upscale")
    others = [dict(m.named_modules()) for m in finetuned]
    for name, layer in layers.items():
        missing = [i for i, mods in enumerate(others) if not isinstance(mods.get(name), nn.Linear)]
        if missing:
            raise ShapeMismatchError(f"smile_upscale: fine-tuned model {missing[0]} has no linear layer {name!r}")
        upscaled = SmileLinear(layer, [mods[name] for mods in others], gate_k=gate_k, k=k, top_k=top_k)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, upscaled)
    return model.eval()


__all__ = ["SmileLinear", "smile_upscale"]
