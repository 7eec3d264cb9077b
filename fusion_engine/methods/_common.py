"""Helpers the method modules share: accurate chunked reductions, exact keep counts, deltas.

Reductions (norms, inner products) run over 1M-element chunks in the accumulation dtype (float32,
float64 for float64), the chunk results summed in float64, so they need no full-size temporary and no K×N stack.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..ops._common import accum_dtype, flat

CHUNK = 1 << 20
NORM_EPS = 1e-7  # mergekit's `rescaled_masked_tensor` eps


def chunks(n: int):
    for start in range(0, n, CHUNK):
        yield start, min(n, start + CHUNK)


def inner(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor | None = None) -> float:
    """⟨a − base, b − base⟩ (or ⟨a, b⟩), the differences rounded to the inputs' dtype as a stored
    task vector is; each chunk's dot product in the accumulation dtype, the chunks summed in float64."""
    fa, fb = flat(a), flat(b)
    fc = None if base is None else flat(base)
    total = 0.0
    for s, e in chunks(fa.numel()):
        x, y = fa[s:e], fb[s:e]
        if fc is not None:
            x, y = x - fc[s:e], y - fc[s:e]
        acc = accum_dtype(x.dtype)
        total += float(torch.dot(x.to(acc), y.to(acc)))
    return total


def norm(a: torch.Tensor, base: torch.Tensor | None = None) -> float:
    """‖a − base‖₂ (or ‖a‖₂), like :func:`inner`."""
    return max(0.0, inner(a, a, base)) ** 0.5


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


def l1_rescale(values: torch.Tensor, kept: torch.Tensor) -> float:
    """‖values‖₁ / ‖values ⊙ kept‖₁, or 1 when either is below 1e-7 (mergekit's L1 rescale)."""
    before = 0.0
    after = 0.0
    fv, fk = flat(values), flat(kept)
    for s, e in chunks(fv.numel()):
        v = fv[s:e].to(torch.float64).abs()
        before += float(v.sum())
        after += float((v * fk[s:e]).sum())
    if before < NORM_EPS or after < NORM_EPS:
        return 1.0
    return before / after


def as_acc(t: torch.Tensor) -> torch.Tensor:
    return t.to(accum_dtype(t.dtype))


def nonzero_sum_weights(method: str, weights: list[float]) -> list[float]:
    """Weights divided by their sum; a zero sum is a ConfigError."""
    total = sum(weights)
    if abs(total) < 1e-12:
        raise ConfigError(f"{method}: the weights {weights} sum to 0; they are normalized by their sum, "
                          f"so give weights with a non-zero sum")
    return [w / total for w in weights]
