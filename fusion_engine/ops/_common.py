"""Validation and plumbing shared by every op: checks, flattening, dtypes, NaN reporting.

An op's public function validates its arguments here, flattens its tensors to contiguous 1-D
views (a copy only for non-contiguous inputs; inputs are never written), dispatches to one
kernel-level function (:func:`run`, through :func:`fusion_engine._dispatch.resolve`) and restores
the shape of the result. The helpers of the references (task vector, L1 rescale, the combine step
of TIES and DARE) live here too, and the methods reuse them.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .._dispatch import resolve
from ..errors import (
    ConfigError,
    DeviceMismatchError,
    DTypeMismatchError,
    NonFiniteError,
    ShapeMismatchError,
)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
EPS_NORM = 1e-7  # below this L1 norm, rescaling is skipped (mergekit's `rescaled_masked_tensor` eps)


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 inputs, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensors(op: str, named: Sequence[tuple[str, torch.Tensor]], *,
                  same_dtype: bool = True) -> tuple[torch.Size, torch.dtype, torch.device]:
    """All tensors must be floating, of one shape and device, and (``same_dtype``) of one dtype among
    float16, bfloat16, float32, float64; without ``same_dtype`` any floating dtypes may mix (the
    merge API converts them to its working dtype). Returns the first tensor's (shape, dtype, device)."""
    if not named:
        raise ConfigError(f"{op}: got an empty list of tensors; pass at least one tensor to merge")
    first_name, first = named[0]
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"{op}: {name} is a {type(t).__name__}, not a torch.Tensor")
        if t.dtype not in FLOAT_DTYPES and (same_dtype or not t.is_floating_point()):
            raise DTypeMismatchError(
                f"{op}: {name} has dtype {t.dtype}; supported are float16, bfloat16, float32, float64 "
                f"(cast it with .to(torch.float32))"
            )
    for name, t in named:
        if t.shape != first.shape:
            raise ShapeMismatchError(
                f"{op}: {name} has shape {tuple(t.shape)} but {first_name} has {tuple(first.shape)}; "
                f"every merged tensor must have the same shape"
            )
        if same_dtype and t.dtype != first.dtype:
            raise DTypeMismatchError(
                f"{op}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}; "
                f"cast them to one dtype first"
            )
        if t.device != first.device:
            raise DeviceMismatchError(
                f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                f"move them to one device first"
            )
    return first.shape, first.dtype, first.device


def tensor_list(op: str, tensors, name: str = "tensors") -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        raise ConfigError(f"{op}: {name} must be a list of tensors, not one tensor (wrap it: [t])")
    tensors = list(tensors)
    if not tensors:
        raise ConfigError(f"{op}: {name} is empty; pass at least one tensor")
    return tensors


def per_model_floats(op: str, name: str, values, count: int, default: float | None = None) -> list[float]:
    """A scalar broadcast to every model, or one value per model (list, tuple or 1-D tensor)."""
    if values is None:
        if default is None:
            raise ConfigError(f"{op}: {name} is required")
        return [float(default)] * count
    if isinstance(values, torch.Tensor):
        values = values.detach().reshape(-1).tolist() if values.dim() else float(values)
    if isinstance(values, (int, float)):
        return [float(values)] * count
    values = [float(v) for v in values]
    if len(values) != count:
        raise ConfigError(f"{op}: got {len(values)} {name} for {count} tensors; give one per tensor or a scalar")
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise ConfigError(f"{op}: {name}[{i}] is {v}; it must be a finite number")
    return values


def keep_counts(op: str, density, k, count: int, numel: int) -> list[int]:
    """Per-model keep counts from exactly one of ``density`` (k_i = floor(ρ_i n)) or ``k`` (counts
    as the caller has them: a scalar or one per model, each in [0, n])."""
    if (density is None) == (k is None):
        raise ConfigError(f"{op}: give exactly one of density (the fraction kept) and k (the count kept)")
    if density is not None:
        return [keep_count(d, numel) for d in densities(op, density, count)]
    if isinstance(k, torch.Tensor):
        k = k.reshape(-1).tolist() if k.dim() else int(k)
    ks = [k] * count if not isinstance(k, (list, tuple)) else list(k)
    if len(ks) != count:
        raise ConfigError(f"{op}: got {len(ks)} keep counts k for {count} tensors; give one per tensor or a scalar")
    for i, ki in enumerate(ks):
        if isinstance(ki, bool) or not hasattr(ki, "__index__") or not 0 <= int(ki) <= numel:
            raise ConfigError(f"{op}: k[{i}] = {ki!r} must be an int in [0, {numel}] (the entries kept)")
    return [int(ki) for ki in ks]


def densities(op: str, density, count: int) -> list[float]:
    values = per_model_floats(op, "density", density, count)
    for i, d in enumerate(values):
        if not 0.0 <= d <= 1.0:
            raise ConfigError(f"{op}: density[{i}] = {d} is outside [0, 1]; it is the fraction of entries kept")
    return values


