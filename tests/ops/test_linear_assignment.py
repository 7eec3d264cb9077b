"""linear_assignment: every backend returns scipy.optimize.linear_sum_assignment's assignment, ties
included (the same algorithm, arithmetic and tie-breaking), and always its optimal cost.

Cases: random (uniform, wide-range, negative), rectangular both ways, many ties (small integer
costs), planted permutations (recovered exactly), maximize, batches, empty and 1 × 1 problems,
non-contiguous layouts, every input dtype, and the errors.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from fusion_engine.errors import BackendUnavailableError, ConfigError, NonFiniteError, ShapeMismatchError
from fusion_engine.ops import linear_assignment
from utils import DTYPE_IDS, FLOAT_DTYPES, InputGuard, with_layout

OP = "linear_assignment"

# the torch reference is a Python loop: it gets the small sizes, cpp gets larger ones too
MAX_SIDE = {"torch": 9, "cpp": 40}
KINDS = ("uniform", "ties", "wide", "negative")


def random_costs(gen: torch.Generator, shape, kind: str) -> torch.Tensor:
    if kind == "ties":
        return torch.randint(0, 4, shape, generator=gen).double()
    x = torch.rand(shape, generator=gen, dtype=torch.float64)
    if kind == "wide":
        return x * torch.pow(10.0, torch.rand(shape, generator=gen, dtype=torch.float64) * 8 - 4)
    if kind == "negative":
        return 100 * x - 50
    return x


def planted(n: int, d: int, noise: float, seed: int, batch: int | None = None):
    """Neuron-matching costs −A·Bᵀ with B = P·A + noise: the optimum is P⁻¹ (col_ind = argsort(P))."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch,) if batch else ()
    a = torch.randn(*shape, n, d, generator=gen, dtype=torch.float64)
    perm = torch.stack([torch.randperm(n, generator=gen) for _ in range(batch or 1)])
    perm = perm if batch else perm[0]
    b = torch.gather(a, -2, perm[..., None].expand(a.shape)) + noise * torch.randn(a.shape, generator=gen,
                                                                                    dtype=torch.float64)
    return -(a @ b.transpose(-1, -2)), perm


def scipy_total(cost: torch.Tensor, maximize: bool = False) -> float:
    values = cost.double().numpy()
    rows, cols = linear_sum_assignment(values, maximize=maximize)
    return float(values[rows, cols].sum())


def check_assignment(cost: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, maximize: bool = False,
                     what: str = "") -> None:
    """A valid scipy-shaped assignment of one problem whose total equals scipy's optimum."""
    n, m = cost.shape
    k = min(n, m)
    assert rows.dtype == torch.int64 and cols.dtype == torch.int64, what
    assert rows.device.type == "cpu" and cols.device.type == "cpu", what
    assert rows.shape == (k,) and cols.shape == (k,), f"{what}: shapes {rows.shape}, {cols.shape}, k={k}"
    if k == 0:
        return
    assert bool((rows[1:] > rows[:-1]).all()), f"{what}: row_ind not strictly ascending: {rows}"
    assert len(set(cols.tolist())) == k, f"{what}: a column is used twice: {cols}"
    assert 0 <= int(rows.min()) and int(rows.max()) < n and 0 <= int(cols.min()) and int(cols.max()) < m, what
    if n <= m:
        assert torch.equal(rows, torch.arange(n)), f"{what}: row_ind must be arange(n) when n <= m"
    ours = float(cost.double()[rows, cols].sum())
    best = scipy_total(cost, maximize)
    assert abs(ours - best) <= 1e-9 * max(1.0, abs(best)), f"{what}: total {ours!r} but scipy's optimum is {best!r}"


@given(data=st.data())
def test_random_problems_reach_scipy_optimum(backend, data):
    side = MAX_SIDE[backend]
    n = data.draw(st.integers(0, side), label="n")
    m = data.draw(st.integers(0, side), label="m")
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    layout = data.draw(st.sampled_from(("contiguous", "transposed", "strided", "offset")), label="layout")
    maximize = data.draw(st.booleans(), label="maximize")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    values = random_costs(torch.Generator().manual_seed(seed), (n, m), kind).to(dtype)
    cost = with_layout(values, layout)
    guard = InputGuard([("cost", cost)])
    rows, cols = linear_assignment(cost, maximize=maximize, backend=backend)
    guard.check()
    check_assignment(values, rows, cols, maximize, f"{backend} {kind} {DTYPE_IDS[dtype]} {layout} {n}x{m}")
    if kind in ("uniform", "wide", "negative") and dtype == torch.float64:  # the optimum is unique
        expected = linear_sum_assignment(values.numpy(), maximize=maximize)
        assert rows.tolist() == expected[0].tolist() and cols.tolist() == expected[1].tolist()


