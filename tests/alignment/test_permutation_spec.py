"""PermutationSpec builders and apply_permutation: permuted models compute the same function."""

from __future__ import annotations

import copy

import pytest
import torch

from fusion_engine.alignment import (
    AxisSlot,
    PermutationSpec,
    apply_permutation,
    mlp_permutation_spec,
    resnet_permutation_spec,
    transformer_permutation_spec,
    vgg_permutation_spec,
)
from fusion_engine.alignment.models import resnet20, vgg
from fusion_engine.bench.digits import make_mlp
from fusion_engine.errors import ConfigError, MissingTensorError, ShapeMismatchError

transformers = pytest.importorskip("transformers")


def randomize_norms(model):
    """Non-trivial BatchNorm statistics and affine parameters, so a wrong permutation shows."""
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)  # away from 0: no near-constant channel
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


def gpt2(n_layer=2):
    cfg = transformers.GPT2Config(n_layer=n_layer, n_head=4, n_embd=32, n_positions=16, vocab_size=40,
                                  tie_word_embeddings=False)
    torch.manual_seed(0)
    return jitter(transformers.GPT2LMHeadModel(cfg)).eval()


def llama(n_kv=2, n_layer=2):
    cfg = transformers.LlamaConfig(num_hidden_layers=n_layer, num_attention_heads=4, num_key_value_heads=n_kv,
                                   hidden_size=32, intermediate_size=48, vocab_size=40, tie_word_embeddings=False,
                                   attention_bias=True)
    torch.manual_seed(0)
    return jitter(transformers.LlamaForCausalLM(cfg)).eval()


def jitter(model):
    """Random perturbation of every parameter (HF init leaves norms at 1 and biases at 0)."""
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def outputs(model, x):
    with torch.no_grad():
        y = model(x)
    return y.logits if hasattr(y, "logits") else y


