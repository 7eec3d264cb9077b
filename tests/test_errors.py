"""Errors: every mistake a user can make raises a FusionEngineError subclass whose message names the
tensor or parameter; NaN/Inf inputs are reported by name on every backend (the flag comes from the
kernels), or propagate when check_finite=False."""

import math

import pytest
import torch

import fusion_engine as fe
from fusion_engine.errors import (
    BackendUnavailableError,
    CheckpointError,
    ConfigError,
    DeviceMismatchError,
    DTypeMismatchError,
    FusionEngineError,
    MissingTensorError,
    NonFiniteError,
    ShapeMismatchError,
)
from fusion_engine.ops import dare_merge, fisher_merge, linear_merge, magnitude_mask, task_arithmetic, ties_merge
from utils import device_for, skip_unless_kernel

OPS = ("linear_merge", "task_arithmetic", "ties_merge", "dare_merge", "fisher_merge", "magnitude_mask")


def call(op, tensors=None, *, base=None, weights="default", density=0.5, fishers=None, backend="torch", **kw):
    """Call ``op`` with valid arguments except for what the test overrides."""
    n = 4
    tensors = [torch.ones(n), 2 * torch.ones(n)] if tensors is None else tensors
    base = torch.zeros(n) if base is None else base
    if weights == "default":
        weights = [1.0] * len(tensors) if isinstance(tensors, list) else None
    if op == "linear_merge":
        return linear_merge(tensors, weights, backend=backend, **kw)
    if op == "task_arithmetic":
        return task_arithmetic(base, tensors, weights, backend=backend, **kw)
    if op == "ties_merge":
        return ties_merge(base, tensors, weights, density, backend=backend, **kw)
    if op == "dare_merge":
        kw.setdefault("seed", 0)
        return dare_merge(base, tensors, weights, density, backend=backend, **kw)
    if op == "fisher_merge":
        fishers = [torch.ones_like(t) if isinstance(t, torch.Tensor) else torch.ones(n) for t in tensors] \
            if fishers is None else fishers
        return fisher_merge(tensors, fishers, weights, backend=backend, **kw)
    if op == "magnitude_mask":
        return magnitude_mask(tensors[0], density, backend=backend, **kw)
    raise AssertionError(op)


