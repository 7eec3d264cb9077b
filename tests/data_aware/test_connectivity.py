"""Mode connectivity: interpolation, polychain / Bezier paths, the loss barrier, fitted curves on digits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusion_engine.bench.digits import evaluate, load_digits_split, make_mlp, train_mlp
from fusion_engine.connectivity import Curve, PathScan, fit_curve, interpolate, loss_barrier
from fusion_engine.errors import ConfigError, ShapeMismatchError


def _pair():
    return make_mlp((6,), seed=0, n_in=4, n_out=3), make_mlp((6,), seed=1, n_in=4, n_out=3)


def _sd(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _close(a: dict, b: dict, **kw):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **kw)


def test_interpolate_endpoints_and_midpoint():
    a, b = _pair()
    sa, sb = _sd(a), _sd(b)
    start, end = interpolate(a, b, 0.0), interpolate(a, b, 1.0)
    assert isinstance(start, nn.Module) and start is not a
    for k in sa:
        assert torch.equal(start.state_dict()[k], sa[k])  # exactly the endpoints
        assert torch.equal(end.state_dict()[k], sb[k])
    mid = interpolate(sa, sb, 0.5)  # state dicts in, state dict out
    assert isinstance(mid, dict)
    _close(mid, {k: (sa[k] + sb[k]) / 2 for k in sa})
    quarter = interpolate(sa, sb, 0.25)
    _close(quarter, {k: 0.75 * sa[k] + 0.25 * sb[k] for k in sa})
    _close(_sd(a), sa, rtol=0, atol=0)  # inputs untouched
    _close(_sd(b), sb, rtol=0, atol=0)


def test_interpolate_errors():
    a, b = _pair()
    with pytest.raises(ConfigError, match="t="):
        interpolate(a, b, 1.5)
    with pytest.raises(ShapeMismatchError):
        interpolate(a, make_mlp((7,), n_in=4, n_out=3), 0.5)
    with pytest.raises(ConfigError):
        interpolate(a, [1, 2], 0.5)


@pytest.mark.parametrize("kind", ["polychain", "bezier"])
def test_curves_at_endpoints_and_midpoints(kind):
    a, b = _pair()
    control = make_mlp((6,), seed=2, n_in=4, n_out=3)
    sa, sb, sc = _sd(a), _sd(b), _sd(control)
    curve = Curve(a, b, kind, control)
    for k in sa:
        assert torch.equal(curve.state_at(0.0)[k], sa[k])
        assert torch.equal(curve.state_at(1.0)[k], sb[k])
    if kind == "polychain":
        _close(curve.state_at(0.5), sc, rtol=0, atol=0)  # the bend is the control point
        _close(curve.state_at(0.25), {k: (sa[k] + sc[k]) / 2 for k in sa})
        _close(curve.state_at(0.75), {k: (sc[k] + sb[k]) / 2 for k in sa})
    else:
        _close(curve.state_at(0.5), {k: 0.25 * sa[k] + 0.5 * sc[k] + 0.25 * sb[k] for k in sa})
        t = 0.3
        _close(curve.state_at(t), {k: (1 - t) ** 2 * sa[k] + 2 * t * (1 - t) * sc[k] + t**2 * sb[k] for k in sa})
    # the default control point (the midpoint) makes the curve the straight line
    straight = Curve(a, b, kind)
    for t in (0.1, 0.5, 0.8):
        _close(straight.state_at(t), interpolate(sa, sb, t), atol=1e-6, rtol=1e-5)
    assert isinstance(curve.model_at(0.5), nn.Module)


def test_curve_errors():
    a, b = _pair()
    with pytest.raises(ConfigError, match="kind"):
        Curve(a, b, "spline")
    with pytest.raises(ConfigError, match="control"):
        Curve(a, b, "linear", a)
    with pytest.raises(ConfigError, match="template"):
        Curve(_sd(a), _sd(b)).model_at(0.5)
    with pytest.raises(ConfigError, match="steps"):
        loss_barrier(a, b, lambda m: 0.0, steps=1)
    with pytest.raises(ConfigError, match="number"):
        loss_barrier(a, b, lambda m: None)


def test_barrier_formula_and_self_barrier():
    a, b = _pair()
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(1))

    def loss(model):
        return evaluate(model, x, y).loss

    assert loss_barrier(a, a, loss, steps=21).height == 0.0  # lerp of a model with itself is that model
    scan = loss_barrier(a, b, loss, steps=5)
    assert scan.ts == [0.0, 0.25, 0.5, 0.75, 1.0]
    expected = [loss(interpolate(a, b, t)) for t in scan.ts]
    assert scan.losses == pytest.approx(expected, abs=1e-6)
    excess = [l - ((1 - t) * expected[0] + t * expected[-1]) for t, l in zip(scan.ts, expected)]
    assert scan.height == pytest.approx(max(excess), abs=1e-6)
    assert float(scan) == scan.height
    assert scan.t_max == scan.ts[excess.index(max(excess))]
    # a convex bowl has no barrier: B = 0 at the endpoints, < 0 inside
    bowl = PathScan("linear", [0, 0.5, 1], [1.0, 0.2, 1.0])
    assert bowl.height == 0.0 and bowl.max_loss == 1.0


@pytest.fixture(scope="module")
def digits_pair():
    data = load_digits_split(seed=0)
    a = train_mlp(data, hidden=(32, 32), seed=1, epochs=15)
    b = train_mlp(data, hidden=(32, 32), seed=2, epochs=15)
    return data, a, b


def test_fitted_bezier_lowers_the_max_loss_on_digits(digits_pair):
    data, a, b = digits_pair
    before = [_sd(a), _sd(b)]

    def test_loss(model):
        return evaluate(model, data.x_test, data.y_test).loss

    linear = loss_barrier(a, b, test_loss, steps=11)
    assert linear.height > 0.1  # two independently trained MLPs: a real bump between them
    batches = [(data.x_train[i:i + 64], data.y_train[i:i + 64]) for i in range(0, len(data.y_train), 64)]
    curve = fit_curve(a, b, batches, "bezier", epochs=8, seed=0)
    bezier = curve.scan(test_loss, steps=11)
    assert bezier.max_loss <= linear.max_loss
    assert bezier.height < linear.height / 2
    assert bezier.losses[0] == linear.losses[0] and bezier.losses[-1] == linear.losses[-1]
    _close(_sd(a), before[0], rtol=0, atol=0)
    _close(_sd(b), before[1], rtol=0, atol=0)
    # the same through loss_barrier(kind=..., control=...)
    again = loss_barrier(a, b, test_loss, steps=11, kind="bezier", control=curve.control)
    assert again.losses == bezier.losses


def test_fitted_polychain_and_determinism(digits_pair):
    data, a, b = digits_pair
    batches = [(data.x_train[i:i + 128], data.y_train[i:i + 128]) for i in range(0, 512, 128)]
    one = fit_curve(a, b, batches, "polychain", epochs=3, seed=5)
    two = fit_curve(a, b, batches, "polychain", epochs=3, seed=5)
    _close(one.control, two.control, rtol=0, atol=0)
    mid = interpolate(a, b, 0.5).state_dict()
    assert any(not torch.equal(one.control[k], mid[k]) for k in mid)  # the control point moved
    with pytest.raises(ConfigError, match="kind"):
        fit_curve(a, b, batches, "linear")
    with pytest.raises(ConfigError, match="yielded nothing"):
        fit_curve(a, b, iter(batches), "bezier", epochs=2)
