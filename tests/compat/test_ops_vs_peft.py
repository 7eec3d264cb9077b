"""PEFT compatibility: our ops reproduce ``peft.utils.merge_utils`` (the adapter-merging utilities):
TIES with sign election on unweighted task tensors and a count divisor, task arithmetic, magnitude
pruning, and DARE's Bernoulli(density) keep with 1/density rescale (compared statistically and at
density 1: PEFT draws its masks from torch.bernoulli)."""

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fusion_engine.ops import dare_merge, linear_merge, magnitude_mask, task_arithmetic, ties_merge
from utils import assert_verbose_allclose, device_for, skip_unless_kernel

pytest.importorskip("peft")
from peft.utils import merge_utils  # noqa: E402


def _task_tensors(seed, shape, k):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * (1 + i) for i in range(k)]


def _close(ours, theirs, scale, what):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert_verbose_allclose(ours.cpu(), theirs, 1e-6 * max(1.0, scale), 1e-5, what=what)


def _peft(fn, *args, **kw):
    with warnings.catch_warnings():  # PEFT warns that density >= 1 prunes nothing
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kw)


@given(data=st.data())
def test_ties(backend, data):
    """PEFT ``ties`` = ties_merge(base 0, sign="sum"/"count" for "total"/"frequency", sign_on="unweighted",
    divisor="count")."""
    skip_unless_kernel("ties_merge", backend)
    shape = data.draw(st.sampled_from([(33, 65), (1000,), (3, 7, 11)]))
    k = data.draw(st.integers(1, 4))
    tensors = _task_tensors(data.draw(st.integers(0, 2**31 - 1)), shape, k)
    weights = data.draw(st.lists(st.one_of(st.floats(0.1, 2.0), st.floats(-1.5, -0.1)), min_size=k, max_size=k))
    density = data.draw(st.sampled_from([0.0, 0.1, 0.5, 0.75, 1.0]))
    method = data.draw(st.sampled_from(["total", "frequency"]))
    theirs = _peft(merge_utils.ties, tensors, torch.tensor(weights), density, method)
    device = device_for(backend)
    ours = ties_merge(torch.zeros(shape, device=device), [t.to(device) for t in tensors], weights, density,
                      sign={"total": "sum", "frequency": "count"}[method], sign_on="unweighted", divisor="count",
                      backend=backend)
    scale = max(float(t.abs().max()) for t in tensors) * sum(abs(w) for w in weights)
    _close(ours, theirs, scale, f"ties ({method}) vs PEFT")


@pytest.mark.parametrize("k", [1, 3])
def test_task_arithmetic(backend, k):
    """PEFT ``task_arithmetic``: Σ w_i t_i = task_arithmetic(base 0) = linear_merge(normalize=False)."""
    skip_unless_kernel("task_arithmetic", backend)
    tensors = _task_tensors(k, (45, 77), k)
    weights = [0.5, -1.25, 2.0][:k]
    theirs = merge_utils.task_arithmetic(tensors, torch.tensor(weights))
    device = device_for(backend)
    xs = [t.to(device) for t in tensors]
    scale = max(float(t.abs().max()) for t in tensors) * sum(abs(w) for w in weights)
    _close(task_arithmetic(torch.zeros_like(xs[0]), xs, weights, backend=backend), theirs, scale, "task_arithmetic")
    skip_unless_kernel("linear_merge", backend)
    _close(linear_merge(xs, weights, normalize=False, backend=backend), theirs, scale, "linear_merge")


@pytest.mark.parametrize("density", [0.0, 0.2, 0.5, 1.0])
def test_magnitude_prune(backend, density):
    """PEFT ``magnitude_prune``: trim each task tensor to its top-k (k = int(density · n)), then the
    weighted sum, with no sign election = magnitude_mask + linear_merge(normalize=False)."""
    skip_unless_kernel("magnitude_mask", backend)
    skip_unless_kernel("linear_merge", backend)
    tensors = _task_tensors(17, (29, 31), 3)
    weights = [1.0, -0.5, 0.75]
    theirs = _peft(merge_utils.magnitude_prune, tensors, torch.tensor(weights), density)
    device = device_for(backend)
    trimmed = [t.to(device) * magnitude_mask(t.to(device), density, backend=backend) for t in tensors]
    ours = linear_merge(trimmed, weights, normalize=False, backend=backend)
    scale = max(float(t.abs().max()) for t in tensors) * sum(abs(w) for w in weights)
    _close(ours, theirs, scale, "magnitude_prune vs PEFT")


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_dare_at_density_one(backend, method):
    """At density 1 PEFT's DARE keeps everything and does not rescale: dare_linear = dare_merge(base 0,
    rescale="density"); dare_ties adds consensus, sign_on="unweighted", divisor="count", normalize=True."""
    skip_unless_kernel("dare_merge", backend)
    tensors = _task_tensors(23, (37, 41), 3)
    weights = [1.0, 0.7, -0.4]
    device = device_for(backend)
    xs = [t.to(device) for t in tensors]
    zero = torch.zeros_like(xs[0])
    scale = max(float(t.abs().max()) for t in tensors) * sum(abs(w) for w in weights)
    linear = _peft(merge_utils.dare_linear, tensors, torch.tensor(weights), 1.0)
    _close(dare_merge(zero, xs, weights, 1.0, seed=0, backend=backend), linear, scale, "dare_linear vs PEFT")
    ties = _peft(merge_utils.dare_ties, tensors, torch.tensor(weights), 1.0, method)
    ours = dare_merge(zero, xs, weights, 1.0, seed=0, consensus={"total": "sum", "frequency": "count"}[method],
                      sign_on="unweighted", divisor="count", normalize=True, backend=backend)
    _close(ours, ties, scale, f"dare_ties ({method}) vs PEFT")


@pytest.mark.parametrize("density", [0.1, 0.3, 0.7])
def test_dare_keep_rate_and_rescale(backend, density):
    """PEFT's random_pruning keeps Bernoulli(density) entries and divides them by density; ours draws a
    different (Philox) mask from the same distribution: same kept values, same keep rate, same mean."""
    skip_unless_kernel("dare_merge", backend)
    n = 200_003 if backend in ("cpp", "cuda") else 20_003 if backend == "torch" else 4099
    ones = torch.ones(n)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        theirs = merge_utils.dare_linear([ones], torch.tensor([1.0]), density)
    ours = dare_merge(torch.zeros(n, device=device_for(backend)), [ones.to(device_for(backend))], None, density,
                      seed=0, backend=backend).cpu()
    values_theirs = set(theirs.unique().tolist())
    values_ours = set(ours.unique().tolist())
    assert len(values_ours) == 2 and 0.0 in values_ours
    kept_value = max(values_ours)
    assert abs(kept_value - 1.0 / density) <= 1e-6 * kept_value
    assert any(abs(v - kept_value) <= 1e-6 * kept_value for v in values_theirs - {0.0})
    bound = 6.0 * (density * (1 - density) / n) ** 0.5 + 1.0 / n
    for name, y in (("ours", ours), ("PEFT", theirs)):
        rate = float((y != 0).double().mean())
        assert abs(rate - density) <= bound, f"{name}: kept {rate:.5f} for density {density}"
        assert abs(float(y.double().mean()) - 1.0) <= bound / density, f"{name}: the rescale is not unbiased"
