"""task_arithmetic: every usable backend against the torch reference, plus the op's own identities."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fusion_engine.ops import task_arithmetic
from utils import (DTYPE_IDS, FLOAT_DTYPES, as_list, assert_bitwise_equal, check_call, device_for, dtypes_for,
                   dyadic, make_inputs, merge_inputs, skip_unless_dtype, weights_for)

OP = "task_arithmetic"

lams = st.one_of(dyadic, st.floats(-2.0, 2.0, allow_nan=False))


def _scale(inputs, weights, lam):
    w = as_list(weights, len(inputs.tensors), 1.0)
    return inputs.scale() * (1.0 + 2.0 * abs(lam) * sum(abs(wi) for wi in w))


@given(data=st.data())
def test_matches_reference(backend, data):
    inputs = data.draw(merge_inputs(backend))
    k = len(inputs.tensors)
    weights = data.draw(weights_for(k))
    lam = data.draw(lams)
    out_dtype = data.draw(st.sampled_from([None, *dtypes_for(backend)]))
    check_call(task_arithmetic, (inputs.base, inputs.tensors, weights), dict(lam=lam, out_dtype=out_dtype),
               backend, inputs.named, scale=_scale(inputs, weights, lam), expected_dtype=out_dtype or inputs.dtype)



def test_docstring_example(backend):
    device = device_for(backend)
    y = task_arithmetic(torch.zeros(2, device=device), [torch.ones(2, device=device), 2 * torch.ones(2, device=device)],
                        [0.5, 0.5], backend=backend)
    assert torch.equal(y.cpu(), torch.full((2,), 1.5))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
def test_zero_deltas_and_zero_lambda_give_base(backend, dtype):
    """All-zero task vectors, or λ = 0, leave the base unchanged (value for value)."""
    skip_unless_dtype(backend, dtype)
    inputs = make_inputs((4099,), dtype, 3, kind="zero_delta", seed=11, device=device_for(backend))
    y = task_arithmetic(inputs.base, inputs.tensors, [0.5, -2.0, 1.0], backend=backend)
    assert torch.equal(y, inputs.base)
    moved = make_inputs((4099,), dtype, 2, seed=12, device=device_for(backend))
    y = task_arithmetic(moved.base, moved.tensors, [1.0, 1.0], lam=0.0, backend=backend)
    assert torch.equal(y, moved.base)


def test_lambda_folds_into_weights(backend):
    """λ·w_i is the only thing that matters: (w, λ=2) is the call (2w, λ=1), bit for bit."""
    inputs = make_inputs((1025,), torch.float32, 2, seed=13, device=device_for(backend))
    a = task_arithmetic(inputs.base, inputs.tensors, [0.25, -0.75], lam=2.0, backend=backend)
    b = task_arithmetic(inputs.base, inputs.tensors, [0.5, -1.5], lam=1.0, backend=backend)
    assert_bitwise_equal(a, b, "lambda folded into the weights")


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
def test_out_dtype(backend, out_dtype):
    skip_unless_dtype(backend, out_dtype)
    inputs = make_inputs((5, 123), torch.float16, 2, seed=14, device=device_for(backend))
    check_call(task_arithmetic, (inputs.base, inputs.tensors, [0.5, 0.5]), dict(out_dtype=out_dtype), backend,
               inputs.named, scale=_scale(inputs, [0.5, 0.5], 1.0), expected_dtype=out_dtype)
