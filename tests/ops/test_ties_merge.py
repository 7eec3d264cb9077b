"""ties_merge: every usable backend against the torch reference over every switch, exact trimming
(per-model densities, ties at the threshold), and the op's own identities."""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fusion_engine.ops import magnitude_mask, ties_merge
from utils import (draw_task_merge, DTYPE_IDS, FLOAT_DTYPES, LAYOUTS, MergeInputs, as_list, assert_bitwise_equal,
                   assert_verbose_allclose, check_call, densities_for, device_for, dtypes_for, make_inputs,
                   skip_unless_dtype, tolerance, with_layout)

OP = "ties_merge"

SWITCHES = dict(sign=("sum", "count"), sign_on=("weighted", "unweighted"), divisor=("weights", "count"),
                normalize=(True, False), rescale=(None, "l1"), tie=("index", "threshold"))


def _scale(inputs, weights, density, kw):
    """A bound on the largest summand of the merge, for the absolute tolerance."""
    k = len(inputs.tensors)
    w = [abs(v) for v in as_list(weights, k, 1.0)]
    rho = [d for d in as_list(density, k, 1.0) if d > 0]
    n = max(1, inputs.base.numel())
    rescale = max((1.0 / max(r, 1.0 / n) for r in rho), default=1.0) if kw.get("rescale") == "l1" else 1.0
    normalize = 1.0
    if kw.get("normalize", True) and kw.get("divisor", "weights") == "weights":
        normalize = max([8.0] + [1.0 / v for v in w if v > 0])
    return inputs.scale() * (1.0 + 2.0 * abs(kw.get("lam", 1.0)) * rescale * normalize * sum(w))


@given(data=st.data())
def test_matches_reference(backend, data):
    inputs, weights, density, kw = draw_task_merge(data, backend, SWITCHES)
    out_dtype = data.draw(st.sampled_from([None, *dtypes_for(backend)]))
    check_call(ties_merge, (inputs.base, inputs.tensors, weights, density), dict(kw, out_dtype=out_dtype), backend,
               inputs.named, scale=_scale(inputs, weights, density, kw), expected_dtype=out_dtype or inputs.dtype)


def test_every_switch(backend):
    """All 64 combinations of sign, sign_on, divisor, normalize, rescale and tie, with negative weights,
    per-model densities, and integer-valued rows (ties at the threshold) beside continuous ones."""
    shape = (7, 13) if backend == "triton" and device_for(backend).type == "cpu" else (33, 65)
    device = device_for(backend)
    ints = make_inputs(shape, torch.float32, 3, kind="int", seed=21, device=device)
    reals = make_inputs(shape, torch.float32, 3, kind="normal", seed=22, device=device)
    rows = torch.arange(shape[0], device=device).view(-1, 1) % 2 == 0
    pick = lambda a, b: torch.where(rows, a, b)  # noqa: E731
    base = pick(ints.base, reals.base).t().contiguous().t()
    tensors = [pick(a, b) for a, b in zip(ints.tensors, reals.tensors)]
    inputs = MergeInputs(base, tensors, torch.float32, shape, "int rows and normal rows")
    weights, density = [1.0, -0.5, 0.75], [0.2, 0.5, 1.0]
    for values in itertools.product(*SWITCHES.values()):
        kw = dict(zip(SWITCHES, values))
        check_call(ties_merge, (base, tensors, weights, density), kw, backend, inputs.named,
                   scale=_scale(inputs, weights, density, kw), expected_dtype=torch.float32, repeat=False)



def _trim_probe(shape, dtype, k, seed, device):
    """K task vectors with positive integer entries u_ij ∈ {1, 2, 3} scaled by 4^i: with base 0, all signs
    agree, so with normalize=False the merge is Σ_i 4^i u_ij [kept_ij], which decodes every model's trim
    mask exactly (and is exact in every dtype). Magnitudes repeat a lot: ties at every threshold."""
    gen = torch.Generator().manual_seed(seed)
    u = [torch.randint(1, 4, shape, generator=gen).double() for _ in range(k)]
    xs = [(4.0**i * u[i]).to(dtype).to(device) for i in range(k)]
    return torch.zeros(shape, dtype=dtype, device=device), xs


