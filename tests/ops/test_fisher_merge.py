"""fisher_merge: every usable backend against the torch reference, plus the op's own identities."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fusion_engine.ops import fisher_merge, linear_merge
from utils import (DTYPE_IDS, LAYOUTS, assert_verbose_allclose, check_call, device_for, dtypes_for, make_inputs,
                   merge_inputs, positive, skip_unless_dtype, tolerance, with_layout)

OP = "fisher_merge"

FISHER_KINDS = ("positive", "sparse", "zeros", "tiny")


def make_fishers(like: torch.Tensor, k: int, kind: str, dtype: torch.dtype, layouts, seed: int):
    """K non-negative Fisher diagonals: positive, with many zeros, all zero (ε decides), or tiny."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(k):
        f = torch.rand(like.shape, generator=gen, dtype=torch.float64) * 4
        if kind == "sparse":
            f = f * (torch.rand(like.shape, generator=gen, dtype=torch.float64) < 0.5)
        elif kind == "zeros":
            f = torch.zeros(like.shape, dtype=torch.float64)
        elif kind == "tiny":
            f = f * 1e-6
        out.append(with_layout(f.to(dtype).to(like.device), layouts[i % len(layouts)]))
    return out


def _named(xs, fs):
    return [(f"tensors[{i}]", t) for i, t in enumerate(xs)] + [(f"fishers[{i}]", f) for i, f in enumerate(fs)]


@given(data=st.data())
def test_matches_reference(backend, data):
    inputs = data.draw(merge_inputs(backend, kinds=("normal", "int", "sparse", "wide")))
    xs = inputs.tensors
    k = len(xs)
    fisher_dtype = data.draw(st.sampled_from(sorted({inputs.dtype, torch.float32}, key=str)))
    kind = data.draw(st.sampled_from(FISHER_KINDS))
    layouts = data.draw(st.lists(st.sampled_from(LAYOUTS), min_size=1, max_size=k))
    fs = make_fishers(inputs.base, k, kind, fisher_dtype, layouts, data.draw(st.integers(0, 2**31 - 1)))
    weights = data.draw(st.one_of(st.none(), positive, st.lists(positive, min_size=k, max_size=k)))
    eps = data.draw(st.sampled_from([1e-8, 0.0, 1e-3]))
    if eps == 0.0 and kind in ("sparse", "zeros"):
        eps = 1e-8  # 0/0 at entries where every Fisher is zero: NaN on purpose, not a backend comparison
    out_dtype = data.draw(st.sampled_from([None, *dtypes_for(backend)]))
    check_call(fisher_merge, (xs, fs, weights), dict(eps=eps, out_dtype=out_dtype), backend, _named(xs, fs),
               scale=inputs.scale(), expected_dtype=out_dtype or inputs.dtype)



def test_docstring_example(backend):
    device = device_for(backend)
    y = fisher_merge([torch.zeros(2, device=device), torch.ones(2, device=device)],
                     [torch.ones(2, device=device), 3 * torch.ones(2, device=device)], eps=0.0, backend=backend)
    assert torch.equal(y.cpu(), torch.full((2,), 0.75))


def test_equal_fishers_is_weighted_average(backend):
    """F_i = c (the same everywhere): the Fisher merge is the normalized linear merge."""
    inputs = make_inputs((1025,), torch.float32, 3, seed=41, device=device_for(backend))
    fs = [torch.full((1025,), 2.5, device=inputs.base.device)] * 3
    y = fisher_merge(inputs.tensors, fs, [1.0, 2.0, 0.5], eps=0.0, backend=backend)
    expected = linear_merge(inputs.tensors, [1.0, 2.0, 0.5], backend="torch")
    atol, rtol = tolerance(torch.float32, inputs.scale())
    assert_verbose_allclose(y, expected, atol, rtol, what="equal Fishers vs linear_merge")


def test_zero_fisher_entries(backend):
    """Where every Fisher is zero, y = 0/(0 + ε) = 0; where one model alone has Fisher mass, y is its value."""
    device = device_for(backend)
    xs = [torch.tensor([1.0, 2.0, 3.0], device=device), torch.tensor([5.0, 6.0, 7.0], device=device)]
    fs = [torch.tensor([0.0, 1.0, 0.0], device=device), torch.tensor([0.0, 0.0, 2.0], device=device)]
    y = fisher_merge(xs, fs, eps=0.0 + 1e-30, backend=backend).cpu()
    assert y.tolist() == [0.0, 2.0, 7.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_fp32_fishers_with_half_tensors(backend, dtype):
    skip_unless_dtype(backend, dtype)
    inputs = make_inputs((5, 123), dtype, 2, seed=42, device=device_for(backend))
    fs = make_fishers(inputs.base, 2, "positive", torch.float32, ["transposed", "offset"], seed=43)
    check_call(fisher_merge, (inputs.tensors, fs), dict(out_dtype=torch.float32), backend, _named(inputs.tensors, fs),
               scale=inputs.scale(), expected_dtype=torch.float32)
