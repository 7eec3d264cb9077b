"""DARE: drop and rescale task vectors, then combine (Yu et al., 2024).

.. math::  y = b + \\lambda \\sum_i w_i\\, s_i\\, (m_i \\odot \\delta_i), \\qquad m_{ij} \\sim \\text{Bernoulli}(\\rho_i)
"""

from __future__ import annotations

import torch

from .._dispatch import cpp_launchers, cuda_launchers, register, triton_kernels
from . import _common as C
from .philox import check_seed, keep_mask, keep_threshold
from .ties_merge import DIVISORS, SIGN_METHODS, SIGN_ON

RESCALES = (None, "density", "l1")


def dare_merge(base, tensors, weights, density, *, seed: int, stream: int = 0, consensus: str | None = None,
               sign_on: str = "weighted", divisor: str = "weights", rescale: str | None = "density",
               normalize: bool = False, lam: float = 1.0, offset: int = 0, out_dtype=None,
               check_finite: bool = True, backend: str | None = None) -> torch.Tensor:
    """Drop each task-vector entry with probability 1 − ρ_i, rescale the survivors, and combine.

    δ_i = x_i − b (in the inputs' dtype); m_ij = [u_ij < floor(ρ_i 2^32)] with u_ij the Philox
    word of (seed, stream, model i, entry offset + j) (:mod:`fusion_engine.ops.philox`): the same mask
    on every backend and under any chunking. v_i = s_i (m_i ⊙ δ_i) with s_i = 1/ρ_i
    (``rescale="density"``, the paper; PEFT), ‖δ_i‖₁/‖m_i ⊙ δ_i‖₁ (``"l1"``, mergekit's
    ``rescale: true``) or 1 (None). Then, without consensus:
    y = b + λ Σ w_i v_i (÷ Σ w_i when ``normalize``); with ``consensus="sum"|"count"`` the TIES
    election and disjoint merge of :func:`ties_merge` (``sign_on``, ``divisor``).

    mergekit ``dare_linear``/``dare_ties``: ``rescale="l1"`` (consensus ``"sum"`` for dare_ties).
    PEFT ``dare_linear``/``dare_ties``: ``base=0``, ``rescale="density"``; dare_ties adds
    ``consensus="sum", sign_on="unweighted", divisor="count", normalize=True``.

    Parameters
    ----------
    base, tensors, weights : as in :func:`ties_merge`
    density : ρ ∈ [0, 1], a scalar or one per tensor (the keep probability)
    seed : int in [0, 2^64); stream : int in [0, 2^32), e.g. ``philox.stream_id(tensor_name)``
    offset : index of this tensor's first entry when merging one chunk of a larger tensor
    consensus, sign_on, divisor, rescale, normalize, lam : see above

    Example
    -------
    >>> y = dare_merge(torch.zeros(8), [torch.ones(8)], None, 0.5, seed=0)   # entries are 0 or 2

    Reference: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous
    Models as a Free Lunch", ICML 2024.
    """
    op = "dare_merge"
    tensors = C.tensor_list(op, tensors)
    named = [("base", base)] + [(f"tensors[{i}]", t) for i, t in enumerate(tensors)]
    shape, dtype, device = C.check_tensors(op, named)
    w = C.per_model_floats(op, "weights", weights, len(tensors), default=1.0)
    rho = C.densities(op, density, len(tensors))
    seed, stream = check_seed(op, seed, stream)
    C.choice(op, "consensus", consensus, (None, *SIGN_METHODS))
    C.choice(op, "sign_on", sign_on, SIGN_ON)
    C.choice(op, "divisor", divisor, DIVISORS)
    C.choice(op, "rescale", rescale, RESCALES)
    if not isinstance(offset, int) or offset < 0:
        raise C.ConfigError(f"{op}: offset={offset!r} must be a non-negative int")
    out_dtype = C.out_dtype_of(op, out_dtype, dtype)
    return C.run(op, named, shape, dtype, device, backend, check_finite,
                 (C.flat(base), [C.flat(t) for t in tensors], w, rho),
                 dict(seed=seed, stream=stream, offset=offset, consensus=consensus, sign_on=sign_on,
                      divisor=divisor, rescale=rescale, normalize=bool(normalize), lam=float(lam),
                      out_dtype=out_dtype))


def dare_merge_reference(base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float],
                         densities: list[float], *, seed: int, stream: int, offset: int, consensus: str | None,
                         sign_on: str, divisor: str, rescale: str | None, normalize: bool, lam: float,
                         out_dtype: torch.dtype):
    """Kernel-level oracle. Returns ``(y, nonfinite)``."""
    kept = []
    for i, (x, rho) in enumerate(zip(tensors, densities)):
        delta = C.task_vector(x, base).to(C.accum_dtype(x.dtype))
        mask = keep_mask(delta.numel(), rho, seed=seed, stream=stream, model=i, offset=offset,
                         device=delta.device).to(delta.dtype)
        if rescale == "density":
            scale = 1.0 / rho if keep_threshold(rho) > 0 else 0.0
        elif rescale == "l1":
            scale = C.l1_rescale(delta, delta * mask)
        else:
            scale = 1.0
        kept.append(delta * mask * torch.tensor(scale, dtype=delta.dtype))
    y = C.combine_reference(base, kept, weights, consensus=consensus, sign_on=sign_on, divisor=divisor,
                            normalize=normalize, lam=lam, out_dtype=out_dtype)
    return y, C.any_nonfinite_reference([base, *tensors])


register("dare_merge", torch=dare_merge_reference,
         cpp=lambda: cpp_launchers().dare_merge,
         triton=lambda: triton_kernels().dare_merge.dare_merge,
         cuda=lambda: cuda_launchers().dare_merge)