def keep_count(density: float, numel: int) -> int:
    """k = floor(density · n), computed in float64 like int(density * n) in mergekit and PEFT."""
    return min(numel, max(0, int(density * numel)))


def choice(op: str, name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ConfigError(f"{op}: {name}={value!r} is not one of {', '.join(map(repr, allowed))}")


def out_dtype_of(op: str, out_dtype, dtype: torch.dtype) -> torch.dtype:
    out = dtype if out_dtype is None else out_dtype
    if out not in FLOAT_DTYPES:
        raise DTypeMismatchError(f"{op}: out_dtype={out} is not a floating dtype")
    return out


def flat(t: torch.Tensor) -> torch.Tensor:
    """A contiguous 1-D view (a copy only when ``t`` is not contiguous; ``t`` is never written)."""
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)


def run(op: str, named: Sequence[tuple[str, torch.Tensor]], shape, dtype, device, backend, check_finite, args, kwargs):
    """Dispatch one call to a kernel-level function and report non-finite inputs by name."""
    _, kernel = resolve(op, device, dtype, backend)
    with torch.no_grad():  # the fused ops are not differentiable (methods take an exact torch path for autograd)
        out, nonfinite = kernel(*args, **kwargs)
    if nonfinite and check_finite:
        bad = [name for name, t in named if any_nonfinite_reference([t])]
        raise NonFiniteError(
            f"{op}: {', '.join(bad) or 'an input'} holds NaN or Inf values; clean the checkpoint, "
            f"or pass check_finite=False to let them propagate"
        )
    return out.view(shape)


def any_nonfinite_reference(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether any tensor holds NaN/Inf: the oracle of the non-finite flag every kernel returns
    (the dispatched op is :func:`fusion_engine.ops.nonfinite.any_nonfinite`)."""
    return any(t.numel() and not bool(torch.isfinite(t).all()) for t in tensors)


def task_vector(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """δ = x − base in the inputs' dtype: the task vector as a checkpoint stores it and as mergekit
    computes it (torch rounds the exact difference once to that dtype)."""
    return x - base


def l1_rescale(values: torch.Tensor, kept_values: torch.Tensor) -> float:
    """‖values‖₁ / ‖kept_values‖₁ (kept_values = values ⊙ mask), or 1 when either norm is below
    ``EPS_NORM`` = 1e-7 (mergekit's L1 rescale). Each norm is one float64 reduction, no temporary."""
    before = float(torch.linalg.vector_norm(values, 1, dtype=torch.float64))
    after = float(torch.linalg.vector_norm(kept_values, 1, dtype=torch.float64))
    if before < EPS_NORM or after < EPS_NORM:
        return 1.0
    return before / after


def combine_reference(base: torch.Tensor, kept_deltas: list[torch.Tensor], weights: list[float], *,
                      consensus: str | None, sign_on: str, divisor: str, normalize: bool, lam: float,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """The combine step shared by TIES and DARE, written for clarity (the oracle).

    With v_i the trimmed/dropped (and rescaled) task vectors and e_i = w_i v_i (``sign_on="weighted"``)
    or v_i (``"unweighted"``):

    * consensus ``"sum"``: s = sign(Σ e_i); ``"count"``: s = sign(Σ sign(e_i)); a zero total elects +1;
      a_i = [sign(e_i) = s] (a zero entry never agrees). Without consensus a_i = 1.
    * numerator  N = Σ a_i w_i v_i
    * divisor    D = Σ a_i w_i (``divisor="weights"``) or Σ a_i (``"count"``); D = 0 → 1.
      Without consensus D = Σ w_i, with |D| < 1e-8 → 1 (mergekit).
    * y = b + λ · (N / D if normalize else N)
    """
    acc_dtype = accum_dtype(base.dtype)
    v = torch.stack(kept_deltas)                                     # [K, n] (oracle only)
    w = torch.tensor(weights, dtype=acc_dtype, device=base.device).view(-1, 1)
    weighted = w * v
    if consensus is None:
        numerator = weighted.sum(0)
        total_w = w.sum()
        den = torch.where(total_w.abs() < 1e-8, torch.ones_like(total_w), total_w)
    else:
        e = weighted if sign_on == "weighted" else v
        sign = torch.sign(e)
        total = e.sum(0) if consensus == "sum" else sign.sum(0)
        majority = torch.where(total >= 0, 1.0, -1.0).to(acc_dtype)
        agree = (sign == majority).to(acc_dtype)
        numerator = (weighted * agree).sum(0)
        den = (w * agree).sum(0) if divisor == "weights" else agree.sum(0)
        den = torch.where(den == 0, torch.ones_like(den), den)
    mixed = numerator / den if normalize else numerator
    return (base.to(acc_dtype) + torch.tensor(lam, dtype=acc_dtype) * mixed).to(out_dtype)
