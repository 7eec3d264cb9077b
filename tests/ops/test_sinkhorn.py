"""sinkhorn: every backend against the torch reference, the reference against POT's ot.sinkhorn_log,
batching and ε-scaling identities, edge cases and errors."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fusion_engine as fe
from fusion_engine.errors import ConfigError, ShapeMismatchError
from fusion_engine.ops import SinkhornResult, sinkhorn
from fusion_engine.ops.sinkhorn import sinkhorn_reference
from utils import InputGuard, assert_verbose_allclose, device_for, skip_unless_dtype

OP = "sinkhorn"

# (atol, rtol) between two computations of the same iterations, per working dtype
PLAN_TOL = {torch.float32: (2e-6, 1e-4), torch.float64: (1e-13, 1e-9)}
POTENTIAL_TOL = {torch.float32: (2e-5, 1e-4), torch.float64: (1e-11, 1e-9)}


def work_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def histogram(gen, shape, zeros: bool, dtype=torch.float64):
    h = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.05
    if zeros and shape[-1] > 1:
        h[..., 0] = 0.0
    return (h / h.sum(-1, keepdim=True)).to(dtype)


def problem(B, n, m, *, seed=0, dtype=torch.float64, uniform=False, zeros=False, scale=1.0):
    """A random cost in [0, scale) ([n, m] when B is None) and histograms (None when uniform)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n, m) if B is None else (B, n, m)
    cost = (scale * torch.rand(shape, generator=gen, dtype=torch.float64)).to(dtype)
    if uniform:
        return cost, None, None
    a = histogram(gen, shape[:-1], zeros)
    b = histogram(gen, shape[:-2] + (m,), False)
    return cost, a, b


def assert_results_close(actual: SinkhornResult, expected: SinkhornResult, dtype, what=""):
    atol, rtol = PLAN_TOL[dtype]
    assert_verbose_allclose(actual.plan, expected.plan, atol, rtol, what=f"{what} plan")
    atol, rtol = POTENTIAL_TOL[dtype]
    assert_verbose_allclose(actual.f, expected.f, atol, rtol, what=f"{what} f")
    assert_verbose_allclose(actual.g, expected.g, atol, rtol, what=f"{what} g")


def on(device, *tensors):
    return [t.to(device) if t is not None else None for t in tensors]


# ---------------------------------------------------------------------------------------------
# backends against the reference


