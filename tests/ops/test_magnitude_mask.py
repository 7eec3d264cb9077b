"""magnitude_mask: masks EXACTLY equal to the torch reference on every backend, plus the selection's
own properties (exactly k kept with tie="index", all ≥ the k-th magnitude with "threshold")."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fusion_engine.ops import magnitude_mask
from utils import (DTYPE_IDS, FLOAT_DTYPES, LAYOUTS, InputGuard, assert_bitwise_equal, density_values, device_for,
                   dtypes_for, random_values, shapes_for, skip_unless_dtype, with_layout)

OP = "magnitude_mask"

TIES = ("index", "threshold")
SPECIALS = {
    torch.float32: [0.0, -0.0, 1.0, -1.0, 1.5, -1.5, 2.0**-149, -(2.0**-149), 2.0**-126, 3.0e38, -3.0e38, 1e-20, 7.0],
    torch.float64: [0.0, -0.0, 1.0, -1.0, 1.5, 5e-324, -5e-324, 2.0**-1022, 1e308, -1e308, 1e-200, 7.0],
    torch.float16: [0.0, -0.0, 1.0, -1.0, 1.5, 2.0**-24, -(2.0**-24), 2.0**-14, 65504.0, -65504.0, 7.0],
    torch.bfloat16: [0.0, -0.0, 1.0, -1.0, 1.5, 2.0**-133, -(2.0**-133), 2.0**-126, 3.0e38, -3.0e38, 7.0],
}


def keep_count(density, n):
    return min(n, max(0, int(density * n)))


def check_selection(mask: torch.Tensor, x: torch.Tensor, density: float, tie: str) -> None:
    """The spec of the selection, checked on any mask (independently of how it was computed)."""
    assert mask.dtype == torch.bool and mask.shape == x.shape and mask.device == x.device
    n = x.numel()
    k = keep_count(density, n)
    m = mask.reshape(-1).cpu()
    mag = x.detach().reshape(-1).cpu().double().abs()
    kept = int(m.sum())
    if k == 0:
        assert kept == 0, f"density {density} of {n} entries: k = 0 but {kept} kept"
        return
    threshold = torch.sort(mag, descending=True).values[k - 1]
    if tie == "index":
        assert kept == k, f"tie='index' must keep exactly k = {k} entries, kept {kept}"
        assert bool((mag[m] >= threshold).all()) and bool((mag[~m] <= threshold).all())
        at = (mag == threshold).nonzero().reshape(-1)
        kept_at = m[at]
        # among entries equal to the threshold, the kept ones are the lowest indices
        assert not bool((kept_at[1:] & ~kept_at[:-1]).any()), "ties at the threshold not broken by lowest index"
    else:
        assert kept >= k, f"tie='threshold' must keep at least k = {k} entries, kept {kept}"
        assert torch.equal(m, mag >= threshold), "tie='threshold' must keep exactly the entries >= the k-th magnitude"


def check_against_reference(backend, x, density, tie):
    guard = InputGuard([("x", x)])
    mask = magnitude_mask(x, density, tie=tie, backend=backend)
    again = magnitude_mask(x, density, tie=tie, backend=backend)
    guard.check()
    assert_bitwise_equal(again, mask, f"{backend}: the same call twice")
    check_selection(mask, x, density, tie)
    if backend != "torch":
        assert_bitwise_equal(mask, magnitude_mask(x, density, tie=tie, backend="torch"), f"{backend} vs torch mask")
    return mask


@st.composite
def mask_inputs(draw, backend):
    dtype = draw(st.sampled_from(dtypes_for(backend)))
    shape = draw(st.sampled_from(shapes_for(backend)))
    kind = draw(st.sampled_from(["normal", "int", "sparse", "wide", "equal", "specials"]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if kind == "equal":  # every magnitude equal: the selection is all ties
        values = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).double()
    elif kind == "specials":
        pool = torch.tensor(SPECIALS[dtype], dtype=torch.float64)
        values = pool[torch.randint(0, len(pool), shape, generator=gen)]
    else:
        values = random_values(gen, shape, kind)
    x = with_layout(values.to(dtype).to(device_for(backend)), draw(st.sampled_from(LAYOUTS)))
    return x


@given(data=st.data())
def test_matches_reference(backend, data):
    x = data.draw(mask_inputs(backend))
    density = data.draw(density_values)
    tie = data.draw(st.sampled_from(TIES))
    check_against_reference(backend, x, density, tie)



@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@given(values=st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=0, max_size=40),
       density=density_values, tie=st.sampled_from(TIES))
def test_arbitrary_values(backend, dtype, values, density, tie):
    """Any finite values (rounded to the dtype: fp16 overflow to inf is excluded)."""
    skip_unless_dtype(backend, dtype)
    x = torch.tensor(values, dtype=torch.float64).to(dtype)
    if not bool(torch.isfinite(x).all()):
        x = torch.nan_to_num(x, posinf=1.0, neginf=-1.0)
    check_against_reference(backend, x.to(device_for(backend)), density, tie)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
def test_ties_at_threshold(backend, dtype):
    """Many equal magnitudes (both signs, ±0 too): index keeps exactly k, the lowest indices among
    equals; threshold keeps every entry equal to the k-th magnitude."""
    skip_unless_dtype(backend, dtype)
    device = device_for(backend)
    x = torch.tensor([2.0, -1.0, 1.0, 3.0, -1.0, 0.0, 1.0, -0.0, -3.0, 1.0], dtype=dtype, device=device)
    # magnitudes sorted: 3, 3, 2, 1, 1, 1, 1, 1, 0, 0
    idx = magnitude_mask(x, 0.4, tie="index", backend=backend)  # k = 4: both 3s, the 2, the first 1 (index 1)
    expected = torch.zeros(10, dtype=torch.bool)
    expected[[0, 1, 3, 8]] = True
    assert_bitwise_equal(idx.cpu(), expected, "tie='index'")
    thr = magnitude_mask(x, 0.4, tie="threshold", backend=backend)  # every |x| >= 1
    assert_bitwise_equal(thr.cpu(), x.cpu().abs() >= 1, "tie='threshold'")
    zeros = magnitude_mask(x, 0.9, tie="index", backend=backend)  # k = 9: one of the two zeros (index 5)
    expected = torch.ones(10, dtype=torch.bool)
    expected[7] = False
    assert_bitwise_equal(zeros.cpu(), expected, "tie='index' among +0 and -0")


@pytest.mark.parametrize("tie", TIES)
def test_large_all_equal(backend, tie):
    """n entries of equal magnitude: index keeps exactly the first k; threshold keeps them all."""
    n = 4099 if backend == "triton" and device_for(backend).type == "cpu" else 100_003
    gen = torch.Generator().manual_seed(0)
    x = torch.where(torch.rand(n, generator=gen) < 0.5, -0.5, 0.5).to(device_for(backend))
    mask = magnitude_mask(x, 0.37, tie=tie, backend=backend).cpu()
    k = keep_count(0.37, n)
    if tie == "index":
        assert int(mask.sum()) == k and bool(mask[:k].all()), "index ties must keep the first k entries"
    else:
        assert bool(mask.all())


def test_density_edges(backend):
    x = torch.randn(1025, generator=torch.Generator().manual_seed(1)).to(device_for(backend))
    for tie in TIES:
        assert not bool(magnitude_mask(x, 0.0, tie=tie, backend=backend).any())
        assert bool(magnitude_mask(x, 1.0, tie=tie, backend=backend).all())
        # k = floor(density · n): 1/1025 keeps one entry, just below it keeps none
        assert int(magnitude_mask(x, 1 / 1025, tie=tie, backend=backend).sum()) == 1
        assert int(magnitude_mask(x, 0.999 / 1025, tie=tie, backend=backend).sum()) == 0
        largest = int(x.abs().argmax())
        assert bool(magnitude_mask(x, 1 / 1025, tie=tie, backend=backend)[largest])
    assert math.floor(0.5 * 1025) == int(magnitude_mask(x, 0.5, backend=backend).sum())


def test_docstring_example(backend):
    x = torch.tensor([0.1, -3.0, 2.0, 2.0], device=device_for(backend))
    mask = magnitude_mask(x, 0.5, backend=backend)
    assert mask.cpu().tolist() == [False, True, True, False]


def test_keep_count_instead_of_density(backend):
    """``k=`` keeps exactly k entries (what a caller holding a count passes, no density round trip);
    exactly one of density and k, k an int in [0, n]."""
    from fusion_engine.errors import ConfigError

    x = torch.tensor([0.1, -3.0, 2.0, 2.0, 0.5], device=device_for(backend))
    for k in range(6):
        assert int(magnitude_mask(x, k=k, backend=backend).sum()) == k
    assert torch.equal(magnitude_mask(x, k=2, backend=backend), magnitude_mask(x, 0.4, backend=backend))
    for bad in (dict(), dict(density=0.5, k=1), dict(k=6), dict(k=-1), dict(k=1.5), dict(k=True)):
        with pytest.raises(ConfigError, match="k|density"):
            magnitude_mask(x, backend=backend, **bad)