def raises(exc, *fragments):
    """pytest.raises that also checks the message names every fragment."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(exc)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *args):
            handled = self.ctx.__exit__(*args)
            message = str(self.info.value)
            for fragment in fragments:
                assert fragment in message, f"{exc.__name__} message {message!r} does not name {fragment!r}"
            assert isinstance(self.info.value, FusionEngineError)
            return handled

    return _Check()


def test_hierarchy():
    for cls, builtin in ((ConfigError, ValueError), (ShapeMismatchError, ValueError), (DTypeMismatchError, TypeError),
                         (DeviceMismatchError, ValueError), (MissingTensorError, KeyError), (NonFiniteError, ValueError),
                         (BackendUnavailableError, RuntimeError), (CheckpointError, Exception)):
        assert issubclass(cls, FusionEngineError) and issubclass(cls, builtin)
        assert getattr(fe, cls.__name__) is cls
    assert str(MissingTensorError("model 1 has no tensor 'w'")) == "model 1 has no tensor 'w'"  # not KeyError-quoted


# ----------------------------------------------------------------------------------------------
# shapes, dtypes, devices, lists


@pytest.mark.parametrize("op", OPS[:5])
def test_shape_mismatch_names_tensor(op):
    with raises(ShapeMismatchError, "tensors[1]", "(5,)", "(4,)"):
        call(op, [torch.ones(4), torch.ones(5)])


@pytest.mark.parametrize("op", ["task_arithmetic", "ties_merge", "dare_merge"])
def test_base_shape_mismatch(op):
    with raises(ShapeMismatchError, "tensors[0]", "base"):
        call(op, base=torch.zeros(2, 2))


@pytest.mark.parametrize("op", OPS[:5])
def test_dtype_mismatch_names_tensor(op):
    with raises(DTypeMismatchError, "tensors[1]", "float16"):
        call(op, [torch.ones(4), torch.ones(4, dtype=torch.float16)])


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8, torch.complex64], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_non_float_tensors(op, dtype):
    name = "x" if op == "magnitude_mask" else "tensors[0]"
    with raises(DTypeMismatchError, name, str(dtype)):
        call(op, [torch.ones(4, dtype=dtype), torch.ones(4, dtype=dtype)])
    if op in ("task_arithmetic", "ties_merge", "dare_merge"):
        with raises(DTypeMismatchError, "base"):
            call(op, base=torch.zeros(4, dtype=dtype))


@pytest.mark.parametrize("op", OPS[:5])
def test_device_mismatch(op):
    with raises(DeviceMismatchError, "tensors[1]", "meta"):
        call(op, [torch.ones(4), torch.empty(4, device="meta")])


@pytest.mark.parametrize("op", OPS[:5])
def test_empty_list(op):
    with raises(ConfigError, "empty"):
        call(op, [])


@pytest.mark.parametrize("op", OPS[:5])
def test_one_tensor_instead_of_a_list(op):
    with raises(ConfigError, "list"):
        call(op, torch.ones(4), weights=None)


@pytest.mark.parametrize("op", OPS[:5])
def test_not_a_tensor(op):
    with raises(ConfigError, "tensors[1]", "list"):
        call(op, [torch.ones(4), [1.0, 2.0, 3.0, 4.0]])


# ----------------------------------------------------------------------------------------------
# parameters


@pytest.mark.parametrize("op", OPS[:5])
@pytest.mark.parametrize("weights", [[1.0], [1.0, 2.0, 3.0]], ids=["too_few", "too_many"])
def test_wrong_weight_count(op, weights):
    with raises(ConfigError, "weights", f"{len(weights)}"):
        call(op, weights=weights)


@pytest.mark.parametrize("op", OPS[:5])
def test_non_finite_weight(op):
    with raises(ConfigError, "weights[1]"):
        call(op, weights=[1.0, math.nan])


@pytest.mark.parametrize("op", ["ties_merge", "dare_merge", "magnitude_mask"])
@pytest.mark.parametrize("density", [-0.1, 1.5, math.nan, math.inf], ids=str)
def test_density_outside_unit_interval(op, density):
    with raises(ConfigError, "density"):
        call(op, density=density)


@pytest.mark.parametrize("op", ["ties_merge", "dare_merge"])
def test_per_model_density_named(op):
    with raises(ConfigError, "density[1]", "1.2"):
        call(op, density=[0.5, 1.2])
    with raises(ConfigError, "density"):
        call(op, density=[0.5, 0.5, 0.5])


@pytest.mark.parametrize("op, name, value", [
    ("ties_merge", "sign", "majority"), ("ties_merge", "sign", "total"), ("ties_merge", "sign_on", "both"),
    ("ties_merge", "divisor", "sum"), ("ties_merge", "rescale", "density"), ("ties_merge", "rescale", True),
    ("ties_merge", "tie", "random"), ("magnitude_mask", "tie", "lowest"),
    ("dare_merge", "consensus", "majority"), ("dare_merge", "rescale", "l2"), ("dare_merge", "sign_on", "x"),
    ("dare_merge", "divisor", "weights_sum"),
])
def test_bad_choice(op, name, value):
    with raises(ConfigError, name, repr(value)):
        call(op, **{name: value})


@pytest.mark.parametrize("name, value", [
    ("seed", -1), ("seed", 2**64), ("seed", 1.5), ("seed", "1"), ("seed", None),
    ("stream", -1), ("stream", 2**32), ("stream", 0.5),
    ("offset", -1), ("offset", 1.5),
])
def test_bad_seed_stream_offset(name, value):
    with raises(ConfigError, name):
        call("dare_merge", **{name: value})


def test_dare_seed_is_required():
    with pytest.raises(TypeError):
        dare_merge(torch.zeros(4), [torch.ones(4)], None, 0.5)


@pytest.mark.parametrize("op", OPS[:5])
def test_bad_out_dtype(op):
    with raises(DTypeMismatchError, "out_dtype"):
        call(op, out_dtype=torch.int32)


def test_linear_normalize_weights_summing_to_zero():
    with raises(ConfigError, "sum", "normalize=False"):
        linear_merge([torch.ones(4), torch.ones(4)], [1.0, -1.0])
    assert torch.equal(linear_merge([torch.ones(4), torch.ones(4)], [1.0, -1.0], normalize=False), torch.zeros(4))


def test_fisher_specific():
    xs = [torch.ones(4), torch.ones(4)]
    with raises(ConfigError, "fishers", "1", "2"):
        fisher_merge(xs, [torch.ones(4)])
    with raises(ShapeMismatchError, "fishers", "(5,)"):
        fisher_merge(xs, [torch.ones(5), torch.ones(5)])
    with raises(ShapeMismatchError, "fishers[1]"):
        fisher_merge(xs, [torch.ones(4), torch.ones(5)])
    with raises(DTypeMismatchError, "fishers", "float16"):
        fisher_merge(xs, [torch.ones(4, dtype=torch.float16)] * 2)
    with raises(DTypeMismatchError, "fishers[0]"):
        fisher_merge(xs, [torch.ones(4, dtype=torch.int64)] * 2)
    with raises(ConfigError, "eps"):
        fisher_merge(xs, [torch.ones(4)] * 2, eps=-1.0)
    with raises(ConfigError, "fishers", "empty"):
        fisher_merge(xs, [])


# ----------------------------------------------------------------------------------------------
# NaN / Inf: reported by name on every backend, propagated on request

FINITE_CASES = [
    # (op, which input is poisoned, its name in the message)
    ("linear_merge", ("tensors", 1), "tensors[1]"),
    ("task_arithmetic", ("tensors", 1), "tensors[1]"),
    ("task_arithmetic", ("base", None), "base"),
    ("ties_merge", ("tensors", 1), "tensors[1]"),
    ("ties_merge", ("base", None), "base"),
    ("dare_merge", ("tensors", 1), "tensors[1]"),
    ("dare_merge", ("base", None), "base"),
    ("fisher_merge", ("tensors", 1), "tensors[1]"),
    ("fisher_merge", ("fishers", 0), "fishers[0]"),
    ("magnitude_mask", ("tensors", 0), "x"),
]


def _poisoned(op, where, bad_value, n, position, device):
    gen = torch.Generator().manual_seed(n)
    tensors = [torch.randn(n, generator=gen).to(device) for _ in range(2)]
    base = torch.randn(n, generator=gen).to(device)
    fishers = [torch.rand(n, generator=gen).to(device) for _ in range(2)]
    group, index = where
    target = {"tensors": tensors, "fishers": fishers}.get(group)
    if group == "base":
        base[position] = bad_value
    else:
        target[index][position] = bad_value
    return dict(tensors=tensors, base=base, fishers=fishers)


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("op, where, name", FINITE_CASES, ids=[f"{c[0]}-{c[2]}" for c in FINITE_CASES])
def test_non_finite_input_is_reported(backend, op, where, name, bad_value):
    """The kernels' non-finite flag names the input; anywhere in the tensor (first, middle, last entry;
    the last one in a SIMD/block tail)."""
    skip_unless_kernel(op, backend)
    n = 4099 if backend == "triton" else 100_003
    device = device_for(backend)
    for position in (0, n // 2 + 1, n - 1):
        args = _poisoned(op, where, bad_value, n, position, device)
        with raises(NonFiniteError, name, "check_finite=False"):
            call(op, args["tensors"], base=args["base"], fishers=args["fishers"], density=1.0, backend=backend)


PROPAGATE_CASES = [
    (op, where, name, extra)
    for op, where, name in FINITE_CASES if op != "magnitude_mask"
    for extra in {"ties_merge": ({}, {"sign": "count"}),
                  "dare_merge": ({}, {"consensus": "sum"}, {"consensus": "count"})}.get(op, ({},))
]


@pytest.mark.parametrize("op, where, name, extra", PROPAGATE_CASES,
                         ids=[f"{c[0]}-{c[2]}-{'-'.join(map(str, c[3].values())) or 'default'}" for c in PROPAGATE_CASES])
def test_non_finite_propagates_when_asked(backend, op, where, name, extra):
    """check_finite=False: no error, and the poisoned entry comes out non-finite (density 1: nothing dropped),
    as in the reference (a NaN task vector entry poisons the sign election and the sum)."""
    skip_unless_kernel(op, backend)
    n, position = 1025, 700
    args = _poisoned(op, where, math.nan, n, position, device_for(backend))
    y = call(op, args["tensors"], base=args["base"], fishers=args["fishers"], density=1.0, backend=backend,
             check_finite=False, **extra).cpu()
    assert not math.isfinite(float(y[position])), f"{name}'s NaN did not propagate: y[{position}] = {float(y[position])}"
    others = torch.cat([y[:position], y[position + 1:]])
    assert bool(torch.isfinite(others).all()), "a NaN leaked into other entries"


def test_magnitude_mask_check_finite_false(backend):
    skip_unless_kernel("magnitude_mask", backend)
    x = torch.randn(1025, generator=torch.Generator().manual_seed(0)).to(device_for(backend))
    x[3] = math.nan
    mask = magnitude_mask(x, 0.5, check_finite=False, backend=backend)
    assert mask.dtype == torch.bool and mask.shape == x.shape


def test_non_finite_in_a_view_is_found_by_name():
    """A NaN inside a non-contiguous view is reported; one in storage outside the view is not."""
    storage = torch.ones(4, 8)
    storage[:, 1::2] = math.nan  # outside the view below
    view = storage[:, ::2]
    assert torch.equal(linear_merge([view, view], backend="torch"), torch.ones(4, 4))
    storage[2, 4] = math.inf
    with raises(NonFiniteError, "tensors[0]", "tensors[1]"):
        linear_merge([view, view], backend="torch")