@given(data=st.data())
def test_matches_reference(backend, data):
    """Random batched / rectangular / non-uniform problems, every input dtype the backend takes, a
    non-contiguous cost; tol = 0 runs exactly max_iter iterations, so every backend does the same
    arithmetic as the reference."""
    small = backend == "triton" and device_for(backend).type == "cpu"   # the interpreter is slow
    dtype = data.draw(st.sampled_from([d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
                                       if d in fe._dispatch.BACKEND_DTYPES[backend]]), label="dtype")
    B = data.draw(st.sampled_from([None, 1, 3]), label="B")
    n = data.draw(st.integers(1, 9 if small else 40), label="n")
    m = data.draw(st.integers(1, 9 if small else 40), label="m")
    reg = data.draw(st.sampled_from([1.0, 0.1, 0.02]), label="reg")
    uniform = data.draw(st.booleans(), label="uniform")
    zeros = data.draw(st.booleans(), label="zeros")
    transposed = data.draw(st.booleans(), label="transposed")
    max_iter = data.draw(st.integers(1, 6 if small else 40), label="max_iter")
    check_every = data.draw(st.sampled_from([1, 3, 10]), label="check_every")
    cost, a, b = problem(B, m if transposed else n, n if transposed else m, seed=data.draw(st.integers(0, 99)),
                         dtype=dtype, uniform=uniform, zeros=zeros)
    if transposed:  # a non-contiguous view; the histograms follow the transposed problem
        cost = cost.transpose(-1, -2)
        a, b = b, a
    device = device_for(backend)
    cost, a, b = on(device, cost, a, b)
    kw = dict(reg=reg, max_iter=max_iter, tol=0.0, check_every=check_every)
    guard = InputGuard([(name, t) for name, t in (("cost", cost), ("a", a), ("b", b)) if t is not None])
    got = sinkhorn(cost, a, b, backend=backend, **kw)
    guard.check()
    want = sinkhorn(cost, a, b, backend="torch", **kw)
    wd = work_dtype(dtype)
    assert got.plan.dtype == wd and got.f.dtype == wd and got.err.dtype == wd
    assert got.plan.shape == cost.shape and got.n_iter.dtype == torch.int64
    assert torch.equal(got.n_iter.cpu(), torch.full_like(got.n_iter, max_iter).cpu())
    assert_results_close(got, want, wd, backend)
    atol, rtol = PLAN_TOL[wd]
    assert_verbose_allclose(got.err, want.err, 10 * atol, 1e-3, what="err")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_per_problem_convergence(backend, dtype):
    """A batch of problems converging after different counts: each stops on its own (n_iter, err
    and potentials frozen), exactly as when solved alone."""
    skip_unless_dtype(backend, dtype)
    device = device_for(backend)
    cost, a, b = problem(3, 8, 6, seed=3, dtype=dtype)
    cost[1] *= 8.0  # harder: converges later
    cost, a, b = on(device, cost, a, b)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    kw = dict(reg=0.1, tol=tol, max_iter=300, check_every=4)
    batch = sinkhorn(cost, a, b, backend=backend, **kw)
    want = sinkhorn(cost, a, b, backend="torch", **kw)
    assert torch.equal(batch.n_iter.cpu(), want.n_iter.cpu())
    assert len(set(batch.n_iter.tolist())) > 1
    assert bool((batch.err < tol).all())
    assert_results_close(batch, want, dtype, backend)
    for q in range(3):
        alone = sinkhorn(cost[q], a[q], b[q], backend=backend, **kw)
        assert int(alone.n_iter) == int(batch.n_iter[q])
        if backend == "cpp":  # blocks depend on n only: bitwise the same with one or many threads
            assert torch.equal(alone.plan, batch.plan[q])
        else:
            assert_results_close(SinkhornResult(*(t[q] for t in batch)), alone, dtype, f"problem {q}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_small_reg_stays_finite(backend, dtype):
    """reg = 1e-3 with costs in [0, 1] (exp(-C/reg) underflows to 0 everywhere but the log domain
    copes): finite potentials, rows exact, and the same result as the reference."""
    skip_unless_dtype(backend, dtype)
    device = device_for(backend)
    cost, a, b = on(device, *problem(2, 9, 7, seed=5, dtype=dtype, zeros=True))
    kw = dict(reg=1e-3, tol=0.0, max_iter=8 if backend == "triton" else 60, check_every=5)
    got = sinkhorn(cost, a, b, backend=backend, **kw)
    assert bool(torch.isfinite(got.plan).all()) and bool(torch.isfinite(got.err).all())
    assert bool(torch.isfinite(got.g).all())
    assert bool(torch.isfinite(got.f[:, 1:]).all()) and bool((got.f[:, 0] == -float("inf")).all())  # a_0 = 0
    atol = 1e-6 if dtype == torch.float32 else 1e-12
    assert_verbose_allclose(got.plan.sum(-1), a.to(got.plan.dtype), atol, 1e-4, what="row marginals")
    want = sinkhorn(cost, a, b, backend="torch", **kw)
    assert_verbose_allclose(got.plan, want.plan, 1e-5 if dtype == torch.float32 else 1e-11, 1e-3, what="plan")


def test_cpp_threads_do_not_change_the_result():
    if not fe.backends()["cpp"].usable:
        pytest.skip("cpp backend unusable")
    cost, a, b = problem(1, 300, 250, seed=7)  # one problem big enough that its rows are split over threads
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sinkhorn(cost, a, b, reg=0.05, backend="cpp")
        torch.set_num_threads(max(2, threads))
        many = sinkhorn(cost, a, b, reg=0.05, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(one, many):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------
# against POT


@pytest.mark.parametrize("shape,reg,uniform", [((6, 9), 0.1, True), ((17, 11), 0.05, False), ((40, 40), 0.02, False),
                                               ((1, 5), 0.1, False), ((5, 1), 0.1, True)])
def test_matches_pot_sinkhorn_log(backend, shape, reg, uniform):
    """Plan, marginals, error and the iteration count agree with ot.bregman.sinkhorn_log."""
    ot_bregman = pytest.importorskip("ot.bregman")
    dtype = torch.float64 if backend != "triton" else torch.float32
    if backend == "triton" and device_for(backend).type == "cpu" and shape[0] * shape[1] > 200:
        pytest.skip("too large for the triton interpreter")
    cost, a, b = problem(None, *shape, seed=11, uniform=uniform)
    n, m = shape
    a_np = np.full(n, 1.0 / n) if a is None else a.numpy()
    b_np = np.full(m, 1.0 / m) if b is None else b.numpy()
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    plan, log = ot_bregman.sinkhorn_log(a_np, b_np, cost.numpy(), reg, numItermax=1000, stopThr=tol, log=True,
                                        warn=False)
    device = device_for(backend)
    got = sinkhorn(*on(device, cost.to(dtype), a, b), reg=reg, tol=tol, backend=backend)
    atol = 1e-12 if dtype == torch.float64 else 1e-6
    assert_verbose_allclose(got.plan, torch.from_numpy(plan), atol, 1e-6 if dtype == torch.float64 else 1e-3,
                            what="plan vs POT")
    assert_verbose_allclose(got.plan.sum(-2), torch.from_numpy(b_np), tol, 0, what="column marginals")
    assert_verbose_allclose(got.plan.sum(-1), torch.from_numpy(a_np), atol, 1e-9 if dtype == torch.float64 else 1e-5,
                            what="row marginals")
    if dtype == torch.float64:
        assert int(got.n_iter) == log["niter"] + 1
        assert abs(float(got.err) - float(log["err"][-1])) <= 1e-3 * float(log["err"][-1]) + 1e-15
        assert_verbose_allclose(got.f / reg, torch.from_numpy(log["log_u"]), 1e-9, 1e-9, what="log_u")


def test_reference_matches_pot_batched_and_non_uniform():
    """The batched reference equals POT run problem by problem (non-uniform a, b; zero entries)."""
    ot_bregman = pytest.importorskip("ot.bregman")
    cost, a, b = problem(3, 12, 7, seed=13, zeros=True)
    got = sinkhorn(cost, a, b, reg=0.05, backend="torch")
    for q in range(3):
        with np.errstate(divide="ignore"):
            plan, log = ot_bregman.sinkhorn_log(a[q].numpy(), b[q].numpy(), cost[q].numpy(), 0.05, stopThr=1e-9,
                                                log=True, warn=False)
        assert int(got.n_iter[q]) == log["niter"] + 1
        assert_verbose_allclose(got.plan[q], torch.from_numpy(plan), 1e-13, 1e-9, what=f"problem {q}")


# ---------------------------------------------------------------------------------------------
# ε-scaling


@pytest.mark.parametrize("backend_name", ["torch", "cpp"])
def test_eps_scaling_reaches_the_same_plan(backend_name):
    if not fe.backends()[backend_name].usable:
        pytest.skip(f"{backend_name} backend unusable")
    cost, a, b = problem(2, 12, 10, seed=17)
    kw = dict(reg=0.01, tol=1e-11, max_iter=5000, backend=backend_name)
    plain = sinkhorn(cost, a, b, **kw)
    scaled = sinkhorn(cost, a, b, eps_scaling=0.5, **kw)
    assert bool((scaled.err < 1e-11).all()) and bool((plain.err < 1e-11).all())
    assert bool((scaled.n_iter > 0).all())
    assert_verbose_allclose(scaled.plan, plain.plan, 1e-9, 1e-6, what="plan with ε-scaling")
    # potentials are unique up to f + c, g − c
    shift = (scaled.f - plain.f)[:, :1]
    assert_verbose_allclose(scaled.f - shift, plain.f, 1e-7, 1e-6, what="f")
    assert_verbose_allclose(scaled.g + shift, plain.g, 1e-7, 1e-6, what="g")


def test_eps_scaling_schedule():
    from fusion_engine.ops.sinkhorn import _reg_schedule

    cost = torch.tensor([[0.0, 2.0], [1.0, 0.5]])
    assert _reg_schedule(cost, 0.1, None) == [0.1]
    assert _reg_schedule(cost, 0.3, 0.5) == [2.0, 1.0, 0.5, 0.3]
    assert _reg_schedule(cost, 5.0, 0.5) == [5.0]  # reg above the cost's span: nothing to scale


# ---------------------------------------------------------------------------------------------
# shapes and dtypes


def test_shapes_and_broadcast_histograms():
    cost, a, b = problem(2, 5, 4, seed=19)
    r = sinkhorn(cost, a[0], b[0], reg=0.1)  # [n], [m] histograms shared by the batch
    assert r.plan.shape == (2, 5, 4) and r.f.shape == (2, 5) and r.g.shape == (2, 4)
    assert r.n_iter.shape == (2,) and r.err.shape == (2,)
    r1 = sinkhorn(cost[1], a[0], b[0], reg=0.1)
    assert r1.plan.shape == (5, 4) and r1.n_iter.shape == () and r1.err.shape == ()
    assert_verbose_allclose(r.plan[1], r1.plan, 1e-15, 1e-12)
    plan, f, g, n_iter, err = r1  # a named tuple
    assert torch.equal(plan, r1.plan)


def test_uniform_default_and_single_row_or_column(backend):
    device = device_for(backend)
    for n, m in ((1, 1), (1, 6), (6, 1)):
        cost = torch.rand(n, m, generator=torch.Generator().manual_seed(n * 10 + m)).to(device)
        r = sinkhorn(cost, reg=0.1, backend=backend, max_iter=20, tol=1e-5)
        expected = torch.full((n, m), 1.0 / (n * m))  # one row or column: the plan is forced
        assert_verbose_allclose(r.plan, expected, 1e-7, 1e-5, what=f"{n}x{m}")
        assert int(r.n_iter) == 1


def test_empty_batch(backend):
    device = device_for(backend)
    r = sinkhorn(torch.zeros(0, 3, 4, device=device), reg=0.1, backend=backend)
    assert r.plan.shape == (0, 3, 4) and r.f.shape == (0, 3) and r.g.shape == (0, 4)
    assert r.n_iter.shape == (0,) and r.err.shape == (0,)


def test_half_precision_costs_compute_in_fp32():
    cost, a, b = problem(2, 6, 5, seed=23, dtype=torch.float32)
    want = sinkhorn(cost.half().float(), a, b, reg=0.1, backend="torch")
    got = sinkhorn(cost.half(), a, b, reg=0.1)
    assert got.plan.dtype == torch.float32
    assert_verbose_allclose(got.plan, want.plan, *PLAN_TOL[torch.float32])


# ---------------------------------------------------------------------------------------------
# errors


def bad_call(exc, match, *args, **kw):
    kw.setdefault("reg", 0.1)
    with pytest.raises(exc, match=match):
        sinkhorn(*args, **kw)


def test_errors():
    cost, a, b = problem(None, 4, 3, seed=29)
    bad_call(fe.ConfigError, "reg", cost, reg=0.0)
    bad_call(fe.ConfigError, "reg", cost, reg=float("nan"))
    bad_call(fe.ConfigError, "max_iter", cost, max_iter=0)
    bad_call(fe.ConfigError, "check_every", cost, check_every=0)
    bad_call(fe.ConfigError, "tol", cost, tol=-1.0)
    bad_call(fe.ConfigError, "eps_scaling", cost, eps_scaling=1.5)
    bad_call(fe.ConfigError, "equal sums", cost, a, b * 2)
    bad_call(fe.ConfigError, "negative", cost, -a, b)
    bad_call(fe.ConfigError, "positive total mass", cost, torch.zeros(4, dtype=torch.float64), None)
    bad_call(fe.ShapeMismatchError, r"a has shape \(3,\)", cost, b, b)
    bad_call(fe.ShapeMismatchError, r"\[n, m\] or \[B, n, m\]", cost[0])
    bad_call(fe.ShapeMismatchError, "at least one row", torch.zeros(2, 0, 3))
    bad_call(fe.ShapeMismatchError, r"a has shape \(2, 4\)", cost, a.expand(2, 4), b)  # 2-D cost, batched a
    bad_call(fe.DTypeMismatchError, "dtype", cost.long())
    bad_call(fe.ConfigError, "not a torch.Tensor", cost.tolist())
    for value in (float("nan"), float("inf")):
        broken = cost.clone()
        broken[1, 2] = value
        bad_call(fe.NonFiniteError, "cost holds NaN or Inf", broken)
    bad_call(fe.NonFiniteError, "a holds NaN", cost, torch.full((4,), float("nan"), dtype=torch.float64), b)
    if fe.backends()["triton"].usable:
        bad_call(fe.BackendUnavailableError, "float64", cost, backend="triton")


def test_unequal_mass_within_tolerance_is_accepted():
    cost, a, b = problem(None, 4, 3, seed=31)
    r = sinkhorn(cost, a, b * (1 + 1e-7), reg=0.1)
    assert bool(torch.isfinite(r.plan).all())


# ---------------------------------------------------------------------------------------------
# gradients (implicit differentiation, any backend)


def test_gradient_matches_finite_differences(backend):
    """gradcheck of the plan in the cost and in mass-preserving changes of both histograms,
    batched, rectangular, at a converged fp64 plan (triton takes no fp64: fp32 vs fp64 reference)."""
    cost, a, b = problem(2, 4, 5, seed=41)
    weights = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(42), dtype=torch.float64)
    fp64 = torch.float64 in fe._dispatch.BACKEND_DTYPES[backend]
    if not fp64:
        grads = []
        for name, dt in ((backend, torch.float32), ("torch", torch.float64)):
            c = cost.to(dt).requires_grad_()
            (sinkhorn(c, a.to(dt), b.to(dt), reg=0.3, tol=1e-7, max_iter=5000, backend=name).plan
             * weights.to(dt)).sum().backward()
            grads.append(c.grad.double())
        assert_verbose_allclose(grads[0], grads[1], 1e-4, 1e-3, what="cost gradient, fp32 vs fp64")
        return

    def objective(c, a, b):
        plan = sinkhorn(c, a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True), reg=0.3, tol=1e-13,
                        max_iter=20000, backend=backend).plan
        return (plan * weights).sum()

    inputs = tuple(t.clone().requires_grad_() for t in (cost, a, b))
    assert torch.autograd.gradcheck(objective, inputs, atol=1e-6, rtol=1e-4)


