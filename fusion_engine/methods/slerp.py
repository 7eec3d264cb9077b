"""Spherical methods: ``slerp``, ``nuslerp``, ``multislerp``, ``karcher`` (mergekit 0.1.5 semantics).

Each reduces the inputs to their K×K Gram matrix (:func:`_common.inner_products`: one read of
every input, fp32 lane sums per block, fp64 across blocks), computes the interpolation
coefficients on the host, and writes the result with one fused :func:`linear_merge` /
:func:`task_arithmetic` pass: two passes over the data in all, no K×N stack.

* **slerp** (base + one input; t): a = base, b = other, both flattened;
  cos θ = ⟨a/‖a‖, b/‖b‖⟩ (norms ≤ 1e-8 read as 1), clamped to [−1, 1];
  y = sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b, or (1−t) a + t b when |cos θ| > 0.9995.
* **nuslerp** (two non-base inputs with weights w; optional base): t = w₂/(w₁+w₂) (0.5 when
  |w₁+w₂| < 1e-6); v_i = x_i − b (or x_i); SLERP of v₁, v₂ over the whole tensor
  (``nuslerp_flatten``, default), over each row (last dim), or over each column
  (``nuslerp_row_wise``); lerp where 1 − cos²θ ≤ 1e-16; y = b + result.
* **multislerp** (≥1 non-base inputs, weights, optional base): v_i = x_i − b, n_i = ‖v_i‖,
  weights normalized to sum 1; m = Σ w_i v_i/(n_i + ε), y = b + (Σ w_i n_i) · m/‖m‖
  (‖m‖² = cᵀGc with c_i = w_i/(n_i + ε) and G the Gram matrix of the v_i: m is never built).
  (mergekit's tangent-space step is a no-op here: the tangent of the weighted mean at its own
  direction vanishes; only its rounding noise, ~1e-7, differs.)
* **karcher** (all inputs, uniform weights 1/K): the weighted Karcher (Fréchet) mean of the unit
  vectors u_i = x_i/‖x_i‖ on the sphere by mergekit's fixed-point iteration (``max_iter``,
  ``tol``), scaled by Σ α_i ‖x_i‖. The iterate is a combination of the u_i, so it runs on the
  K×K Gram matrix and the result is one linear_merge.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from ..ops import linear_merge, task_arithmetic
from ..ops._common import accum_dtype
from . import _common as M
from .registry import (BASE_OPTIONAL, BASE_REQUIRED, NON_BASE, SHARED, Group, Method, Parameter,
                       register)

SLERP_EPS = 1e-8
DOT_THRESHOLD = 0.9995


def _combine(group: Group, xs: list[torch.Tensor], coeffs: list[float], *, over_base: bool = True) -> torch.Tensor:
    """b + Σ c_i (x_i − b) with a base (and ``over_base``), Σ c_i x_i without: one fused pass.
    NaN coefficients (NaN inputs merged with check_finite=False) give an all-NaN result."""
    if any(math.isnan(c) for c in coeffs):
        return torch.full_like(xs[0], math.nan, dtype=group.out_dtype)
    if over_base and group.base is not None:
        return task_arithmetic(group.base, xs, coeffs, **group.ops_kwargs)
    return linear_merge(xs, coeffs, normalize=False, **group.ops_kwargs)


def slerp_coefficients(t: float, cos_theta: float, colinear: bool) -> tuple[float, float]:
    if colinear:
        return 1.0 - t, t
    theta = math.acos(cos_theta)
    s = math.sin(theta)
    return math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s


def _gram(group: Group, xs: list[torch.Tensor], base: torch.Tensor | None) -> list[list[float]]:
    """The Gram matrix of the xs (minus base), NaN/Inf inputs reported unless check_finite=False."""
    gram, nonfinite = M.inner_products(xs, base, group.backend)
    M.require_finite(group, nonfinite)
    return gram


def _root(square: float) -> float:
    """√max(0, x), NaN kept (so check_finite=False propagates NaN inputs)."""
    return square if math.isnan(square) else math.sqrt(max(0.0, square))


def _norms(gram: list[list[float]]) -> list[float]:
    return [_root(gram[i][i]) for i in range(len(gram))]


def merge_slerp(group: Group, *, t: float) -> torch.Tensor:
    a = group.base
    (b,) = group.non_base
    if M.exact_path(group):
        return slerp_exact(a, b, t).to(group.out_dtype)
    gram = _gram(group, [a, b], None)
    norm_a, norm_b = _norms(gram)
    norm_a = norm_a if norm_a > SLERP_EPS else 1.0
    norm_b = norm_b if norm_b > SLERP_EPS else 1.0
    cos_theta = min(1.0, max(-1.0, gram[0][1] / (norm_a * norm_b)))
    ca, cb = slerp_coefficients(t, cos_theta, abs(cos_theta) > DOT_THRESHOLD)
    return _combine(group, [a, b], [ca, cb], over_base=False)


def merge_nuslerp(group: Group, *, weight: list[float], nuslerp_row_wise: bool, nuslerp_flatten: bool) -> torch.Tensor:
    x0, x1 = group.non_base
    base = group.base
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    if not M.exact_path(group) and (nuslerp_flatten or x0.dim() <= 1):
        gram = _gram(group, [x0, x1], base)
        n0, n1 = (max(n, 1e-7) for n in _norms(gram))
        cos_theta = min(1.0, max(-1.0, gram[0][1] / (n0 * n1)))
        c0, c1 = slerp_coefficients(t, cos_theta, 1.0 - cos_theta * cos_theta <= SLERP_EPS ** 2)
        return _combine(group, [x0, x1], [c0, c1])
    # one SLERP per row (last dim) or per column (dim 0, nuslerp_row_wise), or over the flattened
    # tensor (the exact path), in the accumulation dtype
    if not group.grad:
        M.require_finite(group, M.any_nonfinite(group.tensors))
    acc = accum_dtype(x0.dtype)
    v0, v1 = (x0, x1) if base is None else (M.task_vector(x0, base), M.task_vector(x1, base))
    v0, v1 = v0.to(acc), v1.to(acc)
    if nuslerp_flatten or x0.dim() <= 1:
        v0, v1 = v0.reshape(1, -1), v1.reshape(1, -1)
    elif nuslerp_row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos_theta = (u0 * u1).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= SLERP_EPS ** 2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.where(colinear, 1, torch.sin(theta))
    c0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    c1 = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    result = c0 * v0 + c1 * v1
    if nuslerp_flatten or x0.dim() <= 1:
        result = result.reshape(x0.shape)
    elif nuslerp_row_wise:
        result = result.transpose(0, -1)
    if base is not None:
        result = result + base.to(acc)
    return result.to(group.out_dtype)


def merge_multislerp(group: Group, *, weight: list[float], normalize_weights: bool, eps: float) -> torch.Tensor:
    xs, base = group.non_base, group.base
    if len(xs) == 1:
        M.require_finite(group, M.any_nonfinite([t.detach() for t in group.tensors]))
        return xs[0].to(group.out_dtype)
    w = M.nonzero_sum_weights("multislerp", weight) if normalize_weights else list(weight)
    if M.exact_path(group):
        return multislerp_exact(group, w, eps)
    gram = _gram(group, xs, base)
    norms = _norms(gram)
    unit_coeffs = [wi / (n + eps) for wi, n in zip(w, norms)]
    mean_norm = _root(sum(ci * gij * cj for ci, row in zip(unit_coeffs, gram) for gij, cj in zip(row, unit_coeffs)))
    if mean_norm < eps:
        if len(xs) == 2:  # mergekit's fallback: the weighted sum of the (task) vectors
            return _combine(group, xs, w)
        raise ConfigError(f"multislerp{_where(group)}: the weighted mean of the unit vectors is zero "
                          f"(antipodal inputs whose weights cancel); use different weights")
    scale = sum(wi * n for wi, n in zip(w, norms)) / mean_norm
    return _combine(group, xs, [c * scale for c in unit_coeffs])


def _where(group: Group) -> str:
    return f" ({group.name})" if group.name else ""


def karcher_coefficients(gram: list[list[float]], alphas: list[float], max_iter: int, tol: float) -> list[float]:
    """Coefficients c of the Karcher mean m = Σ c_j u_j of unit vectors with Gram matrix G."""
    k = len(alphas)
    g = torch.tensor(gram, dtype=torch.float64)
    a = torch.tensor(alphas, dtype=torch.float64)
    quad = lambda v: float(v @ g @ v)  # noqa: E731  (‖Σ v_j u_j‖²)
    c = a.clone()
    mean_norm = math.sqrt(max(0.0, quad(c)))
    if mean_norm < tol:
        c = torch.zeros(k, dtype=torch.float64)
        c[0] = 1.0
    else:
        c = c / mean_norm
    eye = torch.eye(k, dtype=torch.float64)
    for _ in range(max_iter):
        dots = (g @ c).clamp(-1.0, 1.0)
        tangent = torch.zeros(k, dtype=torch.float64)
        for i in range(k):
            theta = math.acos(float(dots[i]))
            if theta < tol:
                continue
            tangent += alphas[i] * (theta / math.sin(theta)) * (eye[i] - dots[i] * c)
        tangent_norm = math.sqrt(max(0.0, quad(tangent)))
        if tangent_norm < tol:
            break
        c = math.cos(tangent_norm) * c + math.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = math.sqrt(max(0.0, quad(c)))
        if unit_norm > tol:
            c = c / unit_norm
    return c.tolist()


def merge_karcher(group: Group, *, max_iter: int, tol: float) -> torch.Tensor:
    xs = group.tensors
    if len(xs) == 1:
        M.require_finite(group, M.any_nonfinite([t.detach() for t in group.tensors]))
        return xs[0].to(group.out_dtype)
    if M.exact_path(group):
        return karcher_exact(xs, max_iter, tol).to(group.out_dtype)
    alphas = [1.0 / len(xs)] * len(xs)
    inner = _gram(group, xs, None)
    norms = _norms(inner)
    if any(math.isnan(n) for n in norms):  # NaN inputs merged with check_finite=False
        return torch.full_like(xs[0], math.nan, dtype=group.out_dtype)
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(xs[0], dtype=group.out_dtype)
    alpha_sum = sum(alphas[i] for i in valid)
    valid_alphas = [alphas[i] / alpha_sum for i in valid]
    gram = [[inner[i][j] / (norms[i] * norms[j]) for j in valid] for i in valid]
    c = karcher_coefficients(gram, valid_alphas, max_iter, tol)
    scale = sum(a * n for a, n in zip(alphas, norms))
    return _combine(group, [xs[i] for i in valid], [scale * cj / norms[i] for cj, i in zip(c, valid)],
                    over_base=False)


# ---------------------------------------------------------------- the exact (differentiable) paths
# Plain torch on the whole flattened tensors, in the accumulation dtype: autograd differentiates the
# same function as the Gram-matrix paths above, with mergekit's handling of its singular points
# (the linear branch of torch.where fed a safe angle, zero norms read as 1, vanishing tangents).


def _norm(v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(v)  # its derivative at 0 is 0 (torch), unlike √(v·v)


def slerp_exact(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """SLERP of a toward b over the flattened tensors, differentiable (collinear pairs: the lerp
    branch, the spherical branch fed θ = 0 so its derivative stays finite)."""
    acc = accum_dtype(a.dtype)
    x, y = a.reshape(-1).to(acc), b.reshape(-1).to(acc)
    norm_x, norm_y = _norm(x), _norm(y)
    norm_x = torch.where(norm_x > SLERP_EPS, norm_x, 1)
    norm_y = torch.where(norm_y > SLERP_EPS, norm_y, 1)
    cos_theta = ((x / norm_x) * (y / norm_y)).sum().clamp(-1, 1)
    colinear = cos_theta.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    ca = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    cb = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    return (ca * x + cb * y).reshape(a.shape)


def multislerp_exact(group: Group, w: list[float], eps: float) -> torch.Tensor:
    """y = b + (Σ w_i n_i) m/‖m‖, m = Σ w_i v_i/(n_i + ε), differentiable (see the module docstring)."""
    base = group.base
    acc = accum_dtype(group.tensors[0].dtype)
    vs = [(x if base is None else M.task_vector(x, base)).reshape(-1).to(acc) for x in group.non_base]
    norms = [_norm(v) for v in vs]
    mean = sum(wi * v / (n + eps) for wi, v, n in zip(w, vs, norms))
    mean_norm = _norm(mean)
    if float(mean_norm.detach()) < eps:
        if len(vs) != 2:
            raise ConfigError(f"multislerp{_where(group)}: the weighted mean of the unit vectors is zero "
                              f"(antipodal inputs whose weights cancel); use different weights")
        result = w[0] * vs[0] + w[1] * vs[1]
    else:
        result = mean / mean_norm * sum(wi * n for wi, n in zip(w, norms))
    result = result.reshape(group.non_base[0].shape)
    return (result if base is None else result + base.to(acc)).to(group.out_dtype)


def karcher_exact(xs: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """The uniform Karcher mean of mergekit's fixed-point iteration on the flattened inputs,
    differentiable: inputs with a norm ≤ tol are left out of the mean (all of them: the zero tensor,
    still connected to every input), steps whose angle or tangent is below tol are skipped."""
    acc = accum_dtype(xs[0].dtype)
    flats = [x.reshape(-1).to(acc) for x in xs]
    norms = [_norm(v) for v in flats]
    valid = [i for i, n in enumerate(norms) if float(n.detach()) > tol]
    if not valid:
        return sum(x * 0 for x in xs)
    alphas = [1.0 / len(xs)] * len(xs)
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    units = [flats[i] / norms[i] for i in valid]
    mean = sum(a * u for a, u in zip(weights, units))
    mean_norm = _norm(mean)
    mean = units[0] if float(mean_norm.detach()) < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(weights, units):
            dot = torch.dot(mean, u).clamp(-1.0, 1.0)
            theta = torch.acos(dot)
            if float(theta.detach()) < tol:
                continue
            tangent = tangent + a * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = _norm(tangent)
        if float(tangent_norm.detach()) < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = _norm(mean)
        if float(unit_norm.detach()) > tol:
            mean = mean / unit_norm
    scale = sum(a * n for a, n in zip(alphas, norms))
    return (scale * mean).reshape(xs[0].shape)


register(Method(
    name="slerp", merge=merge_slerp, differentiable=True,
    parameters=(Parameter("t", float, SHARED, doc="interpolation factor: 0 = base, 1 = the other input"),),
    base=BASE_REQUIRED, min_inputs=2, max_inputs=2,
    summary="spherical interpolation between the base and one model", reference="https://en.wikipedia.org/wiki/Slerp",
))
register(Method(
    name="nuslerp", merge=merge_nuslerp, differentiable=True,
    parameters=(
        Parameter("weight", float, NON_BASE, doc="w_i; t = w₂/(w₁+w₂)"),
        Parameter("nuslerp_row_wise", bool, SHARED, default=False, doc="SLERP each column (dim 0)"),
        Parameter("nuslerp_flatten", bool, SHARED, default=True, doc="SLERP the whole tensor"),
    ),
    base=BASE_OPTIONAL, min_non_base=2, max_non_base=2,
    summary="SLERP of two models or of their task vectors",
))
register(Method(
    name="multislerp", merge=merge_multislerp, differentiable=True,
    parameters=(
        Parameter("weight", float, NON_BASE, doc="w_i"),
        Parameter("normalize_weights", bool, SHARED, default=True, doc="divide the weights by their sum"),
        Parameter("eps", float, SHARED, default=1e-8, low=0.0, low_open=True, doc="ε for norms"),
    ),
    base=BASE_OPTIONAL, min_non_base=1,
    summary="barycentric interpolation on the hypersphere",
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
))
register(Method(
    name="karcher", merge=merge_karcher, differentiable=True,
    parameters=(
        Parameter("max_iter", int, SHARED, default=10, low=0, doc="iterations at most"),
        Parameter("tol", float, SHARED, default=1e-5, low=0.0, doc="convergence tolerance"),
    ),
    summary="Karcher (Riemannian) mean on the hypersphere", reference="https://arxiv.org/abs/2603.04972",
))