@given(data=st.data())
def test_trim_masks_exact(backend, data):
    """Per-model trimming keeps exactly the entries magnitude_mask keeps (same k, same tie rule), on every
    backend, bit for bit."""
    dtype = data.draw(st.sampled_from(dtypes_for(backend)))
    shape = data.draw(st.sampled_from([(1,), (7,), (64,), (1025,), (5, 123), (3, 7, 11)]
                                      + ([(100_003,)] if backend == "cpp" else [])))
    k = data.draw(st.integers(1, 4))
    density = data.draw(densities_for(k))
    tie = data.draw(st.sampled_from(("index", "threshold")))
    layout = data.draw(st.sampled_from(LAYOUTS))
    device = device_for(backend)
    base, xs = _trim_probe(shape, dtype, k, data.draw(st.integers(0, 2**31 - 1)), device)
    xs = [with_layout(x, layout) for x in xs]
    y = ties_merge(base, xs, None, density, normalize=False, tie=tie, backend=backend)
    expected = torch.zeros(shape, dtype=torch.float64)
    for x, rho in zip(xs, as_list(density, k, 1.0)):
        mask = magnitude_mask(x, rho, tie=tie, backend="torch")
        expected += (x.double() * mask).cpu()
    assert_bitwise_equal(y.cpu(), expected.to(dtype), f"{backend}: sum of trimmed task vectors")
    if tie == "index":
        kept = sum(int((x.cpu() * magnitude_mask(x, r, backend="torch").cpu() != 0).sum())
                   for x, r in zip(xs, as_list(density, k, 1.0)))
        assert kept == sum(int(r * base.numel()) for r in as_list(density, k, 1.0))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