def test_gradient_matches_unrolled_iterations():
    """The implicit gradient equals autograd through many unrolled log-domain iterations, for
    zero-mass rows as well, and a half-precision cost gets a gradient of its own dtype."""
    cost, a, b = problem(None, 6, 4, seed=43, zeros=True)
    weights = torch.randn(6, 4, generator=torch.Generator().manual_seed(44), dtype=torch.float64)
    c = cost.clone().requires_grad_()
    (sinkhorn(c, a, b, reg=0.2, tol=1e-14, max_iter=20000).plan * weights).sum().backward()
    u = torch.zeros(6, dtype=torch.float64)
    c2 = cost.clone().requires_grad_()
    v = torch.zeros(4, dtype=torch.float64)
    for _ in range(3000):  # log-domain iterations with autograd
        v = b.log() - torch.logsumexp(-c2 / 0.2 + u[:, None], 0)
        u = a.log() - torch.logsumexp(-c2 / 0.2 + v[None, :], 1)
    plan = torch.exp(-c2 / 0.2 + u[:, None] + v[None, :])
    (plan * weights).sum().backward()
    assert_verbose_allclose(c.grad, c2.grad, 1e-9, 1e-6, what="implicit vs unrolled")
    assert c.grad[0].abs().max() == 0  # the zero-mass row
    h = cost.half().requires_grad_()
    sinkhorn(h, reg=0.2).plan.sum().backward()
    assert h.grad.dtype == torch.float16