CASES = {
    "mlp": (lambda: make_mlp((24, 16), seed=0).eval(), mlp_permutation_spec, lambda: torch.randn(5, 64)),
    "vgg": (lambda: randomize_norms(vgg(seed=0, image_size=16)), vgg_permutation_spec,
            lambda: torch.randn(2, 3, 16, 16)),
    "resnet": (lambda: randomize_norms(resnet20(1, seed=0)), resnet_permutation_spec,
               lambda: torch.randn(2, 3, 8, 8)),
    "gpt2": (gpt2, transformer_permutation_spec, lambda: torch.randint(0, 40, (2, 9))),
    "llama_gqa": (llama, transformer_permutation_spec, lambda: torch.randint(0, 40, (2, 9))),
    "llama_mha": (lambda: llama(n_kv=4), transformer_permutation_spec, lambda: torch.randint(0, 40, (2, 9))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_permuted_model_computes_the_same_function(case):
    make, build, inputs = CASES[case]
    torch.manual_seed(1)
    model, x = make(), inputs()
    spec = build(model)
    sd = model.state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    permuted = apply_permutation(spec, sd, spec.random(seed=3))
    assert all(torch.equal(sd[k], before[k]) for k in sd), "input state dict was modified"
    changed = [k for k in spec.param_shapes if not torch.equal(permuted[k], sd[k])]
    assert len(changed) >= len(spec.param_shapes) - 2, "most permuted tensors must change"
    other = copy.deepcopy(model)
    other.load_state_dict(permuted)
    torch.testing.assert_close(outputs(other, x), outputs(model, x), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_every_single_permutation_preserves_the_function(case):
    """Each permutation alone: catches a slot missing from one permutation that another would hide."""
    make, build, inputs = CASES[case]
    torch.manual_seed(1)
    model, x = make(), inputs()
    spec = build(model)
    ref = outputs(model, x)
    rnd = spec.random(seed=7)
    other = copy.deepcopy(model)
    names = list(spec.perm_sizes)
    names = names if len(names) <= 8 else [p for p in names if "res" in p] + names[-2:]  # keep ResNet's time down
    for p in names:
        perms = spec.identity()
        perms[p] = rnd[p]
        other.load_state_dict(apply_permutation(spec, model.state_dict(), perms))
        torch.testing.assert_close(outputs(other, x), ref, atol=2e-5, rtol=1e-5, msg=lambda m: f"{p}: {m}")


def test_dropping_a_slot_breaks_the_function():
    """The test above can fail: a spec that forgets the next layer's input axis changes the outputs."""
    model, x = make_mlp((24, 16), seed=0).eval(), torch.randn(5, 64)
    spec = mlp_permutation_spec(model)
    broken = PermutationSpec(spec.perm_sizes, {p: s[:-1] if p == "P_0" else s for p, s in spec.slots.items()},
                             spec.param_shapes)
    other = copy.deepcopy(model)
    other.load_state_dict(apply_permutation(broken, model.state_dict(), spec.random(seed=1)))
    assert not torch.allclose(outputs(other, x), outputs(model, x), atol=1e-3)


def test_mlp_spec_layout():
    spec = mlp_permutation_spec(make_mlp((24, 16), seed=0))
    assert spec.perm_sizes == {"P_0": 24, "P_2": 16}
    assert spec.axes_to_perm["0.weight"] == ("P_0", None)
    assert spec.axes_to_perm["2.weight"] == ("P_2", "P_0")
    assert spec.axes_to_perm["4.weight"] == (None, "P_2")
    assert spec.perm_to_axes["P_2"] == [("2.weight", 0), ("2.bias", 0), ("4.weight", 1)]
    assert spec.activation_sites == {"P_0": ("0",), "P_2": ("2",)}


def test_resnet_spec_shares_the_residual_stream():
    spec = resnet_permutation_spec(resnet20(1))
    residual = [p for p in spec.perm_sizes if p.startswith("P_res")]
    assert residual == ["P_res0", "P_res1", "P_res2"]
    writers = {s.param for s in spec.slots["P_res0"] if s.axis == 0 and s.param.endswith("conv2.weight")}
    assert writers == {f"layer1.{b}.conv2.weight" for b in range(3)}
    assert spec.axes_to_perm["layer2.0.shortcut.0.weight"] == ("P_res1", "P_res0", None, None)
    assert spec.axes_to_perm["fc.weight"] == (None, "P_res2")
    assert len(spec.perm_sizes) == 3 + 9  # 3 residual streams, one inner permutation per block


def test_transformer_spec_names():
    spec = transformer_permutation_spec(gpt2(1))
    assert set(spec.perm_sizes) == {"residual", "layers.0.qk_dims", "layers.0.v_dims", "layers.0.heads",
                                    "layers.0.ffn"}
    assert spec.perm_shape("layers.0.v_dims") == (4, 8)
    assert spec.axes_to_perm["transformer.h.0.attn.c_attn.weight"][1] == (
        "layers.0.qk_dims", "layers.0.v_dims", "layers.0.heads")
    spec = transformer_permutation_spec(llama(n_kv=2, n_layer=1))
    assert "layers.0.qk_dims" not in spec.perm_sizes  # rotary embeddings: no within-head Q/K permutation
    assert spec.perm_sizes["layers.0.heads"] == 2  # key/value heads (GQA groups)
    assert spec.axes_to_perm["model.norm.weight"] == ("residual",)
    assert spec.axes_to_perm["lm_head.weight"] == (None, "residual")


def test_transformer_spec_from_state_dict_needs_sizes():
    sd = gpt2(1).state_dict()
    with pytest.raises(ConfigError, match="n_layers"):
        transformer_permutation_spec(sd)
    spec = transformer_permutation_spec(sd, n_layers=1, n_heads=4, permute_head_dims=False)
    assert set(spec.perm_sizes) == {"residual", "layers.0.heads", "layers.0.ffn"}


def test_errors_name_the_problem():
    model = make_mlp((8,), seed=0)
    spec = mlp_permutation_spec(model)
    sd = model.state_dict()
    with pytest.raises(MissingTensorError, match="P_0"):
        apply_permutation(spec, sd, {})
    with pytest.raises(ConfigError, match="not a permutation"):
        apply_permutation(spec, sd, {"P_0": torch.zeros(8, dtype=torch.long)})
    with pytest.raises(ShapeMismatchError, match="shape"):
        apply_permutation(spec, sd, {"P_0": torch.arange(7)})
    with pytest.raises(MissingTensorError, match="0.weight"):
        apply_permutation(spec, {k: v for k, v in sd.items() if k != "0.weight"}, spec.identity())
    with pytest.raises(ConfigError, match="overruns"):
        PermutationSpec({"P": 9}, {"P": (AxisSlot("w", 0),)}, {"w": (8, 3)})
