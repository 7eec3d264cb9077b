"""tsv, iso_c, iso_cts and wudi against references written here from the papers' / FusionBench's
definitions (loops, zero-padded blocks, autograd: not the engine's batched closed forms), in fp64
to 1e-10 and fp32 to 1e-4 relative; parameters and errors of all the 2024–26 methods."""

import pytest
import torch

import fusion_engine as fe
from fusion_engine.errors import ConfigError
from fusion_engine.methods.subspace import common_space_size


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float):
    """max |actual − expected| ≤ tol · max |expected| (compared in float64)."""
    err = float((actual.double() - expected.double()).abs().max())
    scale = float(expected.double().abs().max())
    assert err <= tol * scale, f"max error {err:.3e} > {tol:g} × {scale:.3e}"


TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def models(shape, k=3, dtype=torch.float64, seed=0, spread=0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    xs = [base + spread * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(k)]
    return base.to(dtype), [x.to(dtype) for x in xs]


def polar(x):
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


# ------------------------------------------------------------------------------- references (fp64)


def tsv_reference(base, xs, lam):
    """FusionBench's compute_and_sum_svd_mem_reduction, rewritten: zero-padded m × k blocks."""
    b = base.double()
    taus = [x.double() - b for x in xs]
    if b.dim() != 2:
        return b + lam * sum(taus) / len(taus)
    m, n = b.shape
    k = min(m, n)
    r = k // len(taus)
    sum_u, sum_s, sum_v = torch.zeros(m, k, dtype=b.dtype), torch.zeros(k, dtype=b.dtype), torch.zeros(k, n, dtype=b.dtype)
    for i, tau in enumerate(taus):
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        sum_u[:, i * r:(i + 1) * r] = u[:, :r]
        sum_s[i * r:(i + 1) * r] = s[:r]
        sum_v[i * r:(i + 1) * r] = vh[:r]
    return b + lam * polar(sum_u) @ torch.diag(sum_s) @ polar(sum_v)


def iso_c_reference(base, xs, lam):
    b = base.double()
    total = sum(x.double() - b for x in xs)
    if b.dim() != 2:
        return b + lam * total / len(xs)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    return b + lam * u @ torch.diag(torch.full_like(s, float(s.mean()))) @ vh


def iso_cts_reference(base, xs, lam, fraction):
    """FusionBench's iso_cts, rewritten: the common block placed after the task blocks."""
    b = base.double()
    taus = [x.double() - b for x in xs]
    if b.dim() != 2:
        return b + lam * sum(taus) / len(taus)
    m, n = b.shape
    k, K = min(m, n), len(taus)
    c = int(k * fraction)
    c = k - round((k - c) / K) * K
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    uc, sc, vc = u[:, :c], s[:c], vh[:c]
    per = (k - c) // K
    cu, cs, cv = torch.zeros(m, k, dtype=b.dtype), torch.zeros(k, dtype=b.dtype), torch.zeros(k, n, dtype=b.dtype)
    for i, tau in enumerate(taus):
        ut, st, vt = torch.linalg.svd(tau - uc @ uc.T @ tau, full_matrices=False)
        cu[:, i * per:(i + 1) * per], cs[i * per:(i + 1) * per], cv[i * per:(i + 1) * per] = ut[:, :per], st[:per], vt[:per]
    cu[:, K * per:], cs[K * per:], cv[K * per:] = uc, sc, vc
    return b + lam * float(cs.mean()) * polar(cu) @ polar(cv)


def wudi_reference(base, xs, lam, iterations, lr):
    """The authors' loop: autograd of Σ ‖(τ_m − τ_i) τ_iᵀ‖² / ‖τ_i‖², torch's Adam."""
    b = base.double()
    tvs = torch.stack([x.double() - b for x in xs])
    if b.dim() != 2:
        return b + lam * tvs.mean(0)
    merged = torch.nn.Parameter(tvs.sum(0))
    opt = torch.optim.Adam([merged], lr=lr)
    norms = tvs.reshape(len(xs), -1).norm(dim=-1).square()
    for _ in range(iterations):
        with torch.enable_grad():
            loss = (torch.matmul(merged.unsqueeze(0) - tvs, tvs.transpose(1, 2)).square() / norms.view(-1, 1, 1)).sum()
            opt.zero_grad()
            loss.backward()
        opt.step()
    return b + lam * merged.detach()


CASES = {
    "tsv": (tsv_reference, {"lambda": 0.7}),
    "iso_c": (iso_c_reference, {"lambda": 1.3}),
    "iso_cts": (lambda b, xs, lam, common_space_fraction: iso_cts_reference(b, xs, lam, common_space_fraction),
                {"lambda": 0.9, "common_space_fraction": 0.6}),
    "wudi": (lambda b, xs, lam, iterations, lr: wudi_reference(b, xs, lam, iterations, lr),
             {"lambda": 0.8, "iterations": 40, "lr": 1e-3}),
}


def check_equals_reference(cases, method, dtype, shape, k):
    """merge_tensors(method) against cases[method] = (reference, parameters) on random inputs."""
    reference, params = cases[method]
    base, xs = models(shape, k, dtype)
    got = fe.merge_tensors([base, *xs], method, base_index=0, parameters=params)
    assert got.dtype == dtype and got.shape == base.shape
    assert_rel(got, reference(base, xs, *params.values()), TOL[dtype])


def check_defaults_and_base_position(cases, method, overrides=None):
    """The defaults equal the reference at the published values, wherever the base sits; inputs untouched."""
    overrides = overrides or {}
    base, xs = models((10, 6), 3)
    copies = [t.clone() for t in (base, *xs)]
    first = fe.merge_tensors([base, *xs], method, base_index=0, parameters=overrides)
    last = fe.merge_tensors([*xs, base], method, base_index=3, parameters=overrides)
    torch.testing.assert_close(first, last, rtol=1e-12, atol=1e-12)
    for t, c in zip((base, *xs), copies):
        assert torch.equal(t, c)
    defaults = {p.name: p.default for p in fe.methods.get(method).parameters} | overrides
    reference, params = cases[method]
    assert_rel(first, reference(base, xs, *[defaults[n] for n in params]), 1e-10)


@pytest.mark.parametrize("method", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape,k", [((24, 16), 3), ((12, 30), 4), ((9, 9), 2), ((17,), 3), ((2, 3, 4), 2)])
def test_equals_reference(method, dtype, shape, k):
    check_equals_reference(CASES, method, dtype, shape, k)


@pytest.mark.parametrize("method", list(CASES))
def test_defaults_base_position_and_inputs_untouched(method):
    check_defaults_and_base_position(CASES, method, {"iterations": 30} if method == "wudi" else None)


def test_published_defaults():
    spec = {m: {p.name: p.default for p in fe.methods.get(m).parameters} for m in CASES}
    assert spec == {"tsv": {"lambda": 1.0}, "iso_c": {"lambda": 1.0},
                    "iso_cts": {"lambda": 1.0, "common_space_fraction": 0.8},
                    "wudi": {"lambda": 1.0, "iterations": 300, "lr": 1e-5}}


def test_bf16_inputs_merge_in_fp32_and_round_once():
    base, xs = models((16, 12), 3, torch.bfloat16)
    got = fe.merge_tensors([base, *xs], "tsv", base_index=0)
    assert got.dtype == torch.bfloat16
    expected = tsv_reference(base.float(), [x.float() for x in xs], 1.0)
    torch.testing.assert_close(got.double(), expected.to(torch.bfloat16).double(), rtol=2 ** -7, atol=1e-2)


def test_tsv_more_tasks_than_directions_keeps_the_base():
    base, xs = models((2, 8), 3)  # k = 2 < K = 3: r = 0
    assert torch.equal(fe.merge_tensors([base, *xs], "tsv", base_index=0), base)


def test_tsv_one_task_reproduces_its_task_vector():
    base, (x,) = models((7, 5), 1)  # K = 1: all k triplets, polar factors of orthonormal U, V
    assert_rel(fe.merge_tensors([base, x], "tsv", base_index=0, parameters={"lambda": 1.0}), x, 1e-10)


def test_iso_cts_with_the_whole_space_common_is_iso_c():
    base, xs = models((14, 10), 3)
    cts = fe.merge_tensors([base, *xs], "iso_cts", base_index=0, parameters={"common_space_fraction": 1.0})
    assert_rel(cts, fe.merge_tensors([base, *xs], "iso_c", base_index=0), 1e-10)


@pytest.mark.parametrize("k,tasks,fraction,expected", [
    (768, 8, 0.8, 616),   # FusionBench's ViT-B: 614 → the task blocks take 152 = 19 × 8
    (16, 3, 0.6, 10),     # int(9.6) = 9, round(7/3) = 2 → 6 task directions
    (10, 4, 0.0, 2),      # round(2.5) = 2 (half to even)
    (7, 6, 0.3, 1),       # round(5/6) = 1 → 6 task directions
    (5, 6, 0.3, 5),       # round(4/6) = 1 would overshoot k = 5: rounded down to 0 task directions
])
def test_iso_cts_common_space_size(k, tasks, fraction, expected):
    assert common_space_size(k, tasks, fraction) == expected


def test_wudi_lowers_the_interference_loss():
    base, xs = models((20, 12), 3, seed=3)
    tvs = torch.stack([x - base for x in xs])
    norms = tvs.reshape(3, -1).norm(dim=-1).square()

    def loss(merged):
        return float((torch.matmul(merged - tvs, tvs.transpose(1, 2)).square() / norms.view(-1, 1, 1)).sum())

    start = loss(tvs.sum(0))
    merged = fe.merge_tensors([base, *xs], "wudi", base_index=0, parameters={"iterations": 200, "lr": 1e-2}) - base
    assert loss(merged) < 0.5 * start


def test_wudi_all_zero_task_vector_contributes_nothing():
    """Its loss term is 0/0 in the formula: skipped, so the merge is that of the other tasks."""
    base, xs = models((8, 6), 2)
    got = fe.merge_tensors([base, *xs, base.clone()], "wudi", base_index=0, parameters={"iterations": 10, "lr": 1e-3})
    assert_rel(got, wudi_reference(base, xs, 1.0, 10, 1e-3), 1e-10)


@pytest.mark.parametrize("method,params,name", [
    ("tsv", {"lambda": "x"}, "lambda"),
    ("iso_cts", {"common_space_fraction": 1.5}, "common_space_fraction"),
    ("iso_cts", {"common_space_fraction": -0.1}, "common_space_fraction"),
    ("wudi", {"iterations": -1}, "iterations"),
    ("wudi", {"iterations": 2.5}, "iterations"),
    ("wudi", {"lr": 0.0}, "lr"),
    ("iso_c", {"density": 0.5}, "density"),
    ("magmax", {"lambda": None}, "lambda"),
    ("consensus", {"k": -1}, "k"),
    ("consensus", {"k": 1.5}, "k"),
    ("consensus", {"tall_lambda": -0.1}, "tall_lambda"),
    ("pcb", {"ratio": 0.0}, "ratio"),
    ("pcb", {"ratio": 1.5}, "ratio"),
])
def test_bad_parameters_name_the_parameter(method, params, name):
    base, xs = models((4, 3), 2)
    with pytest.raises(ConfigError, match=name):
        fe.merge_tensors([base, *xs], method, base_index=0, parameters=params)


NEW_METHODS = [*CASES, "magmax", "consensus", "pcb"]


@pytest.mark.parametrize("method", NEW_METHODS)
def test_needs_a_base_and_a_task(method):
    base, xs = models((4, 3), 2)
    with pytest.raises(ConfigError, match="base"):
        fe.merge_tensors([base, *xs], method)
    with pytest.raises(ConfigError, match="non-base"):
        fe.merge_tensors([base], method, base_index=0)


@pytest.mark.parametrize("method", NEW_METHODS)
def test_nonfinite_inputs(method):
    base, xs = models((5, 4), 2)
    xs[1][2, 1] = float("nan")
    with pytest.raises(fe.errors.NonFiniteError, match="input.s. 2 hold"):
        fe.merge_tensors([base, *xs], method, base_index=0, ids=[0, 1, 2], parameters=None)
    out = fe.merge_tensors([base, *xs], method, base_index=0, check_finite=False)
    assert torch.isnan(out).any() or method in ("magmax", "consensus")  # a selection may drop the NaN
