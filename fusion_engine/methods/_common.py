"""Helpers the method modules share: Gram matrices in one read, NaN/Inf checks, cache-sized steps,
exact keep counts, deltas.

Inner products: :func:`inner_products` (the C++ kernel on CPU; its torch reference, which runs
over 1M-element chunks in the accumulation dtype with the chunk results summed in float64,
elsewhere): no full-size temporary and no K×N stack.
"""

from __future__ import annotations

import os

import torch

from .._dispatch import _probe
from ..errors import ConfigError, NonFiniteError
from ..ops._common import accum_dtype, flat

_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
CHUNK = 1 << 20
# elements per step of the elementwise methods on CPU: each temporary (0.5 MB in fp32) stays in L2,
# and each op is still large enough for torch to split across its threads (grain 32768)
CACHE_CHUNK = 1 << 17
NORM_EPS = 1e-7  # mergekit's `rescaled_masked_tensor` eps


def chunks(n: int):
    for start in range(0, n, CHUNK):
        yield start, min(n, start + CHUNK)


def cache_chunks(n: int, device: torch.device):
    """(start, end) steps of an elementwise method: CACHE_CHUNK entries on CPU, where a chain of
    torch ops on cache-resident slices runs several times faster than on whole tensors (each op
    a pass through memory); one step on other devices."""
    step = CACHE_CHUNK if device.type == "cpu" else max(n, 1)
    for start in range(0, n, step):
        yield start, min(n, start + step)


def staged(src: torch.Tensor, buffer: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """src (a slice) in ``dtype``: itself when it has that dtype, else converted into ``buffer``."""
    return src if src.dtype == dtype else buffer[:src.numel()].copy_(src)


def inner_products_reference(tensors: list[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
    """The K×K float64 Gram matrix G_ij = ⟨x_i − b, x_j − b⟩ (⟨x_i, x_j⟩ without a base), the
    differences rounded to the inputs' dtype as a stored task vector is; each chunk's dot products
    in the accumulation dtype, the chunks summed in float64. Reads each input once per chunk."""
    k = len(tensors)
    gram = torch.zeros(k, k, dtype=torch.float64)
    flats = [flat(t) for t in tensors]
    fb = None if base is None else flat(base)
    for s, e in chunks(flats[0].numel()):
        parts = [f[s:e] if fb is None else f[s:e] - fb[s:e] for f in flats]
        parts = [p.to(accum_dtype(p.dtype)) for p in parts]
        for i in range(k):
            for j in range(i, k):
                gram[i, j] += float(torch.dot(parts[i], parts[j]))
    return gram + gram.triu(1).T  # the lower triangle mirrors the upper


def inner_products(tensors: list[torch.Tensor], base: torch.Tensor | None = None,
                   backend: str | None = None) -> tuple[list[list[float]], bool]:
    """(G, nonfinite): the Gram matrix of :func:`inner_products_reference` and whether an input (or
    the base) holds NaN/Inf, in one read of each input.

    CPU tensors run the private C++ kernel ``_C.inner_products`` (fp32 lane sums per 512-entry
    block, fp64 across blocks, in a fixed order: independent of the thread count) unless the torch
    backend is asked for; other devices run the torch reference.
    """
    requested = (backend or os.environ.get("FUSION_ENGINE_BACKEND") or "").lower()
    flats = [flat(t) for t in tensors]
    fb = None if base is None else flat(base)
    if flats[0].device.type == "cpu" and requested in ("", "cpp") and _probe("cpp").usable:
        from ..launchers import cpp

        gram, nonfinite = cpp.inner_products(flats, fb)
    else:
        gram = inner_products_reference(flats, fb)
        nonfinite = not bool(torch.isfinite(gram).all()) and any_nonfinite([*flats, *([] if fb is None else [fb])])
    return gram.tolist(), bool(nonfinite)


def holds_nonfinite(t: torch.Tensor) -> bool:
    """Whether t holds NaN/Inf, in one read without a temporary: on CPU the flag of the C++
    inner-products kernel; elsewhere a finite sum proves it does not, and only an infinite or NaN
    sum (NaN/Inf entries, or an overflowing sum) runs the exact check."""
    if not t.numel():
        return False
    if t.device.type == "cpu" and t.dtype in _KERNEL_DTYPES and _probe("cpp").usable:
        from ..launchers import cpp

        return bool(cpp.inner_products([flat(t)])[1])
    total = t.sum(dtype=accum_dtype(t.dtype))
    return not bool(torch.isfinite(total)) and not bool(torch.isfinite(t).all())


def any_nonfinite(tensors: list[torch.Tensor]) -> bool:
    return any(holds_nonfinite(t) for t in tensors)


def require_finite(group, nonfinite: bool) -> None:
    """Raise NonFiniteError when a reduction saw NaN/Inf and the group asks for the check (the
    merge API then names the offending inputs)."""
    if nonfinite and group.check_finite:
        raise NonFiniteError(f"{group.name or 'merge'}: an input holds NaN or Inf values")


def delta(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """x − base in the inputs' (working) dtype, as mergekit computes a task vector."""
    return x - base


def density_for_count(k: int, n: int) -> float:
    """A density ρ with int(ρ · n) = k (the ops keep int(ρ · n) entries)."""
    if k <= 0 or n <= 0:
        return 0.0
    if k >= n:
        return 1.0
    return (k + 0.5) / n


def mergekit_topk_count(density: float, n: int) -> int:
    """mergekit's magnitude trim keeps k = max(1, int(ρ · n)) for 0 < ρ < 1, n for ρ ≥ 1, 0 for ρ ≤ 0."""
    if density >= 1:
        return n
    if density <= 0 or n == 0:
        return 0
    return max(1, int(density * n))


def l1_rescale(values: torch.Tensor, kept_values: torch.Tensor) -> float:
    """‖values‖₁ / ‖kept_values‖₁ (kept_values = values ⊙ mask), or 1 when either is below 1e-7
    (mergekit's L1 rescale). Each norm is one float64 reduction, no temporary."""
    before = float(torch.linalg.vector_norm(values, 1, dtype=torch.float64))
    after = float(torch.linalg.vector_norm(kept_values, 1, dtype=torch.float64))
    if before < NORM_EPS or after < NORM_EPS:
        return 1.0
    return before / after


def nonzero_sum_weights(method: str, weights: list[float]) -> list[float]:
    """Weights divided by their sum; a zero sum is a ConfigError."""
    total = sum(weights)
    if abs(total) < 1e-12:
        raise ConfigError(f"{method}: the weights {weights} sum to 0; they are normalized by their sum, "
                          f"so give weights with a non-zero sum")
    return [w / total for w in weights]
