"""Self-checks of the test helpers: each must be able to fail, or the suite proves nothing."""

import math

import pytest
import torch

from fusion_engine import _dispatch
from fusion_engine.ops import linear_merge
from utils import (
    LAYOUTS,
    InputGuard,
    assert_bitwise_equal,
    assert_verbose_allclose,
    check_call,
    kernel_missing_reason,
    make_inputs,
    tolerance,
    with_layout,
)


def test_allclose_fails_on_a_perturbed_output():
    expected = torch.randn(5, 123, generator=torch.Generator().manual_seed(0))
    assert_verbose_allclose(expected.clone(), expected, *tolerance(torch.float32))
    perturbed = expected.clone()
    perturbed[3, 77] += 1e-3
    with pytest.raises(AssertionError) as info:
        assert_verbose_allclose(perturbed, expected, *tolerance(torch.float32))
    message = str(info.value)
    assert "1 of 615 elements differ" in message and "(3, 77)" in message


def test_allclose_nan_and_inf():
    e = torch.tensor([1.0, math.nan, math.inf, -math.inf])
    assert_verbose_allclose(e.clone(), e, 0.0, 0.0)
    for bad in ([1.0, 0.0, math.inf, -math.inf], [1.0, math.nan, -math.inf, -math.inf], [1.0, math.nan, 1e30, -math.inf]):
        with pytest.raises(AssertionError):
            assert_verbose_allclose(torch.tensor(bad), e, 1.0, 1.0)
    with pytest.raises(AssertionError, match="shape"):
        assert_verbose_allclose(torch.zeros(3), torch.zeros(4), 1.0, 1.0)


@pytest.mark.parametrize("dtype, ulp", [(torch.bfloat16, 2.0**-7), (torch.float16, 2.0**-10)], ids=["bf16", "fp16"])
def test_half_tolerance_is_one_ulp(dtype, ulp):
    one = torch.ones(1, dtype=dtype)
    atol, rtol = tolerance(dtype)
    assert_verbose_allclose(one + ulp, one, atol, rtol)  # one ulp above 1
    assert_verbose_allclose(one - ulp / 2, one, atol, rtol)  # one ulp below 1
    with pytest.raises(AssertionError):
        assert_verbose_allclose(one + 2 * ulp, one, atol, rtol)


def test_bitwise_equal_sees_signed_zero_and_dtype():
    assert_bitwise_equal(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]))
    with pytest.raises(AssertionError, match="not bit-identical"):
        assert_bitwise_equal(torch.tensor([-0.0, 1.0]), torch.tensor([0.0, 1.0]))
    with pytest.raises(AssertionError, match="dtype"):
        assert_bitwise_equal(torch.zeros(2, dtype=torch.float16), torch.zeros(2, dtype=torch.bfloat16))


def test_layouts_keep_values():
    values = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    for layout in LAYOUTS:
        t = with_layout(values, layout)
        if layout == "broadcast":
            assert torch.equal(t, values[:1].expand(5, 7))
        else:
            assert torch.equal(t, values)
        if layout != "contiguous":
            assert not t.is_contiguous() or t.storage_offset() > 0, layout


def test_input_guard_sees_writes_into_gaps():
    view = with_layout(torch.ones(8), "strided")
    guard = InputGuard([("x", view)])
    guard.check()
    view._base[1] = 0.0  # the NaN gap between entries 0 and 1 of the view
    with pytest.raises(AssertionError, match="x was modified"):
        guard.check()


def test_check_call_catches_a_wrong_backend():
    inputs = make_inputs((129,), torch.float32, 2, seed=0)
    xs = [inputs.base, *inputs.tensors]
    named = [(f"tensors[{i}]", t) for i, t in enumerate(xs)]

    def wrong(tensors, backend):  # a "backend" off by 1e-4 relative
        y = linear_merge(tensors, backend="torch")
        return y * (1 + 1e-4) if backend != "torch" else y

    def in_place(tensors, backend):  # a "backend" that writes into its input
        if backend != "torch":
            tensors[0].add_(1e-3)
        return linear_merge(tensors, backend="torch")

    calls = []

    def flaky(tensors, backend):
        calls.append(backend)
        return linear_merge(tensors, backend="torch") + (len(calls) == 2) * 1e-3

    for fn, match in ((wrong, "elements differ"), (in_place, "was modified"), (flaky, "the same call twice")):
        with pytest.raises(AssertionError, match=match):
            check_call(fn, (xs,), {}, "cpp", named, expected_dtype=torch.float32)


def test_kernel_missing_reason(monkeypatch):
    def missing_module():
        from fusion_engine.launchers.no_such_module import f  # noqa: F401

    def missing_function():
        return _dispatch.cpp_launchers().no_such_fn

    monkeypatch.setitem(_dispatch._REGISTRY, "fake_op",
                        _dispatch.OpKernels(linear_merge, {"cpp": missing_module, "triton": missing_function}))
    assert "not written yet" in kernel_missing_reason("fake_op", "cpp")
    assert "no_such_fn" in kernel_missing_reason("fake_op", "triton")
    assert "registers no cuda" in kernel_missing_reason("fake_op", "cuda")
    assert kernel_missing_reason("fake_op", "torch") is None