@pytest.mark.parametrize("shape", [(7, 7), (3, 9), (9, 3), (1, 1), (1, 6), (6, 1)])
@pytest.mark.parametrize("kind", KINDS)
def test_small_shapes(backend, shape, kind):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{shape} {kind}".encode()))
    for maximize in (False, True):
        cost = random_costs(gen, shape, kind)
        rows, cols = linear_assignment(cost, maximize=maximize, backend=backend)
        check_assignment(cost, rows, cols, maximize, f"{shape} {kind} maximize={maximize}")


@pytest.mark.parametrize("shape", [(120, 120), (60, 200), (200, 60), (257, 256)])
@pytest.mark.parametrize("kind", KINDS)
def test_larger_problems_cpp(shape, kind):
    cost = random_costs(torch.Generator().manual_seed(7), shape, kind)
    for maximize in (False, True):
        rows, cols = linear_assignment(cost, maximize=maximize, backend="cpp")
        check_assignment(cost, rows, cols, maximize, f"{shape} {kind} maximize={maximize}")


@pytest.mark.parametrize("high", [1, 2, 10])
def test_heavy_ties(backend, high):
    """Integer costs in [0, high): most assignments tie (high=1: every one is optimal)."""
    side = MAX_SIDE[backend]
    gen = torch.Generator().manual_seed(high)
    for shape in ((side, side), (side // 2, side), (side, side // 2)):
        cost = torch.randint(0, high, shape, generator=gen).double()
        rows, cols = linear_assignment(cost, backend=backend)
        check_assignment(cost, rows, cols, what=f"ties < {high}, {shape}")


@pytest.mark.parametrize("noise", [0.1, 1.0, 3.0])
def test_planted_permutation(backend, noise):
    n = 12 if backend == "torch" else 200
    cost, perm = planted(n, 64, noise, seed=int(10 * noise))
    rows, cols = linear_assignment(cost, backend=backend)
    check_assignment(cost, rows, cols, what=f"planted, noise {noise}")
    if noise <= 1.0:  # the planted permutation is the optimum: recovered exactly
        assert torch.equal(cols, torch.argsort(perm))


def test_structured_matrices_cpp():
    n = 64
    i = torch.arange(n, dtype=torch.float64)
    cases = {
        "outer product": i[:, None] * i[None, :],                       # anti-diagonal optimum
        "absolute difference": (i[:, None] - i[None, :]).abs(),         # identity optimum
        "constant": torch.full((n, n), 3.5, dtype=torch.float64),
        "block": torch.kron(torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64), torch.ones(n // 2, n // 2)),
        "huge range": torch.where((i[:, None] + i[None, :]) % 3 == 0, 1e12, 1e-6),
    }
    for name, cost in cases.items():
        rows, cols = linear_assignment(cost, backend="cpp")
        check_assignment(cost, rows, cols, what=name)
    rows, cols = linear_assignment(cases["absolute difference"], backend="cpp")
    assert torch.equal(cols, torch.arange(n))


def test_batch_matches_each_problem(backend):
    side = MAX_SIDE[backend]
    gen = torch.Generator().manual_seed(3)
    for n, m in ((side, side), (side // 2, side), (side, side // 3)):
        batch = torch.stack([random_costs(gen, (n, m), kind) for kind in KINDS * 2])
        rows, cols = linear_assignment(batch, backend=backend)
        k = min(n, m)
        assert rows.shape == (len(batch), k) and cols.shape == (len(batch), k)
        for b in range(len(batch)):
            check_assignment(batch[b], rows[b], cols[b], what=f"problem {b} of {tuple(batch.shape)}")
            one = linear_assignment(batch[b], backend=backend)
            assert torch.equal(one[0], rows[b]) and torch.equal(one[1], cols[b])


def test_batch_layouts_cpp():
    """Transposed, strided and broadcast (batch stride 0) batches give the contiguous batch's answer."""
    gen = torch.Generator().manual_seed(11)
    values = torch.rand(4, 30, 45, generator=gen, dtype=torch.float64)
    for layout in ("transposed", "strided", "offset", "broadcast"):
        cost = with_layout(values, layout)
        expected = linear_assignment(cost.contiguous(), backend="cpp")
        rows, cols = linear_assignment(cost, backend="cpp")
        assert torch.equal(rows, expected[0]) and torch.equal(cols, expected[1]), layout
    planted_batch, perms = planted(50, 16, 0.1, seed=2, batch=3)
    rows, cols = linear_assignment(planted_batch.transpose(1, 2).contiguous().transpose(1, 2), backend="cpp")
    assert torch.equal(cols, torch.argsort(perms, dim=1))


def test_same_answer_for_any_thread_count():
    cost, _ = planted(150, 32, 3.0, seed=5, batch=6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = linear_assignment(cost, backend="cpp")
        torch.set_num_threads(max(2, threads))
        many = linear_assignment(cost, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def tie_heavy(gen: torch.Generator, n: int, m: int, kind: int) -> torch.Tensor:
    """Costs with many optimal assignments, of the kinds that reach each path of the cpp solver:
    whole numbers (scipy's order straight away), fractions (Jonker–Volgenant, then the certificate
    finds the ties), a constant matrix, bf16-rounded products, and continuous costs (no ties)."""
    if kind == 0:
        return torch.randint(0, 3, (n, m), generator=gen).double()
    if kind == 1:
        return torch.randint(0, 5, (n, m), generator=gen).double() / 8 + 0.01
    if kind == 2:
        return torch.full((n, m), 2.5, dtype=torch.float64)
    if kind == 3:
        a, b = torch.randn(n, 4, generator=gen), torch.randn(m, 4, generator=gen)
        return (a @ b.T).bfloat16().double()
    return torch.rand(n, m, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("maximize", [False, True])
def test_same_assignment_as_scipy_ties_included(backend, maximize):
    """The very pairs scipy returns, not just an optimal set, on every backend (for instance the
    identity on a constant matrix), square and rectangular both ways, with forbidden pairs too."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{backend}{maximize}".encode()))
    side = MAX_SIDE[backend]
    for trial in range(60):
        n, m = (int(x) for x in torch.randint(1, side + 1, (2,), generator=gen))
        cost = tie_heavy(gen, n, m, trial % 5)
        if trial % 7 == 6:
            cost[torch.rand(n, m, generator=gen) < 0.2] = float("-inf") if maximize else float("inf")
        try:
            expected = linear_sum_assignment(cost.numpy(), maximize=maximize)
        except ValueError:
            with pytest.raises(ConfigError, match="infeasible"):
                linear_assignment(cost, maximize=maximize, backend=backend)
            continue
        rows, cols = linear_assignment(cost, maximize=maximize, backend=backend)
        what = f"trial {trial}, kind {trial % 5}, {n}x{m}"
        assert rows.tolist() == expected[0].tolist() and cols.tolist() == expected[1].tolist(), what
    rows, cols = linear_assignment(torch.ones(side, side), maximize=maximize, backend=backend)
    assert torch.equal(cols, torch.arange(side))


def test_same_assignment_as_scipy_large_cpp():
    """Sizes where the cpp solver runs Jonker–Volgenant and certifies (or not) that its optimum is the
    only one: the result is scipy's either way."""
    gen = torch.Generator().manual_seed(3)
    for kind in range(5):
        for n, m in ((150, 150), (90, 160), (170, 60)):
            cost = tie_heavy(gen, n, m, kind)
            expected = linear_sum_assignment(cost.numpy())
            rows, cols = linear_assignment(cost, backend="cpp")
            assert cols.tolist() == expected[1].tolist() and rows.tolist() == expected[0].tolist(), (kind, n, m)


def test_backends_agree_where_optimum_unique(backend):
    gen = torch.Generator().manual_seed(21)
    cost = torch.rand(3, 8, 11, generator=gen, dtype=torch.float64)
    for maximize in (False, True):
        rows, cols = linear_assignment(cost, maximize=maximize, backend=backend)
        ref = linear_assignment(cost, maximize=maximize, backend="torch")
        assert torch.equal(rows, ref[0]) and torch.equal(cols, ref[1])


@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (5, 0), (0, 3, 4), (2, 0, 4), (2, 4, 0), (3, 1, 1)])
def test_empty_and_tiny(backend, shape):
    cost = torch.rand(shape, dtype=torch.float64)
    rows, cols = linear_assignment(cost, backend=backend)
    k = min(shape[-2], shape[-1])
    assert rows.shape == (*shape[:-2], k) and cols.shape == rows.shape
    assert rows.dtype == torch.int64 and cols.dtype == torch.int64
    if rows.numel():
        assert (rows == 0).all() and (cols == 0).all()


def test_integer_and_bool_costs(backend):
    cost = torch.tensor([[3, 1, 2], [2, 0, 5], [3, 2, 2]])
    rows, cols = linear_assignment(cost, backend=backend)
    check_assignment(cost.double(), rows, cols)
    allowed = torch.tensor([[True, False], [False, True], [True, True]])
    rows, cols = linear_assignment(allowed, maximize=True, backend=backend)
    assert int(allowed[rows, cols].sum()) == 2


def test_low_precision_costs_use_their_values(backend):
    """fp16/bf16 costs are solved exactly on the values they hold."""
    side = MAX_SIDE[backend]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        cost = (100 * torch.rand(side, side, generator=torch.Generator().manual_seed(1))).to(dtype)
        rows, cols = linear_assignment(cost, backend=backend)
        check_assignment(cost.double(), rows, cols, what=str(dtype))


@pytest.mark.parametrize("maximize", [False, True])
def test_invalid_costs_raise_like_scipy(backend, maximize):
    """NaN, and −inf when minimising (+inf when maximising), are invalid: scipy's ValueError and wording."""
    for bad in (float("nan"), float("-inf") if not maximize else float("inf")):
        cost = torch.rand(4, 5, 5, dtype=torch.float64)
        cost[2, 1, 3] = bad
        with pytest.raises(NonFiniteError, match=r"cost\[2\]: matrix contains invalid numeric entries"):
            linear_assignment(cost, maximize=maximize, backend=backend)
        with pytest.raises(ValueError, match="matrix contains invalid numeric entries"):
            linear_assignment(cost[2].float(), maximize=maximize, backend=backend)
        with pytest.raises(ValueError, match="matrix contains invalid numeric entries"):
            linear_sum_assignment(cost[2].numpy(), maximize=maximize)


@pytest.mark.parametrize("maximize", [False, True])
def test_infinite_costs_forbid_pairs_as_in_scipy(backend, maximize):
    """+inf (−inf when maximising) forbids a pair: the same optimum as scipy, or scipy's infeasible error."""
    forbid = float("-inf") if maximize else float("inf")
    gen = torch.Generator().manual_seed(0)
    feasible = infeasible = 0
    for trial in range(60):
        n, m = (5, 7) if trial % 3 else (6, 4)
        cost = torch.rand(n, m, generator=gen, dtype=torch.float64) * 10
        cost[torch.rand(n, m, generator=gen) < (0.4 if trial % 2 else 0.75)] = forbid
        try:
            expected = linear_sum_assignment(cost.numpy(), maximize=maximize)
        except ValueError as exc:
            assert "infeasible" in str(exc)
            with pytest.raises(ConfigError, match="cost matrix is infeasible"):
                linear_assignment(cost, maximize=maximize, backend=backend)
            infeasible += 1
            continue
        rows, cols = linear_assignment(cost, maximize=maximize, backend=backend)
        assert bool(torch.isfinite(cost[rows, cols]).all())
        assert rows.tolist() == expected[0].tolist() and cols.tolist() == expected[1].tolist()
        feasible += 1
    assert feasible > 5 and infeasible > 5
    batch = torch.rand(3, 4, 4, dtype=torch.float64)
    batch[1, 0, :] = forbid                   # row 0 of problem 1 has no allowed column
    with pytest.raises(ConfigError, match=r"infeasible: cost\[1\]"):
        linear_assignment(batch, maximize=maximize, backend=backend)
    batch[1, 0, 1] = 0.5
    before = batch.clone()
    rows, cols = linear_assignment(batch, maximize=maximize, backend=backend)
    assert torch.equal(batch, before)         # the input is never modified
    assert int(cols[1, 0]) == 1


def test_bad_arguments():
    with pytest.raises(ShapeMismatchError, match="expected a matrix"):
        linear_assignment(torch.rand(5))
    with pytest.raises(ShapeMismatchError):
        linear_assignment(torch.rand(2, 3, 4, 5))
    with pytest.raises(ConfigError, match="not a torch.Tensor"):
        linear_assignment([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(ConfigError, match="maximize"):
        linear_assignment(torch.rand(3, 3), maximize="yes")
    with pytest.raises(BackendUnavailableError, match="no triton kernel"):
        linear_assignment(torch.rand(3, 3), backend="triton")
    with pytest.raises(ConfigError, match="unknown backend"):
        linear_assignment(torch.rand(3, 3), backend="fortran")


def test_costs_beyond_the_solver_range_raise(backend):
    cost = torch.rand(3, 4, 4, dtype=torch.float64)
    cost[1, 2, 2] = -1e250
    with pytest.raises(ConfigError, match="rescale"):
        linear_assignment(cost, backend=backend)
    cost[1, 2, 2] = 1e150  # large but within range: solved exactly
    rows, cols = linear_assignment(cost, backend=backend)
    for b in range(3):
        check_assignment(cost[b], rows[b], cols[b])


@pytest.mark.gpu
def test_cuda_costs_are_solved_on_the_host():
    cost, perm = planted(300, 64, 0.5, seed=4, batch=2)
    rows, cols = linear_assignment(cost.float().cuda())
    assert rows.device.type == "cpu" and torch.equal(cols, torch.argsort(perm, dim=1))
