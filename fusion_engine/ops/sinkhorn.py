"""Entropic optimal transport by log-domain Sinkhorn iterations, batched (Cuturi, 2013).

.. math::  P^\\star = \\arg\\min_{P \\ge 0,\\ P 1 = a,\\ P^T 1 = b} \\langle P, C \\rangle - \\varepsilon H(P)

solved in the log domain like POT's ``ot.sinkhorn_log``; the plan is
:math:`P_{ij} = \\exp((f_i + g_j - C_{ij}) / \\varepsilon)`. The plan is differentiable in the cost and
the histograms by implicit differentiation of the optimality conditions (:class:`_ImplicitPlan`),
whichever backend computed it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._dispatch import cpp_launchers, register, resolve, triton_kernels
from . import _common as C

MARGINAL_SUM_RTOL = 1e-5  # |Σa − Σb| ≤ this · max(Σa, Σb), checked in float64
INTERMEDIATE_TOL = 1e-3   # ε-scaling: the stages before the last stop at err < max(tol, this · max‖b‖₂)


class SinkhornResult(NamedTuple):
    """What :func:`sinkhorn` returns (a named tuple: ``plan, f, g, n_iter, err = sinkhorn(...)``).

    plan : [B, n, m] or [n, m], P = exp((f_i + g_j − C_ij) / reg)
    f : [B, n] or [n], row dual potential (−inf where a_i = 0)
    g : [B, m] or [m], column dual potential (−inf where b_j = 0)
    n_iter : int64 [B] or scalar, Sinkhorn iterations performed (one iteration = a column then a row
        update; POT's ``log["niter"]`` is the 0-based index of the last one, i.e. n_iter − 1),
        summed over the stages when ``eps_scaling`` is used
    err : [B] or scalar, ‖Pᵀ1 − b‖₂ of the returned plan (the row marginals are exact after the
        last row update)
    """

    plan: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    n_iter: torch.Tensor
    err: torch.Tensor


METHODS = ("sinkhorn_log", "sinkhorn")


def sinkhorn(cost: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None, *, reg: float,
             max_iter: int = 1000, tol: float = 1e-9, check_every: int = 10, eps_scaling: float | None = None,
             method: str = "sinkhorn_log", warmstart: tuple[torch.Tensor, torch.Tensor] | None = None,
             backend: str | None = None) -> SinkhornResult:
    """Entropy-regularised optimal transport plan between histograms ``a`` and ``b``, batched.

    .. math::
        P^\\star = \\arg\\min_{P \\in U(a, b)} \\sum_{ij} C_{ij} P_{ij}
                   + \\varepsilon \\sum_{ij} P_{ij} (\\log P_{ij} - 1),
        \\qquad U(a, b) = \\{P \\ge 0 : P 1_m = a,\\ P^T 1_n = b\\}

    where ε = ``reg``. With u = f/ε and v = g/ε, each iteration updates (in POT's order)

    .. math::
        v_j \\leftarrow \\log b_j - \\mathrm{LSE}_i(u_i - C_{ij}/\\varepsilon), \\qquad
        u_i \\leftarrow \\log a_i - \\mathrm{LSE}_j(v_j - C_{ij}/\\varepsilon)

    starting from u = v = 0 (or ``warmstart``), so after each iteration the row marginals are exact. Every
    ``check_every`` iterations (after iterations 1, 1 + check_every, …, as POT's ``ii % 10 == 0``)
    the column-marginal violation err = ‖P^T 1 − b‖₂ is computed and a problem whose err < ``tol``
    stops (its potentials, n_iter and err are frozen; the others of the batch continue). Iteration
    counts and plans agree with ``ot.sinkhorn_log(a, b, cost, reg, numItermax=max_iter,
    stopThr=tol)`` (n_iter = POT's ``log["niter"]`` + 1).

    ε-scaling: ``eps_scaling = q`` in (0, 1) solves the problem for ε = s, s·q, s·q², … while above
    reg (s = max(C) − min(C) over the batch; no scaling when s ≤ reg), then for ε = reg. Each stage
    is warm-started from the previous stage's f, g (potentials are in cost units, so they carry
    over) and runs at most ``max_iter`` iterations; the intermediate stages stop once
    err < max(tol, 1e-3·max‖b‖₂), the last one at ``tol``: the result is the same plan as without
    scaling, within the tolerance. ``n_iter`` sums all stages. It saves iterations mostly at small
    reg with a moderate tol (the warm start skips the slow early phase); near convergence the
    iteration count is set by reg itself.

    Parameters
    ----------
    cost : [n, m] or [B, n, m] floating tensor C (any layout; fp16/bf16 are upcast to fp32)
    a : [n] or [B, n] non-negative source histogram, None for uniform 1/n
    b : [m] or [B, m] non-negative target histogram, None for uniform 1/m; Σa = Σb per problem
        (relative tolerance 1e-5)
    reg : ε > 0, in the units of the cost
    max_iter : at most this many iterations (≥ 1)
    tol : stop when ‖P^T 1 − b‖₂ < tol (≥ 0). In fp32 the error cannot go much below ~1e-7·‖b‖₁:
        use fp64 costs for tighter tolerances
    check_every : iterations between checks (≥ 1); POT uses 10
    eps_scaling : None, or the decay factor q in (0, 1) of ε-scaling (above)
    method : ``"sinkhorn_log"`` (the default: the log-domain updates above, stable for any reg) or
        ``"sinkhorn"``: POT's ``ot.sinkhorn`` default, plain-domain Sinkhorn–Knopp on K = exp(−C/ε),
        u ← a ⊘ (K v), v ← b ⊘ (Kᵀ u) from u = 1/n, v = 1/m (POT's order, checks and iteration count).
        It is faster per iteration but underflows for small reg: a problem whose scalings overflow or
        vanish stops at its last finite iterate, as POT does (``err`` says how far it got). Runs on the
        torch backend (any device), without ε-scaling.
    warmstart : None, or ``(log_u, log_v)`` [n], [m] (or [B, n], [B, m]): POT's ``warmstart``, the logarithms
        of the starting scaling vectors (f = ε·log_u, g = ε·log_v); e.g. the f / reg, g / reg of a previous
        solve of a nearby problem.
    backend : None (automatic), "cpp", "triton" or "torch"

    Returns
    -------
    :class:`SinkhornResult` (plan, f, g, n_iter, err), computed and returned in fp64 for fp64
    costs, fp32 otherwise; on the cost's device.

    Gradients: when grad mode is on and ``cost``, ``a`` or ``b`` requires grad, ``plan`` is
    differentiable with respect to them (any backend; the forward runs without a graph and the
    backward is :class:`_ImplicitPlan`, exact at a converged plan: use a small ``tol``). ``f``,
    ``g``, ``n_iter`` and ``err`` carry no gradient.

    Example
    -------
    >>> r = sinkhorn(torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64), reg=0.1)
    >>> r.plan.sum(0)
    tensor([0.5000, 0.5000], dtype=torch.float64)

    Reference: M. Cuturi, "Sinkhorn Distances: Lightspeed Computation of Optimal Transport",
    NeurIPS 2013; B. Schmitzer, "Stabilized sparse scaling algorithms for entropy regularized
    transport problems", SIAM J. Sci. Comput. 2019 (log domain, ε-scaling).
    """
    op = "sinkhorn"
    if not isinstance(cost, torch.Tensor):
        raise C.ConfigError(f"{op}: cost is a {type(cost).__name__}, not a torch.Tensor")
    if cost.dtype not in C.FLOAT_DTYPES:
        raise C.DTypeMismatchError(f"{op}: cost has dtype {cost.dtype}; use a floating dtype (.to(torch.float32))")
    if cost.dim() not in (2, 3):
        raise C.ShapeMismatchError(f"{op}: cost has shape {tuple(cost.shape)}; expected [n, m] or [B, n, m]")
    batched = cost.dim() == 3
    costs = cost if batched else cost.unsqueeze(0)
    B, n, m = costs.shape
    if B and (n == 0 or m == 0):
        raise C.ShapeMismatchError(f"{op}: cost has shape {tuple(cost.shape)}; each problem needs at least one "
                                   f"row and one column")
    _check_scalars(op, reg, max_iter, tol, check_every, eps_scaling)
    work_dtype = C.accum_dtype(cost.dtype)
    a_ = _histogram(op, "a", a, B, n, batched, cost.device, work_dtype)
    b_ = _histogram(op, "b", b, B, m, batched, cost.device, work_dtype)
    if B and not bool(torch.isfinite(costs).all()):
        raise C.NonFiniteError(f"{op}: cost holds NaN or Inf values; replace them (e.g. torch.nan_to_num) "
                               f"or mask those pairs with a large finite cost")
    _check_equal_mass(op, a_, b_)
    if method not in METHODS:
        raise C.ConfigError(f"{op}: method={method!r}; choose 'sinkhorn_log' (log domain) or 'sinkhorn' "
                            f"(plain-domain Sinkhorn-Knopp, POT's ot.sinkhorn default)")
    if method == "sinkhorn" and eps_scaling is not None:
        raise C.ConfigError(f"{op}: eps_scaling is for method='sinkhorn_log'; the plain domain underflows at "
                            f"the small ε it would reach")
    costs = costs.to(work_dtype).contiguous()
    fixed_cost, fixed_a, fixed_b = costs.detach(), a_.detach(), b_.detach()  # the kernels build no graph
    f, g = _starting_potentials(op, warmstart, B, n, m, batched, float(reg), cost.device, work_dtype)
    n_iter = torch.zeros(B, dtype=torch.int64, device=cost.device)
    if method == "sinkhorn":
        with torch.no_grad():
            _, kernel = resolve("sinkhorn_knopp", cost.device, cost.dtype, backend)
            plan, f, g, n_iter, err = kernel(fixed_cost, fixed_a, fixed_b, f, g, reg=float(reg),
                                             max_iter=int(max_iter), tol=float(tol), check_every=int(check_every))
        return _result(plan, f, g, n_iter, err, costs, a_, b_, float(reg), (cost, a, b), batched)
    _, kernel = resolve(op, cost.device, cost.dtype, backend)
    stages = _reg_schedule(fixed_cost, float(reg), eps_scaling)
    stage_tol = max(float(tol), INTERMEDIATE_TOL * float(torch.linalg.vector_norm(fixed_b, dim=1).max())) if B else 0.0
    with torch.no_grad():
        for k, eps in enumerate(stages):
            last = k == len(stages) - 1
            if B:
                plan, f, g, used, err = kernel(fixed_cost, fixed_a, fixed_b, f, g, reg=eps, max_iter=int(max_iter),
                                               tol=float(tol) if last else stage_tol, check_every=int(check_every),
                                               with_plan=last)
            else:
                plan, used = costs.clone(), n_iter
                err = torch.zeros(0, dtype=work_dtype, device=cost.device)
            n_iter = n_iter + used
    return _result(plan, f, g, n_iter, err, costs, a_, b_, float(reg), (cost, a, b), batched)


def _result(plan, f, g, n_iter, err, costs, a_, b_, reg: float, inputs, batched: bool) -> SinkhornResult:
    """The result, with the plan differentiable (:class:`_ImplicitPlan`) when an input requires grad."""
    if plan.shape[0] and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        plan = _ImplicitPlan.apply(costs, a_, b_, plan, reg)
    if not batched:
        return SinkhornResult(plan[0], f[0], g[0], n_iter[0], err[0])
    return SinkhornResult(plan, f, g, n_iter, err)


def _starting_potentials(op, warmstart, B, n, m, batched, reg, device, dtype):
    """f, g [B, n], [B, m] in cost units: zeros, or ε·(log_u, log_v) from POT-style ``warmstart``."""
    if warmstart is None:
        return (torch.zeros(B, n, dtype=dtype, device=device), torch.zeros(B, m, dtype=dtype, device=device))
    if not isinstance(warmstart, (tuple, list)) or len(warmstart) != 2:
        raise C.ConfigError(f"{op}: warmstart must be a pair (log_u, log_v) of tensors, as POT's warmstart")
    out = []
    for name, t, size in (("warmstart[0] (log_u)", warmstart[0], n), ("warmstart[1] (log_v)", warmstart[1], m)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise C.ConfigError(f"{op}: {name} must be a floating tensor")
        if t.device != device:
            raise C.DeviceMismatchError(f"{op}: {name} is on {t.device} but cost is on {device}; move it there")
        if t.dim() == 1 and t.shape[0] == size:
            t = t.unsqueeze(0).expand(B, size)
        elif not (batched and t.dim() == 2 and tuple(t.shape) == (B, size)):
            raise C.ShapeMismatchError(f"{op}: {name} has shape {tuple(t.shape)}; expected [{size}]"
                                       + (f" or [{B}, {size}]" if batched else ""))
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise C.NonFiniteError(f"{op}: {name} holds NaN or Inf values")
        out.append((reg * t.detach()).to(dtype).contiguous())
    return out[0], out[1]


class _ImplicitPlan(torch.autograd.Function):
    """Backward of the entropic plan by implicit differentiation (any backend's forward).

    At the optimum :math:`P_{ij} = e^{(f_i + g_j - C_{ij})/\\varepsilon}` with :math:`P1 = a,\\ P^T1 = b`.
    Differentiating, :math:`dP_{ij} = P_{ij}(df_i + dg_j - dC_{ij})/\\varepsilon`, and the marginal
    constraints give
    :math:`H\\,[df; dg] = [(P \\circ dC)1 + \\varepsilon\\,da;\\ (P \\circ dC)^T 1 + \\varepsilon\\,db]` with
    :math:`H = \\begin{pmatrix} \\mathrm{diag}(P1) & P \\\\ P^T & \\mathrm{diag}(P^T 1) \\end{pmatrix}`
    (symmetric, singular along :math:`v = [1; -1]`: the potentials' free constant). For an upstream
    gradient G, with :math:`Q = G \\circ P / \\varepsilon` and :math:`[x; y]` solving
    :math:`(H + v v^T)[x; y] = [Q 1; Q^T 1]` (the right side is orthogonal to v),

    .. math::  \\partial L/\\partial C = P \\circ (x 1^T + 1 y^T) - Q, \\qquad
               \\partial L/\\partial a = \\varepsilon x, \\qquad \\partial L/\\partial b = \\varepsilon y

    (the histogram gradients up to a constant, which mass-preserving changes do not see). One
    batched dense solve of size n + m per problem, O((n + m)³). Zero-mass rows/columns have zero
    plan entries and get zero gradient. A nearly hard plan whose support splits into several blocks
    (entries underflowed to 0) leaves one free constant per block; a ridge of machine ε × the largest
    marginal keeps the solve regular, and whatever constant it picks per block cancels in the gradient.

    Reference: Eisenberger, Toker, Leal-Taixé, Bernard & Cremers, "A Unified Framework for Implicit
    Sinkhorn Differentiation", CVPR 2022; Luise et al., "Differential Properties of Sinkhorn
    Approximation for Learning with Wasserstein Distance", NeurIPS 2018.
    """

    @staticmethod
    def forward(ctx, costs, a, b, plan, reg):
        ctx.save_for_backward(plan)
        ctx.reg = reg
        return plan

    @staticmethod
    def backward(ctx, grad):
        (plan,) = ctx.saved_tensors
        eps = ctx.reg
        B, n, m = plan.shape
        q = grad.to(plan.dtype) * plan / eps
        rows, cols = plan.sum(2), plan.sum(1)
        live = torch.cat([rows > 0, cols > 0], 1)
        v = torch.cat([torch.ones_like(rows), -torch.ones_like(cols)], 1) * live
        h = torch.zeros(B, n + m, n + m, dtype=plan.dtype, device=plan.device)
        h[:, :n, n:] = plan
        h[:, n:, :n] = plan.transpose(1, 2)
        h.diagonal(dim1=1, dim2=2).copy_(torch.where(live, torch.cat([rows, cols], 1), 1.0))
        h += v[:, :, None] * v[:, None, :]
        ridge = torch.finfo(plan.dtype).eps * h.diagonal(dim1=1, dim2=2).amax(1)
        h.diagonal(dim1=1, dim2=2).add_(ridge[:, None])
        z = torch.linalg.solve(h, torch.cat([q.sum(2), q.sum(1)], 1))
        x, y = z[:, :n], z[:, n:]
        grad_cost = plan * (x[:, :, None] + y[:, None, :]) - q
        grad_a = eps * x if ctx.needs_input_grad[1] else None
        grad_b = eps * y if ctx.needs_input_grad[2] else None
        return grad_cost, grad_a, grad_b, None, None


def _check_scalars(op, reg, max_iter, tol, check_every, eps_scaling) -> None:
    if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not (math.isfinite(reg) and reg > 0):
        raise C.ConfigError(f"{op}: reg={reg!r} must be a finite number > 0 (the entropic regularisation ε, "
                            f"in cost units)")
    for name, value in (("max_iter", max_iter), ("check_every", check_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise C.ConfigError(f"{op}: {name}={value!r} must be an integer >= 1")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0 or math.isinf(tol):
        raise C.ConfigError(f"{op}: tol={tol!r} must be a finite number >= 0")
    if eps_scaling is not None and (isinstance(eps_scaling, bool) or not isinstance(eps_scaling, (int, float))
                                    or not 0 < eps_scaling < 1):
        raise C.ConfigError(f"{op}: eps_scaling={eps_scaling!r} must be None or a decay factor in (0, 1) "
                            f"(e.g. 0.5 halves ε at each stage)")


def _histogram(op, name, h, B, size, batched, device, dtype) -> torch.Tensor:
    """The [B, size] histogram in the working dtype (uniform when None), validated."""
    if h is None:
        return torch.full((B, size), 1.0 / size if size else 0.0, dtype=dtype, device=device)
    if not isinstance(h, torch.Tensor):
        raise C.ConfigError(f"{op}: {name} is a {type(h).__name__}, not a torch.Tensor")
    if h.dtype not in C.FLOAT_DTYPES:
        raise C.DTypeMismatchError(f"{op}: {name} has dtype {h.dtype}; use a floating dtype")
    if h.device != device:
        raise C.DeviceMismatchError(f"{op}: {name} is on {h.device} but cost is on {device}; move it there")
    expected = f"[{size}]" + (f" or [{B}, {size}]" if batched else "")
    if h.dim() == 1 and h.shape[0] == size:
        h = h.unsqueeze(0).expand(B, size)
    elif not (batched and h.dim() == 2 and tuple(h.shape) == (B, size)):
        raise C.ShapeMismatchError(f"{op}: {name} has shape {tuple(h.shape)} but the cost needs {expected}")
    if h.numel() and not bool(torch.isfinite(h).all()):
        raise C.NonFiniteError(f"{op}: {name} holds NaN or Inf values")
    if h.numel() and bool((h < 0).any()):
        raise C.ConfigError(f"{op}: {name} has negative entries; histograms must be non-negative")
    return h.to(dtype).contiguous()


def _check_equal_mass(op, a, b) -> None:
    if not a.numel():
        return
    sa, sb = a.double().sum(1), b.double().sum(1)
    if bool((sa <= 0).any()) or bool((sb <= 0).any()):
        raise C.ConfigError(f"{op}: a and b must each have a positive total mass (a histogram of zeros has none)")
    gap = (sa - sb).abs() > MARGINAL_SUM_RTOL * torch.maximum(sa, sb)
    if bool(gap.any()):
        p = int(gap.nonzero()[0, 0])
        raise C.ConfigError(f"{op}: a and b must have equal sums (relative tolerance {MARGINAL_SUM_RTOL:g}); "
                            f"problem {p} has sum(a) = {float(sa[p]):.9g} and sum(b) = {float(sb[p]):.9g}: "
                            f"normalise both (a / a.sum(), b / b.sum())")


def _reg_schedule(costs: torch.Tensor, reg: float, eps_scaling: float | None) -> list[float]:
    """[reg] without ε-scaling; else s, s·q, s·q², … while above reg, then reg (s = the cost's span)."""
    if eps_scaling is None or not costs.numel():
        return [reg]
    eps = float(costs.max() - costs.min())
    stages = []
    while eps > reg:
        stages.append(eps)
        eps *= eps_scaling
    return stages + [reg]


def sinkhorn_reference(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, f: torch.Tensor, g: torch.Tensor, *,
                       reg: float, max_iter: int, tol: float, check_every: int, with_plan: bool):
    """Kernel-level oracle, written for clarity (it materialises [B, n, m] temporaries).

    cost [B, n, m], a/f [B, n], b/g [B, m], all contiguous in fp32 or fp64; f, g the starting
    potentials (not modified). Returns ``(plan or None, f, g, n_iter, err)``: the plan [B, n, m]
    (None unless ``with_plan``), the potentials, int64 iterations [B] and ‖P^T 1 − b‖₂ [B].
    """
    B = cost.shape[0]
    scaled = -cost / reg                                  # POT's Mr
    u, v = f / reg, g / reg
    log_a, log_b = a.log(), b.log()
    active = torch.ones(B, dtype=torch.bool, device=cost.device)
    n_iter = torch.zeros(B, dtype=torch.int64, device=cost.device)
    err = torch.full((B,), math.inf, dtype=cost.dtype, device=cost.device)

    def column_violation(u, v):
        plan = torch.exp(scaled + u[:, :, None] + v[:, None, :])
        return torch.linalg.vector_norm(plan.sum(1) - b, dim=1)

    for it in range(max_iter):
        v_new = log_b - torch.logsumexp(scaled + u[:, :, None], dim=1)
        u_new = log_a - torch.logsumexp(scaled + v_new[:, None, :], dim=2)
        v = torch.where(active[:, None], v_new, v)
        u = torch.where(active[:, None], u_new, u)
        n_iter += active
        if it % check_every == 0:
            e = column_violation(u, v)
            err = torch.where(active, e, err)
            active &= ~(e < tol)
            if not bool(active.any()):
                break
    err = torch.where(active, column_violation(u, v), err)  # the error of the plan returned
    plan = torch.exp(scaled + u[:, :, None] + v[:, None, :]) if with_plan else None
    return plan, reg * u, reg * v, n_iter, err


def sinkhorn_knopp_reference(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, f: torch.Tensor, g: torch.Tensor,
                             *, reg: float, max_iter: int, tol: float, check_every: int):
    """Plain-domain Sinkhorn–Knopp in POT's form (``ot.bregman.sinkhorn_knopp``), batched; each problem
    stops on its own. f, g are starting potentials (cost units): u = exp(f/ε), v = exp(g/ε), with POT's
    default u = 1/n, v = 1/m when both are zero. A problem whose update hits 0, NaN or Inf keeps its
    previous scalings and stops (POT's "numerical errors" exit). Returns ``(plan, f, g, n_iter, err)``."""
    B, n, m = cost.shape
    kernel = torch.exp(-cost / reg)
    cold = ~((f != 0).any(1) | (g != 0).any(1))
    u = torch.where(cold[:, None], torch.full_like(f, 1.0 / n), torch.exp(f / reg))
    v = torch.where(cold[:, None], torch.full_like(g, 1.0 / m), torch.exp(g / reg))
    active = torch.ones(B, dtype=torch.bool, device=cost.device)
    n_iter = torch.zeros(B, dtype=torch.int64, device=cost.device)
    err = torch.full((B,), math.inf, dtype=cost.dtype, device=cost.device)
    for it in range(max_iter):
        kt_u = torch.einsum("bij,bi->bj", kernel, u)
        v_new = b / kt_u
        u_new = 1.0 / torch.einsum("bij,bj->bi", kernel / a[:, :, None], v_new)
        broken = (kt_u == 0).any(1) | ~torch.isfinite(u_new).all(1) | ~torch.isfinite(v_new).all(1)
        step = active & ~broken
        u = torch.where(step[:, None], u_new, u)
        v = torch.where(step[:, None], v_new, v)
        n_iter += step
        active &= ~broken
        if it % check_every == 0:
            e = torch.linalg.vector_norm(torch.einsum("bi,bij,bj->bj", u, kernel, v) - b, dim=1)
            err = torch.where(step, e, err)
            active &= ~(e < tol)
        if not bool(active.any()):
            break
    plan = u[:, :, None] * kernel * v[:, None, :]
    err = torch.where(torch.isinf(err), torch.linalg.vector_norm(plan.sum(1) - b, dim=1), err)
    return plan, reg * torch.log(u), reg * torch.log(v), n_iter, err


register("sinkhorn_knopp", torch=sinkhorn_knopp_reference)
register("sinkhorn", torch=sinkhorn_reference,
         cpp=lambda: cpp_launchers().sinkhorn,
         triton=lambda: triton_kernels().sinkhorn.sinkhorn)
