"""cost_matrix: every backend against the torch reference; the reference against scipy's cdist and
torch.cdist; clamping, zero-norm / constant rows, shapes, layouts, dtypes and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.spatial.distance import cdist

from fusion_engine.errors import (
    BackendUnavailableError,
    ConfigError,
    DeviceMismatchError,
    DTypeMismatchError,
    ShapeMismatchError,
)
from fusion_engine.ops import cost_matrix
from fusion_engine.ops.cost_matrix import METRICS
from utils import DTYPE_IDS, InputGuard, assert_verbose_allclose, device_for, dtypes_for, with_layout

OP = "cost_matrix"
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}
ACC_EPS = {torch.float64: 1e-13, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}


def tolerance(metric: str, dtype: torch.dtype, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(atol, rtol) between two fp32-accumulated computations of one metric: rounding errors of
    ‖x‖² + ‖y‖² − 2⟨x, y⟩ scale with the squared norms (the square root of that for euclidean);
    cosine/correlation are normalised; then one or two roundings to the output dtype (rtol)."""
    eps = ACC_EPS[dtype]
    sq = lambda t: float(t.double().pow(2).sum(-1).max()) if t.numel() else 0.0  # noqa: E731
    scale = max(1.0, sq(x) + sq(y))
    atol = {"sqeuclidean": eps * scale, "inner": eps * scale, "euclidean": math.sqrt(eps * scale)}.get(metric, 10 * eps)
    return atol, RTOL[dtype]


def make_xy(seed: int, batch: int | None, n: int, m: int, d: int, dtype, device="cpu", offset: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch,) if batch is not None else ()
    x = torch.randn(*shape, n, d, generator=gen, dtype=torch.float64) + offset
    y = torch.randn(*shape, m, d, generator=gen, dtype=torch.float64) + offset
    if n and m and d:  # a few coinciding rows: sqeuclidean exactly at its clamp
        y[..., : min(n, m) // 2, :] = x[..., : min(n, m) // 2, :]
    return x.to(dtype).to(device), y.to(dtype).to(device)


def check_against_reference(backend, x, y, metric):
    guard = InputGuard([("x", x), ("y", y)])
    out = cost_matrix(x, y, metric=metric, backend=backend)
    again = cost_matrix(x, y, metric=metric, backend=backend)
    guard.check()
    n, m = x.shape[-2], y.shape[-2]
    assert out.shape == (*x.shape[:-2], n, m)
    assert out.dtype == x.dtype and out.device == x.device
    assert torch.equal(out, again) or bool(torch.isnan(out).any()), "the same call twice differs"
    expected = cost_matrix(x, y, metric=metric, backend="torch")
    atol, rtol = tolerance(metric, x.dtype, x, y)
    assert_verbose_allclose(out, expected, atol, rtol, what=f"{backend} {metric} {DTYPE_IDS[x.dtype]}")
    if metric in ("sqeuclidean", "euclidean", "cosine", "correlation"):
        assert bool((out >= 0).all()), f"{metric} has negative entries"
    return out


@given(data=st.data())
def test_random_inputs_match_reference(backend, data):
    dtype = data.draw(st.sampled_from(dtypes_for(backend)), label="dtype")
    metric = data.draw(st.sampled_from(METRICS), label="metric")
    batch = data.draw(st.sampled_from([None, 1, 3]), label="batch")
    n = data.draw(st.integers(0, 40), label="n")
    m = data.draw(st.integers(0, 40), label="m")
    d = data.draw(st.integers(0, 70), label="d")
    layouts = data.draw(st.tuples(*[st.sampled_from(("contiguous", "transposed", "strided", "broadcast"))] * 2))
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    x, y = make_xy(seed, batch, n, m, d, dtype, device_for(backend))
    check_against_reference(backend, with_layout(x, layouts[0]), with_layout(y, layouts[1]), metric)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=DTYPE_IDS.get)
def test_every_metric_and_dtype(backend, metric, dtype):
    if dtype not in dtypes_for(backend):
        pytest.skip(f"{backend} has no {DTYPE_IDS[dtype]} kernel")
    x, y = make_xy(1, 2, 67, 33, 75, dtype, device_for(backend), offset=0.5)  # odd sizes: partial tiles
    check_against_reference(backend, x, y, metric)
    check_against_reference(backend, x[0], y[1], metric)  # 2-D
    check_against_reference(backend, x.transpose(1, 2).contiguous().transpose(1, 2), y[:, ::2], metric)


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "cosine", "correlation"])
def test_reference_matches_scipy_cdist(metric):
    x, y = make_xy(2, None, 23, 17, 9, torch.float64, offset=0.3)
    expected = torch.from_numpy(cdist(x.numpy(), y.numpy(), metric))
    atol, rtol = tolerance(metric, torch.float64, x, y)  # the matrix-product form vs scipy's direct sums
    assert_verbose_allclose(cost_matrix(x, y, metric=metric), expected, atol, rtol, what=metric)


def test_inner_is_negated_dot(backend):
    dtype = torch.float32
    x, y = make_xy(3, 2, 19, 21, 13, dtype, device_for(backend))
    expected = -(x.double() @ y.double().transpose(1, 2))
    assert_verbose_allclose(cost_matrix(x, y, metric="inner", backend=backend), expected, 1e-5, 1e-5)