def test_single_model_is_its_trimmed_task_vector(backend, dtype):
    """K = 1, base 0, weight w: y = δ̂ exactly (the sign always agrees, N/D = w δ̂ / w with w a power of 2)."""
    skip_unless_dtype(backend, dtype)
    device = device_for(backend)
    x = make_inputs((1025,), dtype, 1, kind="wide", seed=22, device=device).base
    for w in (1.0, 4.0, -0.5):
        y = ties_merge(torch.zeros_like(x), [x], [w], 0.3, backend=backend)
        # value equality (−0 == +0): dropped entries may come out as either zero
        assert_verbose_allclose(y, x * magnitude_mask(x, 0.3, backend="torch"), 0.0, 0.0, what=f"w={w}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
def test_zero_deltas_give_base(backend, dtype):
    skip_unless_dtype(backend, dtype)
    inputs = make_inputs((4099,), dtype, 3, kind="zero_delta", seed=23, device=device_for(backend))
    for kw in (dict(), dict(rescale="l1"), dict(sign="count", divisor="count", normalize=False)):
        y = ties_merge(inputs.base, inputs.tensors, [1.0, -0.5, 2.0], 0.5, backend=backend, **kw)
        assert torch.equal(y, inputs.base), kw


def test_density_zero_gives_base(backend):
    inputs = make_inputs((1025,), torch.float32, 2, seed=24, device=device_for(backend))
    y = ties_merge(inputs.base, inputs.tensors, [1.0, 1.0], 0.0, backend=backend)
    assert torch.equal(y, inputs.base)


def test_docstring_example(backend):
    device = device_for(backend)
    b = torch.zeros(4, device=device)
    y = ties_merge(b, [torch.tensor([1.0, -2, 3, 0], device=device), torch.tensor([-1.0, -1, 1, 4], device=device)],
                   None, 0.5, backend=backend)
    assert y.cpu().tolist() == [-1.0, -2.0, 3.0, 4.0]


def test_sign_election_by_hand(backend):
    """Three models at one entry: weighted deltas +3, −1, −1 (sum elects +, count elects −)."""
    device = device_for(backend)
    b = torch.zeros(1, device=device)
    xs = [torch.tensor([3.0], device=device), torch.tensor([-1.0], device=device), torch.tensor([-1.0], device=device)]
    y = lambda **kw: float(ties_merge(b, xs, None, 1.0, backend=backend, **kw))  # noqa: E731
    assert y(sign="sum") == 3.0
    assert y(sign="count") == -1.0
    assert y(sign="count", normalize=False) == -2.0
    assert y(sign="sum", lam=0.5) == 1.5
    # weights change the weighted election but not the unweighted one
    xs_w = [0.25, 1.0, 1.0]  # weighted: +0.75, −1, −1 → sum −1.25 elects −
    assert float(ties_merge(b, xs, xs_w, 1.0, backend=backend)) == -1.0
    assert float(ties_merge(b, xs, xs_w, 1.0, sign_on="unweighted", backend=backend)) == 3.0
    # divisor: Σ a_i w_i vs Σ a_i
    assert float(ties_merge(b, xs, [1.0, 2.0, 2.0], 1.0, sign="count", backend=backend)) == -1.0
    assert float(ties_merge(b, xs, [1.0, 2.0, 2.0], 1.0, sign="count", divisor="count", backend=backend)) == -2.0
    # a zero total elects +: +1, −1 → only the positive one agrees
    y0 = ties_merge(b, [torch.tensor([1.0], device=device), torch.tensor([-1.0], device=device)], None, 1.0,
                    backend=backend)
    assert float(y0) == 1.0


def test_l1_rescale_by_hand(backend):
    """rescale="l1" multiplies the kept entries by ‖δ‖₁ / ‖δ̂‖₁."""
    device = device_for(backend)
    x = torch.tensor([4.0, -1.0, 2.0, 1.0], device=device)
    y = ties_merge(torch.zeros(4, device=device), [x], None, 0.5, rescale="l1", backend=backend)  # keeps 4, 2
    expected = torch.tensor([4.0 * 8 / 6, 0.0, 2.0 * 8 / 6, 0.0])
    assert_verbose_allclose(y.cpu(), expected, 0.0, 1e-6, what="l1 rescale: ‖δ‖₁ = 8, ‖δ̂‖₁ = 6")
    # an all-zero task vector (norm below 1e-7) is left as it is, not divided by zero
    z = ties_merge(torch.zeros(4, device=device), [torch.zeros(4, device=device)], None, 0.5, rescale="l1",
                   backend=backend)
    assert torch.equal(z.cpu(), torch.zeros(4))


def test_many_models_aliases_and_parameters(backend):
    """K = 9 models; the same tensor passed several times (and as the base); nn.Parameters as inputs."""
    inputs = make_inputs((129,), torch.float32, 9, kind="int", seed=25, device=device_for(backend))
    weights = [0.5, -1.0, 1.5, 0.25, 1.0, -0.5, 2.0, 0.75, 1.0]
    for kw in (dict(), dict(sign="count", rescale="l1", tie="threshold")):
        check_call(ties_merge, (inputs.base, inputs.tensors, weights, 0.4), kw, backend, inputs.named,
                   scale=_scale(inputs, weights, 0.4, kw), expected_dtype=torch.float32)
    x = inputs.tensors[0]
    aliased = [inputs.base, x, x]
    check_call(ties_merge, (inputs.base, aliased, [1.0, 0.5, 0.5], 0.5), {}, backend,
               [("base", inputs.base), ("x", x)], scale=_scale(inputs, [1.0, 0.5, 0.5], 0.5, {}))
    params = [torch.nn.Parameter(t.clone()) for t in (inputs.base, *inputs.tensors[:3])]
    y = ties_merge(params[0], params[1:], None, 0.5, backend=backend)
    expected = ties_merge(inputs.base, inputs.tensors[:3], None, 0.5, backend="torch")
    assert_verbose_allclose(y.detach(), expected, *tolerance(torch.float32, 4 * inputs.scale()), what="Parameters")


def test_keep_counts_instead_of_densities(backend):
    device = device_for(backend)
    b = torch.zeros(4, device=device)
    xs = [torch.tensor([1., -2, 3, 0], device=device), torch.tensor([-1., -1, 1, 4], device=device)]
    assert torch.equal(ties_merge(b, xs, None, k=[2, 2], backend=backend), ties_merge(b, xs, None, 0.5, backend=backend))
    assert torch.equal(ties_merge(b, xs, None, k=2, backend=backend), ties_merge(b, xs, None, 0.5, backend=backend))
