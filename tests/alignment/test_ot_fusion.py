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


@pytest.mark.parametrize("case", ["gpt2", "llama_gqa", "llama_mha"])
@pytest.mark.parametrize("exact", [True, False])
def test_transformer_fusion_of_a_permuted_copy_is_the_model(case, exact):
    """Residual stream, FFN (exact or entropic) and heads with their per-head dims (exact) are transported
    back: fusing a model with a permuted copy of itself gives the model, outputs included."""
    from test_permutation_spec import CASES as MODELS, outputs

    make, build, inputs = MODELS[case]
    model = make()
    spec = build(model)
    sd = model.state_dict()
    permuted = apply_permutation(spec, sd, spec.random(seed=3))
    fused = ot_fusion([sd, permuted], spec=spec, exact=exact, reg=1e-3)
    for k, v in sd.items():
        torch.testing.assert_close(fused[k], v, atol=1e-6, rtol=1e-6, msg=lambda m: f"{k}: {m}")
    other = copy.deepcopy(model)
    other.load_state_dict(fused)
    x = inputs()
    torch.testing.assert_close(outputs(other, x), outputs(model, x), atol=1e-5, rtol=1e-5)


def test_transformer_fusion_onto_a_narrower_ffn_and_residual():
    """Llama (GQA) fused onto a target with a narrower FFN and residual stream (same heads and head_dim)."""
    transformers = pytest.importorskip("transformers")

    def llama(hidden, ffn, seed):
        cfg = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=8, hidden_size=hidden, intermediate_size=ffn, vocab_size=40,
                                       tie_word_embeddings=False)
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(cfg).eval()

    a, b, narrow = llama(32, 48, 0), llama(32, 48, 1), llama(24, 32, 2)
    from fusion_engine.alignment import transformer_permutation_spec

    fused = ot_fusion([a, b], spec=transformer_permutation_spec(a), target=narrow.state_dict(), reg=0.05)
    narrow.load_state_dict(fused)
    with torch.no_grad():
        assert bool(torch.isfinite(narrow(torch.randint(0, 40, (2, 7))).logits).all())
