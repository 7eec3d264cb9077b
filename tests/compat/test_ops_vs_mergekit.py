"""mergekit compatibility: our ops with mergekit's parameters reproduce mergekit 0.1.5's methods
(``mergekit.merge_methods.api.merge_tensors``) on random fp32 tensors.

mergekit trims k = max(1, int(density · n)) for 0 < density < 1; we trim int(density · n), so sizes
here keep int(density · n) ≥ 1. Its dare methods draw a torch.bernoulli mask, so they are compared at
density 1 (deterministic), and their L1 rescale by its defining property.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fusion_engine.ops import dare_merge, linear_merge, task_arithmetic, ties_merge
from utils import assert_verbose_allclose, device_for, skip_unless_kernel

pytest.importorskip("mergekit")
from mergekit.merge_methods.api import merge_tensors  # noqa: E402

RTOL = 1e-5


def _inputs(seed, shape, k):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    xs = [base + torch.randn(shape, generator=gen) * (0.5 + i) for i in range(k)]
    return base, xs


def _close(ours, theirs, scale, what):
    assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == theirs.shape
    assert_verbose_allclose(ours.cpu(), theirs, 1e-6 * max(1.0, scale), RTOL, what=what)


def _scale(base, xs, weights, lam=1.0, extra=1.0):
    top = max(float(t.abs().max()) for t in [base, *xs])
    return top * (1 + 2 * abs(lam) * extra * sum(abs(w) for w in weights))


weights_st = lambda k: st.lists(  # noqa: E731
    st.one_of(st.floats(0.1, 2.0), st.floats(-1.0, -0.1)), min_size=k, max_size=k)
density_st = st.floats(0.05, 1.0)


@given(data=st.data())
def test_ties(backend, data):
    """mergekit "ties" = ties_merge's defaults (sign sum on weighted deltas, divisor Σ w·mask), with its
    normalize, lambda, per-model density and weight; ``rescale: true`` = rescale="l1"."""
    skip_unless_kernel("ties_merge", backend)
    if backend == "triton" and device_for(backend).type == "cpu":
        shape = data.draw(st.sampled_from([(37, 53), (1, 1000)]))
    else:
        shape = data.draw(st.sampled_from([(37, 53), (129, 257), (1, 1000)]))
    k = data.draw(st.sampled_from([1, 2, 3, 5]))
    base, xs = _inputs(data.draw(st.integers(0, 2**31 - 1)), shape, k)
    weights = data.draw(weights_st(k))
    per_model = data.draw(st.booleans())
    density = data.draw(st.lists(density_st, min_size=k, max_size=k)) if per_model else data.draw(density_st)
    normalize = data.draw(st.booleans())
    lam = data.draw(st.sampled_from([1.0, 0.5, 1.7]))
    rescale = data.draw(st.booleans())
    theirs = merge_tensors([base, *xs], "ties", base_index=0, parameters={
        "density": density, "weight": weights, "normalize": normalize, "lambda": lam, "rescale": rescale})
    device = device_for(backend)
    ours = ties_merge(base.to(device), [x.to(device) for x in xs], weights, density, normalize=normalize, lam=lam,
                      rescale="l1" if rescale else None, backend=backend)
    extra = (1 / min(density if per_model else [density])) if rescale else 1.0
    extra *= (1 / min(abs(w) for w in weights)) if normalize else 1.0
    _close(ours, theirs, _scale(base, xs, weights, lam, extra), f"ties vs mergekit (backend {backend})")


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_task_arithmetic(backend, k, normalize):
    """mergekit "task_arithmetic": b + λ Σ w_i δ_i (÷ Σ w_i with normalize: our weights divided by their sum)."""
    skip_unless_kernel("task_arithmetic", backend)
    base, xs = _inputs(k, (61, 67), k)
    weights = [0.7, -0.4, 1.3][:k]
    lam = 0.8
    theirs = merge_tensors([base, *xs], "task_arithmetic", base_index=0,
                           parameters={"weight": weights, "lambda": lam, "normalize": normalize})
    ours_w = [w / sum(weights) for w in weights] if normalize else weights
    device = device_for(backend)
    ours = task_arithmetic(base.to(device), [x.to(device) for x in xs], ours_w, lam=lam, backend=backend)
    _close(ours, theirs, _scale(base, xs, ours_w, lam), "task_arithmetic vs mergekit")


@pytest.mark.parametrize("normalize", [True, False])
def test_linear(backend, normalize):
    """mergekit "linear": Σ w_i x_i, divided by Σ w_i when normalize (its default, as ours)."""
    skip_unless_kernel("linear_merge", backend)
    _, xs = _inputs(7, (45, 77), 4)
    weights = [0.5, 2.0, -0.25, 1.0]
    theirs = merge_tensors(xs, "linear", parameters={"weight": weights, "normalize": normalize})
    device = device_for(backend)
    ours = linear_merge([x.to(device) for x in xs], weights, normalize=normalize, backend=backend)
    total = sum(weights) if normalize else 1.0
    _close(ours, theirs, _scale(xs[0], xs, [w / total for w in weights]), "linear vs mergekit")
    # mergekit's default is normalize=True, like ours
    default = merge_tensors(xs, "linear", parameters={"weight": weights})
    _close(linear_merge([x.to(device) for x in xs], weights, backend=backend), default, 10.0, "linear defaults")


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("method, consensus", [("dare_ties", "sum"), ("dare_linear", None)])
def test_dare_at_density_one(backend, method, consensus, normalize):
    """mergekit "dare_ties" / "dare_linear" (rescale: true by default) at density 1, where nothing is
    dropped: dare_merge(..., rescale="l1", consensus="sum" / None)."""
    skip_unless_kernel("dare_merge", backend)
    base, xs = _inputs(11, (53, 59), 3)
    weights = [1.0, 0.6, -0.3]
    theirs = merge_tensors([base, *xs], method, base_index=0,
                           parameters={"density": 1.0, "weight": weights, "normalize": normalize, "lambda": 1.3})
    device = device_for(backend)
    ours = dare_merge(base.to(device), [x.to(device) for x in xs], weights, 1.0, seed=0, rescale="l1",
                      consensus=consensus, normalize=normalize, lam=1.3, backend=backend)
    extra = (1 / 0.3) if normalize else 1.0
    _close(ours, theirs, _scale(base, xs, weights, 1.3, extra), f"{method} vs mergekit")


def test_dare_l1_rescale_preserves_the_norm(backend):
    """mergekit's ``rescale: true`` for DARE: the kept task vector has the L1 norm of the whole one."""
    skip_unless_kernel("dare_merge", backend)
    n = 4099 if backend == "triton" and device_for(backend).type == "cpu" else 100_003
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, generator=gen).to(device_for(backend))
    for density in (0.1, 0.5, 0.9):
        v = dare_merge(torch.zeros_like(x), [x], None, density, seed=5, rescale="l1", backend=backend)
        kept = float((v != 0).double().mean())
        assert abs(kept - density) < 0.05
        assert abs(float(v.double().abs().sum()) / float(x.double().abs().sum()) - 1.0) < 1e-5