def test_euclidean_matches_torch_cdist(backend):
    x, y = make_xy(4, 3, 41, 29, 50, torch.float32, device_for(backend))
    out = cost_matrix(x, y, metric="euclidean", backend=backend)
    atol, rtol = tolerance("euclidean", torch.float32, x, y)
    assert_verbose_allclose(out, torch.cdist(x, y), atol, rtol, what="vs torch.cdist")
    sq = cost_matrix(x, y, metric="sqeuclidean", backend=backend)
    expected = torch.cdist(x.double(), y.double()).pow(2)
    assert_verbose_allclose(sq, expected, *tolerance("sqeuclidean", torch.float32, x, y), what="vs cdist squared")


def test_identical_rows_clamp_to_zero(backend):
    """‖x‖² + ‖x‖² − 2⟨x, x⟩ may round below 0: sqeuclidean is clamped, euclidean has no NaN."""
    gen = torch.Generator().manual_seed(5)
    x = (1000 + torch.randn(37, 64, generator=gen)).to(device_for(backend))
    sq = cost_matrix(x, x, metric="sqeuclidean", backend=backend)
    eu = cost_matrix(x, x, metric="euclidean", backend=backend)
    assert bool((sq >= 0).all()) and not bool(torch.isnan(eu).any())
    assert float(sq.diagonal().abs().max()) <= 1e-5 * float(x.pow(2).sum(-1).max())


def test_zero_and_constant_rows(backend):
    """cosine of a zero vector and correlation of a constant one are taken as similarity 0 (cost 1);
    everywhere else the scipy value."""
    device = device_for(backend)
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0], [1.0, -2.0, 0.5, 3.0], [-1.0, 0.0, 0.0, 0.0]])
    y = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0], [-1.5, -1.5, -1.5, -1.5]])
    for metric, undefined_x, undefined_y in (("cosine", [0], [0]), ("correlation", [0, 1], [0, 2])):
        out = cost_matrix(x.to(device), y.to(device), metric=metric, backend=backend).cpu().double()
        with np.errstate(all="ignore"):
            expected = torch.from_numpy(cdist(x.double().numpy(), y.double().numpy(), metric))
        expected[undefined_x, :] = 1.0
        expected[:, undefined_y] = 1.0
        assert_verbose_allclose(out, expected, 1e-6, 1e-6, what=metric)


@pytest.mark.parametrize("shape", [((0, 5), (3, 5)), ((4, 5), (0, 5)), ((4, 0), (3, 0)), ((0, 2, 3), (0, 4, 3)),
                                   ((2, 3, 0), (2, 1, 0))])
def test_empty_sizes(backend, shape):
    device = device_for(backend)
    x, y = torch.ones(shape[0], device=device), torch.ones(shape[1], device=device)
    expected_shape = (*shape[0][:-2], shape[0][-2], shape[1][-2])
    for metric in METRICS:
        out = cost_matrix(x, y, metric=metric, backend=backend)
        assert out.shape == expected_shape
        if out.numel():  # d = 0: every distance 0, similarities undefined (cost 1)
            value = 1.0 if metric in ("cosine", "correlation") else 0.0
            assert bool((out == value).all()), (metric, out)


def test_nan_propagates(backend):
    x, y = make_xy(6, None, 5, 4, 8, torch.float32, device_for(backend))
    x[2, 3] = float("nan")
    for metric in METRICS:
        out = cost_matrix(x, y, metric=metric, backend=backend)
        assert bool(torch.isnan(out[2]).all()) and not bool(torch.isnan(out[[0, 1, 3, 4]]).any()), metric


def test_bad_arguments():
    x = torch.rand(4, 3)
    with pytest.raises(ShapeMismatchError, match="same feature size"):
        cost_matrix(x, torch.rand(5, 2))
    with pytest.raises(ShapeMismatchError, match="same feature size"):
        cost_matrix(torch.rand(2, 4, 3), torch.rand(3, 5, 3))
    with pytest.raises(ShapeMismatchError, match="pass x"):
        cost_matrix(x, torch.rand(1, 5, 3))
    with pytest.raises(ShapeMismatchError):
        cost_matrix(torch.rand(3), torch.rand(3))
    with pytest.raises(DTypeMismatchError, match="cast them"):
        cost_matrix(x, torch.rand(5, 3, dtype=torch.float64))
    with pytest.raises(DTypeMismatchError, match="supported are"):
        cost_matrix(x.int(), x.int())
    with pytest.raises(ConfigError, match="metric"):
        cost_matrix(x, x, metric="manhattan")
    with pytest.raises(ConfigError, match="not a torch.Tensor"):
        cost_matrix(x.tolist(), x)
    with pytest.raises(BackendUnavailableError, match="no cpp kernel"):
        cost_matrix(x, x, backend="cpp")
    if torch.cuda.is_available():
        with pytest.raises(DeviceMismatchError):
            cost_matrix(x, x.cuda())


def test_auto_choice_on_cpu_is_the_blas_reference():
    from fusion_engine._dispatch import resolve

    name, _ = resolve(OP, torch.device("cpu"), torch.float32)
    assert name == "torch"


@pytest.mark.gpu
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_triton_on_gpu_large(metric, dtype):
    x, y = make_xy(7, 3, 1000, 777, 300, dtype, "cuda")
    check_against_reference("triton", x, y, metric)