def test_no_graph_without_grad():
    cost, a, b = problem(None, 3, 3, seed=45)
    assert not sinkhorn(cost, a, b, reg=0.1).plan.requires_grad
    with torch.no_grad():
        assert not sinkhorn(cost.requires_grad_(), a, b, reg=0.1).plan.requires_grad


# ----------------------------------------------------------------------------------------------
# POT's other habits: the plain-domain method and warm starts


def _pot_problem(seed, n=7, m=5):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(n, m, generator=g, dtype=torch.float64)
    a = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(m, generator=g, dtype=torch.float64) + 0.1
    return cost, a / a.sum(), b / b.sum()


@pytest.mark.parametrize("reg", [1.0, 0.1, 0.03])
def test_plain_method_is_pots_sinkhorn_knopp(reg):
    ot = pytest.importorskip("ot")
    problems = [_pot_problem(seed) for seed in range(3)]
    batch = sinkhorn(torch.stack([p[0] for p in problems]), torch.stack([p[1] for p in problems]),
                     torch.stack([p[2] for p in problems]), reg=reg, tol=1e-9, method="sinkhorn")
    for i, (cost, a, b) in enumerate(problems):
        plan, log = ot.sinkhorn(a.numpy(), b.numpy(), cost.numpy(), reg, stopThr=1e-9, log=True)
        torch.testing.assert_close(batch.plan[i], torch.from_numpy(plan), rtol=1e-10, atol=1e-14)
        assert int(batch.n_iter[i]) == log["niter"] + 1
        one = sinkhorn(cost, a, b, reg=reg, tol=1e-9, method="sinkhorn")
        torch.testing.assert_close(one.plan, batch.plan[i])


