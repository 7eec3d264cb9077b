"""TIES merging: trim, elect sign, disjoint merge (Yadav et al., 2023).

.. math::  y = b + \\lambda \\frac{\\sum_i a_i w_i \\hat\\delta_i}{\\sum_i a_i w_i}
"""

from __future__ import annotations

import torch

from .._dispatch import cpp_launchers, cuda_launchers, register, triton_kernels
from . import _common as C
from .magnitude_mask import TIES_MODES, topk_magnitude_reference

SIGN_METHODS = ("sum", "count")
SIGN_ON = ("weighted", "unweighted")
DIVISORS = ("weights", "count")


def ties_merge(base, tensors, weights, density=None, *, k=None, sign: str = "sum", sign_on: str = "weighted",
               divisor: str = "weights", normalize: bool = True, lam: float = 1.0, rescale: str | None = None,
               tie: str = "index", out_dtype=None, check_finite: bool = True,
               backend: str | None = None) -> torch.Tensor:
    """TIES-merge K fine-tuned tensors into their base, in two fused passes over the inputs.

    1. **Trim**: δ_i = x_i − b (in the inputs' dtype); keep its k_i = floor(ρ_i n) entries of largest
       magnitude (see :func:`magnitude_mask` for ``tie``): δ̂_i = m_i ⊙ δ_i. With ``rescale="l1"``,
       δ̂_i is scaled by ‖δ_i‖₁ / ‖δ̂_i‖₁ (skipped when either is below 1e-7).
    2. **Elect**: e_i = w_i δ̂_i (``sign_on="weighted"``) or δ̂_i; majority sign s = sign(Σ e_i)
       (``sign="sum"``) or sign(Σ sign e_i) (``"count"``), +1 for a zero total.
    3. **Disjoint merge**: a_i = [sign(e_i) = s];
       N = Σ a_i w_i δ̂_i, D = Σ a_i w_i (``divisor="weights"``) or Σ a_i (``"count"``), 0 → 1;
       y = b + λ (N / D if normalize else N).

    mergekit ``ties``: the defaults (``rescale=None``; ``"l1"`` for its ``rescale: true``).
    PEFT ``ties``: ``base=0, sign_on="unweighted", divisor="count"`` (its ``majority_sign_method``
    "total" is ``sign="sum"``, "frequency" is ``"count"``).

    Parameters
    ----------
    base : tensor, the pre-trained weights b
    tensors : list of K tensors x_i shaped like ``base``
    weights : K floats w_i (or a scalar, or None for all 1)
    density : ρ ∈ [0, 1], a scalar or one per tensor
    k : keep counts k_i ∈ [0, n], a scalar or one per tensor (instead of ``density``)
    sign, sign_on, divisor, normalize, lam, rescale, tie : see above
    out_dtype, check_finite, backend : as in :func:`linear_merge`

    Returns
    -------
    The merged tensor shaped like ``base``, in ``out_dtype`` (default: the inputs' dtype).

    Example
    -------
    >>> b = torch.zeros(4)
    >>> ties_merge(b, [torch.tensor([1., -2, 3, 0]), torch.tensor([-1., -1, 1, 4])], None, 0.5)
    tensor([-1., -2.,  3.,  4.])

    Reference: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.
    """
    op = "ties_merge"
    tensors = C.tensor_list(op, tensors)
    named = [("base", base)] + [(f"tensors[{i}]", t) for i, t in enumerate(tensors)]
    shape, dtype, device = C.check_tensors(op, named)
    w = C.per_model_floats(op, "weights", weights, len(tensors), default=1.0)
    ks = C.keep_counts(op, density, k, len(tensors), base.numel())
    C.choice(op, "sign", sign, SIGN_METHODS)
    C.choice(op, "sign_on", sign_on, SIGN_ON)
    C.choice(op, "divisor", divisor, DIVISORS)
    C.choice(op, "rescale", rescale, (None, "l1"))
    C.choice(op, "tie", tie, TIES_MODES)
    out_dtype = C.out_dtype_of(op, out_dtype, dtype)
    return C.run(op, named, shape, dtype, device, backend, check_finite,
                 (C.flat(base), [C.flat(t) for t in tensors], w, ks),
                 dict(sign=sign, sign_on=sign_on, divisor=divisor, normalize=bool(normalize),
                      lam=float(lam), rescale=rescale, tie=tie, out_dtype=out_dtype))


def ties_merge_reference(base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float], ks: list[int], *,
                         sign: str, sign_on: str, divisor: str, normalize: bool, lam: float,
                         rescale: str | None, tie: str, out_dtype: torch.dtype):
    """Kernel-level oracle: flat tensors, per-model keep counts k_i. Returns ``(y, nonfinite)``."""
    kept = []
    for x, k in zip(tensors, ks):
        delta = C.task_vector(x, base).to(C.accum_dtype(x.dtype))
        mask = topk_magnitude_reference(delta.to(x.dtype), k, tie).to(delta.dtype)
        scale = C.l1_rescale(delta, delta * mask) if rescale == "l1" else 1.0
        kept.append(delta * mask * torch.tensor(scale, dtype=delta.dtype))
    y = C.combine_reference(base, kept, weights, consensus=sign, sign_on=sign_on, divisor=divisor,
                            normalize=normalize, lam=lam, out_dtype=out_dtype)
    return y, C.any_nonfinite_reference([base, *tensors])


register("ties_merge", torch=ties_merge_reference,
         cpp=lambda: cpp_launchers().ties_merge,
         triton=lambda: triton_kernels().ties_merge.ties_merge,
         cuda=lambda: cuda_launchers().ties_merge)
