"""ot_fusion: exact OT undoes a permutation; entropic OT approaches it as reg → 0; validation."""

from __future__ import annotations

import copy

import pytest
import torch

from fusion_engine.alignment import apply_permutation, mlp_permutation_spec, ot_fusion, vgg_permutation_spec
from fusion_engine.alignment.models import vgg
from fusion_engine.bench.digits import make_mlp
from fusion_engine.errors import ConfigError

from test_permutation_spec import randomize_norms


@pytest.mark.parametrize("mode", ["weights", "activations"])
def test_fusing_a_permuted_copy_returns_the_model(mode):
    model = make_mlp((24, 16), seed=0).eval()
    spec = mlp_permutation_spec(model)
    other = copy.deepcopy(model)
    other.load_state_dict(apply_permutation(spec, model.state_dict(), spec.random(seed=2)))
    fused = ot_fusion([model, other], spec=spec, mode=mode, exact=True, batches=[torch.randn(50, 64)])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fused[k], v, msg=lambda m: f"{k}: {m}")


def test_exact_on_a_cnn_with_flatten():
    model = randomize_norms(vgg(seed=0, image_size=8))
    spec = vgg_permutation_spec(model)
    other = copy.deepcopy(model)
    other.load_state_dict(apply_permutation(spec, model.state_dict(), spec.random(seed=2)))
    fused = ot_fusion([model, other], spec=spec, exact=True)
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(fused[k], v, msg=lambda m: f"{k}: {m}")


def test_entropic_approaches_exact_and_blurs_with_large_reg():
    a, b = make_mlp((16,), seed=1), make_mlp((16,), seed=2)
    exact = ot_fusion([a, b], exact=True)
    small = ot_fusion([a, b], reg=1e-3)
    large = ot_fusion([a, b], reg=10.0)
    err_small = (small["0.weight"] - exact["0.weight"]).abs().max()
    err_large = (large["0.weight"] - exact["0.weight"]).abs().max()
    assert err_small < 5e-3 < 5e-2 < err_large


def test_target_of_another_width_and_importance_histograms():
    a, b = make_mlp((16, 12), seed=1), make_mlp((16, 12), seed=2)
    target = make_mlp((10, 8), seed=3).state_dict()
    fused = ot_fusion([a, b], target=target, reg=0.05, histogram="importance")
    assert {k: tuple(v.shape) for k, v in fused.items()} == {k: tuple(v.shape) for k, v in target.items()}
    assert all(torch.isfinite(v).all() for v in fused.values())


def test_validation():
    a, b = make_mlp((16,), seed=1), make_mlp((16,), seed=2)
    with pytest.raises(ConfigError, match="equal widths"):
        ot_fusion([a, b], target=make_mlp((8,), seed=3).state_dict(), exact=True)
    with pytest.raises(ConfigError, match="mode"):
        ot_fusion([a, b], mode="gradients")
    with pytest.raises(ConfigError, match="at least two"):
        ot_fusion([a])
    with pytest.raises(ConfigError, match="batches"):
        ot_fusion([a, b], mode="activations")