def test_plain_method_stops_at_its_last_finite_iterate_like_pot():
    ot = pytest.importorskip("ot")
    cost, a, b = _pot_problem(4)
    cost = cost * 800.0                                # exp(-C/reg) underflows: POT's "numerical errors" exit
    with pytest.warns(UserWarning):
        plan, log = ot.sinkhorn(a.numpy(), b.numpy(), cost.numpy(), 1.0, stopThr=1e-12, log=True)
    r = sinkhorn(cost, a, b, reg=1.0, tol=1e-12, method="sinkhorn")
    assert bool(torch.isfinite(r.plan).all()) == bool(np.isfinite(plan).all())
    torch.testing.assert_close(r.plan, torch.from_numpy(plan), equal_nan=True)


@pytest.mark.parametrize("method", ["sinkhorn_log", "sinkhorn"])
def test_warmstart_is_pots(method):
    ot = pytest.importorskip("ot")
    cost, a, b = _pot_problem(5)
    log_u = torch.linspace(-0.5, 0.4, 7, dtype=torch.float64)
    log_v = torch.linspace(0.3, -0.2, 5, dtype=torch.float64)
    plan, log = ot.sinkhorn(a.numpy(), b.numpy(), cost.numpy(), 0.05, method=method, stopThr=1e-10, log=True,
                            warmstart=(log_u.numpy(), log_v.numpy()))
    r = sinkhorn(cost, a, b, reg=0.05, tol=1e-10, method=method, warmstart=(log_u, log_v))
    torch.testing.assert_close(r.plan, torch.from_numpy(plan), rtol=1e-9, atol=1e-13)
    assert int(r.n_iter) == log["niter"] + 1
    # restarting from a converged solve's potentials converges at once
    again = sinkhorn(cost, a, b, reg=0.05, tol=1e-10, method=method, warmstart=(r.f / 0.05, r.g / 0.05))
    assert int(again.n_iter) == 1
    torch.testing.assert_close(again.plan, r.plan, rtol=1e-8, atol=1e-12)


def test_method_and_warmstart_errors():
    cost, a, b = _pot_problem(0)
    with pytest.raises(ConfigError, match="method="):
        sinkhorn(cost, a, b, reg=0.1, method="greenkhorn")
    with pytest.raises(ConfigError, match="eps_scaling"):
        sinkhorn(cost, a, b, reg=0.1, method="sinkhorn", eps_scaling=0.5)
    with pytest.raises(ConfigError, match="pair"):
        sinkhorn(cost, a, b, reg=0.1, warmstart=torch.zeros(7))
    with pytest.raises(ShapeMismatchError, match=r"warmstart\[1\]"):
        sinkhorn(cost, a, b, reg=0.1, warmstart=(torch.zeros(7, dtype=torch.float64), torch.zeros(4)))


def test_plain_method_plan_is_differentiable():
    cost, a, b = _pot_problem(2, n=4, m=3)
    cost.requires_grad_(True)
    torch.autograd.gradcheck(lambda c: sinkhorn(c, a, b, reg=0.5, tol=1e-13, max_iter=5000, method="sinkhorn").plan,
                             (cost,), atol=1e-6)
