"""``wudi``: data-free merging by minimising the interference each task vector's own inputs see
(WUDI merging, Cheng et al., 2025), the authors' and FusionBench's procedure per linear layer.

For a 2-D tensor with task vectors τ_i = x_i − b (m × n), find the merged task vector τ_m that
minimises

.. math::  L(\\tau_m) = \\sum_i \\frac{\\lVert (\\tau_m - \\tau_i)\\, \\tau_i^\\top \\rVert_F^2}{\\lVert \\tau_i \\rVert_F^2}

(the rows of τ_i stand in for the task's inputs), by ``iterations`` Adam steps (learning rate
``lr``, torch's Adam with its default β = (0.9, 0.999), ε = 1e-8) from τ_m = Σ_i τ_i; then
y = b + λ · τ_m. Other tensors: y = b + λ · mean_i τ_i.

The gradient is computed in closed form, ∇L = 2 (τ_m A − B) with the n × n matrix
A = Σ_i τ_iᵀ τ_i / ‖τ_i‖² and B = Σ_i τ_i τ_iᵀ τ_i / ‖τ_i‖² formed once: one m × n × n product per
step instead of autograd's 2K products of m × m × n and their backward pass. A task vector that is
all zero contributes nothing (its term is 0/0 in the formula). Runs on the inputs' device (the
paper: a GPU); float32 (float64 for float64 inputs).

Reference: Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model
Merging via Task Vectors", ICML 2025 (https://arxiv.org/abs/2503.08099); code:
https://github.com/nathanielyvo/WUDI-Merging.
"""

from __future__ import annotations

import torch

from .registry import BASE_REQUIRED, SHARED, Group, Method, Parameter, register
from .subspace import LAMBDA, merge_matrices


def interference_gradient_terms(tv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the closed-form gradient 2 (τ_m A − B), from the K × m × n task vectors."""
    norms = tv.square().sum((1, 2))
    weights = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)
    grams = tv.transpose(1, 2) @ tv  # K × n × n: τ_iᵀ τ_i
    grams.mul_(weights.view(-1, 1, 1))
    return grams.sum(0), (tv @ grams).sum(0)


def wudi_task_vector(tv: torch.Tensor, iterations: int, lr: float) -> torch.Tensor:
    """The merged task vector τ_m after ``iterations`` Adam steps on L (module docstring)."""
    a, b = interference_gradient_terms(tv)
    merged = torch.nn.Parameter(tv.sum(0))
    optimizer = torch.optim.Adam([merged], lr=lr)
    for _ in range(iterations):
        merged.grad = torch.addmm(b, merged.detach(), a, beta=-2.0, alpha=2.0)
        optimizer.step()
    return merged.detach()


def merge_wudi(group: Group, **p) -> torch.Tensor:
    return merge_matrices(group, p["lambda"], lambda tv: wudi_task_vector(tv, p["iterations"], p["lr"]))


register(Method(
    name="wudi", merge=merge_wudi,
    parameters=(
        LAMBDA,
        Parameter("iterations", int, SHARED, default=300, low=0, doc="Adam steps per 2-D tensor"),
        Parameter("lr", float, SHARED, default=1e-5, low=0.0, low_open=True, doc="Adam's learning rate"),
    ),
    base=BASE_REQUIRED, min_non_base=1,
    summary="data-free: minimise each task's interference by Adam steps", reference="https://arxiv.org/abs/2503.08099",
))
