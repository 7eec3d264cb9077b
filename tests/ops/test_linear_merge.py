"""linear_merge: every usable backend against the torch reference, plus the op's own identities."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fusion_engine.ops import linear_merge
from utils import (DTYPE_IDS, FLOAT_DTYPES, as_list, assert_bitwise_equal, assert_verbose_allclose, check_call,
                   device_for, dtypes_for, make_inputs, merge_inputs, skip_unless_dtype, tolerance, weights_for)

OP = "linear_merge"


def _scale(inputs, weights, normalize):
    tensors = [inputs.base, *inputs.tensors]
    w = as_list(weights, len(tensors), 1.0)
    total = sum(w) if normalize else 1.0
    return inputs.scale() * sum(abs(wi / total) for wi in w)


@given(data=st.data())
def test_matches_reference(backend, data):
    inputs = data.draw(merge_inputs(backend, max_k=3))
    tensors = [inputs.base, *inputs.tensors]
    k = len(tensors)
    weights = data.draw(weights_for(k))
    normalize = data.draw(st.booleans())
    if normalize and abs(sum(as_list(weights, k, 1.0))) < 1e-12:
        normalize = False  # weights summing to 0 cannot be normalized (tested in test_errors)
    out_dtype = data.draw(st.sampled_from([None, *dtypes_for(backend)]))
    check_call(linear_merge, (tensors, weights), dict(normalize=normalize, out_dtype=out_dtype), backend,
               [(f"tensors[{i}]", t) for i, t in enumerate(tensors)],
               scale=_scale(inputs, weights, normalize), expected_dtype=out_dtype or inputs.dtype)



def test_docstring_example(backend):
    device = device_for(backend)
    y = linear_merge([torch.ones(3, device=device), torch.zeros(3, device=device)], [3.0, 1.0], backend=backend)
    assert torch.equal(y.cpu(), torch.full((3,), 0.75))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
def test_single_tensor_is_identity(backend, dtype):
    """One tensor, normalized: the coefficient is exactly 1, so the output is the input bit for bit."""
    skip_unless_dtype(backend, dtype)
    x = make_inputs((1025,), dtype, 1, kind="wide", seed=3, device=device_for(backend)).base
    assert_bitwise_equal(linear_merge([x], backend=backend), x, "linear_merge([x])")
    assert_bitwise_equal(linear_merge([x], [7.0], backend=backend), x, "linear_merge([x], [7])")


def test_weights_forms_agree(backend):
    """None, a scalar and a list of equal weights are the same call; normalize=False is a plain sum."""
    inputs = make_inputs((129,), torch.float32, 2, seed=5, device=device_for(backend))
    xs = [inputs.base, *inputs.tensors]
    mean = linear_merge(xs, backend=backend)
    assert_bitwise_equal(linear_merge(xs, 2.0, backend=backend), mean, "scalar weight")
    assert_bitwise_equal(linear_merge(xs, [2.0, 2.0, 2.0], backend=backend), mean, "list of weights")
    assert_bitwise_equal(linear_merge(xs, torch.tensor([2.0, 2.0, 2.0]), backend=backend), mean, "tensor weights")
    ones = torch.ones(4, device=device_for(backend))
    plain = linear_merge([ones, 2 * ones], [1.0, -3.0], normalize=False, backend=backend)
    assert torch.equal(plain.cpu(), torch.full((4,), -5.0))


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
def test_out_dtype(backend, out_dtype):
    skip_unless_dtype(backend, out_dtype)
    inputs = make_inputs((5, 123), torch.bfloat16, 2, seed=6, device=device_for(backend))
    xs = [inputs.base, *inputs.tensors]
    y = check_call(linear_merge, (xs, [0.25, 0.5, 0.25]), dict(out_dtype=out_dtype), backend,
                   [(f"tensors[{i}]", t) for i, t in enumerate(xs)], scale=inputs.scale(), expected_dtype=out_dtype)
    assert y.shape == (5, 123)


def test_many_models_aliases_and_parameters(backend):
    """K = 9 tensors; the same tensor passed several times; nn.Parameters as inputs."""
    inputs = make_inputs((129,), torch.float32, 8, seed=7, device=device_for(backend))
    xs = [inputs.base, *inputs.tensors]
    weights = [0.5, -1.0, 1.5, 0.25, 1.0, -0.5, 2.0, 0.75, 1.0]
    check_call(linear_merge, (xs, weights), {}, backend, [(f"tensors[{i}]", t) for i, t in enumerate(xs)],
               scale=_scale(inputs, weights, True), expected_dtype=torch.float32)
    x = xs[1]
    check_call(linear_merge, ([x, x, xs[2], x], [1.0, 2.0, 3.0, 4.0]), {}, backend, [("x", x), ("y", xs[2])],
               scale=10 * inputs.scale())
    params = [torch.nn.Parameter(t.clone()) for t in xs[:3]]
    y = linear_merge(params, backend=backend)
    expected = linear_merge(xs[:3], backend="torch")
    assert_verbose_allclose(y.detach(), expected, *tolerance(torch.float32, inputs.scale()), what="Parameters")
