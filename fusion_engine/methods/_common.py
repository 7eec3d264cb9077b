"""Helpers the method modules share: cache-sized steps, NaN/Inf checks, exact keep counts.

The task vector, the L1 rescale, the inner products and the non-finite check are ops
(``fusion_engine.ops``: one home each, dispatched like every kernel); this module re-exports them
under the names the methods use.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, NonFiniteError
from ..ops._common import l1_rescale, task_vector
from ..ops.inner_products import inner_products
from ..ops.nonfinite import any_nonfinite

__all__ = ["CACHE_CHUNK", "any_nonfinite", "cache_chunks", "inner_products", "l1_rescale", "mergekit_topk_count",
           "nonzero_sum_weights", "require_finite", "staged", "task_vector"]

# elements per step of the elementwise methods on CPU: each temporary (0.5 MB in fp32) stays in L2,
# and each op is still large enough for torch to split across its threads (grain 32768)
CACHE_CHUNK = 1 << 17


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


def require_finite(group, nonfinite: bool) -> None:
    """Raise NonFiniteError when a reduction saw NaN/Inf and the group asks for the check (the
    merge API then names the offending inputs)."""
    if nonfinite and group.check_finite:
        raise NonFiniteError(f"{group.name or 'merge'}: an input holds NaN or Inf values")


def mergekit_topk_count(density: float, n: int) -> int:
    """mergekit's magnitude trim keeps k = max(1, int(ρ · n)) for 0 < ρ < 1, n for ρ ≥ 1, 0 for ρ ≤ 0."""
    if density >= 1:
        return n
    if density <= 0 or n == 0:
        return 0
    return max(1, int(density * n))


def nonzero_sum_weights(method: str, weights: list[float]) -> list[float]:
    """Weights divided by their sum; a zero sum is a ConfigError."""
    total = sum(weights)
    if abs(total) < 1e-12:
        raise ConfigError(f"{method}: the weights {weights} sum to 0; they are normalized by their sum, "
                          f"so give weights with a non-zero sum")
    return [w / total for w in weights]


def exact_path(group, force: bool = False) -> bool:
    """Whether a method takes its exact torch path: an input requires grad (``group.grad``) or the
    caller asks for it (``force``: e.g. masks drawn from torch's global generator). NaN/Inf inputs
    are reported first unless check_finite=False (the fused ops report them on the other path)."""
    if group.grad or force:
        require_finite(group, any_nonfinite([t.detach() for t in group.tensors]))
        return True
    return False
