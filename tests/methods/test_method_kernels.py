"""The methods' private fast paths against their plain definitions: the C++ inner-products kernel
(Gram matrices of slerp / nuslerp / multislerp / karcher / model_stock / sce), DELLA's one-sort keep
mask, arcee_fusion's selection-based quartiles, the one-read NaN/Inf check, and the cache-sized
elementwise steps (ram, nearswap, arcee_fusion) at sizes that cross several steps."""

import math

import pytest
import torch

import fusion_engine as fe
from fusion_engine._dispatch import backends
from fusion_engine.methods import _common as M
from fusion_engine.ops.inner_products import CHUNK, inner_products_reference
from fusion_engine.ops.nonfinite import any_nonfinite
from fusion_engine.methods.arcee_fusion import order_index, quartiles
from fusion_engine.methods.task_arithmetic import della_keep, della_keep_probability
from fusion_engine.ops.philox import random_words

needs_cpp = pytest.mark.skipif(not backends()["cpp"].usable, reason="fusion_engine._C not built")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _exact_gram(tensors, base):
    # with a base: the differences rounded to the inputs' dtype, like a stored task vector
    stacked = torch.stack([(t if base is None else t - base).double().reshape(-1) for t in tensors])
    return stacked @ stacked.T, stacked.abs()


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 31, 513, 40_003])
@pytest.mark.parametrize("with_base", [False, True])
def test_inner_products_kernel_matches_exact_gram(dtype, n, with_base):
    gen = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=gen).to(dtype) if with_base else None
    xs = [torch.randn(n, generator=gen).to(dtype) for _ in range(3)]
    gram, nonfinite = M.inner_products(xs, base)
    assert not nonfinite
    exact, magnitudes = _exact_gram(xs, base)
    # error bound: accumulation-dtype rounding relative to Σ|a_j b_j|
    eps = 1e-13 if dtype == torch.float64 else 1e-6
    bound = (magnitudes @ magnitudes.T) * eps + 1e-12
    assert ((torch.tensor(gram, dtype=torch.float64) - exact).abs() <= bound).all()
    reference, _ = inner_products_reference(xs, base)
    # the reference's chunk dot products run in the accumulation dtype in whatever order torch.dot (its BLAS,
    # its thread count) takes: the worst-case bound of a length-L sum, L·u·Σ|a_j b_j| (Higham, Thm 3.1)
    unit = 2.0 ** -53 if dtype == torch.float64 else 2.0 ** -24
    worst = (magnitudes @ magnitudes.T) * min(max(n, 1), CHUNK) * unit + 1e-12
    assert ((reference - exact).abs() <= worst).all()
    assert torch.equal(torch.tensor(gram, dtype=torch.float64), torch.tensor(gram, dtype=torch.float64).T)


@needs_cpp
def test_inner_products_independent_of_threads_and_reads_in_place():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(300_001, generator=gen)
    xs = [torch.randn(600_002, generator=gen)[::2] for _ in range(2)]  # non-contiguous
    copies = [x.clone() for x in xs]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = M.inner_products(xs, base)
        torch.set_num_threads(max(2, threads))
        many = M.inner_products(xs, base)
    finally:
        torch.set_num_threads(threads)
    assert one == many
    assert all(torch.equal(x, c) for x, c in zip(xs, copies))


@pytest.mark.parametrize("kernel", [None, "torch"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_inputs_are_flagged(kernel, bad):
    xs = [torch.randn(5000) for _ in range(2)]
    assert not M.inner_products(xs, backend=kernel)[1]
    xs[1][4321] = bad
    assert M.inner_products(xs, backend=kernel)[1]
    assert M.inner_products([xs[0]], xs[1], backend=kernel)[1]  # in the base
    assert any_nonfinite([xs[1]], backend=kernel) and not any_nonfinite([xs[0]], backend=kernel)
    huge = torch.full((10,), 3e38)  # finite, but its sum overflows
    assert not any_nonfinite([huge], backend=kernel)


@pytest.mark.parametrize("shape", [(7,), (3, 1), (5, 9), (4, 6, 3), (16, 257)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_della_keep_is_the_probability_threshold(shape, dtype):
    d = torch.randn(shape).to(dtype)
    d.view(-1)[::3] = 0.5  # ties: ranks by lowest index first
    for density, epsilon in [(0.4, 0.1), (0.5, 0.3)]:
        prob = della_keep_probability(d, density, epsilon).reshape(-1)
        words = random_words(d.numel(), seed=3, stream=5, model=1)
        expected = (words < torch.floor(prob * 4294967296.0).to(torch.int64)).reshape(shape)
        assert torch.equal(della_keep(d, density, epsilon, seed=3, stream=5, model=1), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 2, 7, 1001, 70_001])
def test_quartiles_are_exact_order_statistics(dtype, n):
    gen = torch.Generator().manual_seed(n)
    for values in (torch.rand(n, generator=gen), torch.randint(0, 5, (n,), generator=gen).float(),
                   torch.randn(n, generator=gen)):  # the last has negative entries: kthvalue path
        values = values.to(dtype)
        expected = [float(values.kthvalue(order_index(q, n) + 1).values) for q in (0.25, 0.5, 0.75)]
        assert quartiles(values) == expected


@pytest.mark.parametrize("method,params,count", [
    ("ram", {"epsilon": 0.005}, 4),
    ("ramplus_tl", {"epsilon": 0.005, "r": 0.5, "alpha": 0.4}, 4),
    ("nearswap", {"t": 0.01}, 2),
    ("arcee_fusion", {}, 2),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_stepwise_methods_match_whole_tensor_torch(method, params, count, dtype):
    """Sizes spanning several cache-sized steps (and a ragged last one) against the formulas
    written on whole tensors in fp32."""
    gen = torch.Generator().manual_seed(0)
    shape = (37, 2 * M.CACHE_CHUNK // 37 + 5)
    base = torch.randn(shape, generator=gen)
    xs = [torch.where(torch.rand(shape, generator=gen) < 0.5, base, base + 0.01 * torch.randn(shape, generator=gen))
          for _ in range(count - 1)]
    tensors = [t.to(dtype) for t in [base, *xs]]
    ours = fe.merge_tensors(tensors, method, parameters=params, base_index=0)
    b, others = tensors[0].float(), [t.float() for t in tensors[1:]]
    if method == "nearswap":
        w = (params["t"] / (b - others[0]).abs().clamp(min=1e-6)).clamp(0, 1)
        expected = w * others[0] + (1 - w) * b
    elif method == "arcee_fusion":  # mergekit's quantiles are exact below 1M entries
        api = pytest.importorskip("mergekit.merge_methods.api")
        expected = api.merge_tensors(tensors, method, parameters={}, base_index=0).float()
    else:
        deltas = [(x - b) for x in others]
        changed = [(d.to(dtype).abs() > params["epsilon"]) for d in deltas]
        counts = sum(c.int() for c in changed)
        lam = []
        for c in changed:
            unique = int((c & (counts == 1)).sum())
            rho = (int(c.sum()) - unique) / max(unique, params["epsilon"])
            lam.append(1 + params.get("r", 0.0) * min(max(rho, 0.0), params.get("alpha", 0.0)))
        expected = b.clone()
        for d, c, l in zip(deltas, changed, lam):
            factor = torch.where(counts == 1, l, 1 / counts.clamp(min=1).float())
            expected += d.to(dtype).float() * c * factor
    assert ours.dtype == dtype
    tol = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(ours.float(), expected.to(dtype).float(), atol=tol * 4, rtol=tol)
