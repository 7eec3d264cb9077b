"""activation_matching: a permuted copy is matched back exactly; statistics are streamed over batches."""

from __future__ import annotations

import copy

import pytest
import torch

from fusion_engine.alignment import (
    activation_matching,
    apply_permutation,
    mlp_permutation_spec,
    resnet_permutation_spec,
    unit_statistics,
    vgg_permutation_spec,
)
from fusion_engine.alignment.models import resnet20, vgg
from fusion_engine.alignment.spec import invert
from fusion_engine.bench.digits import make_mlp
from fusion_engine.errors import ConfigError

from test_permutation_spec import randomize_norms

CASES = {
    "mlp": (lambda: make_mlp((24, 16), seed=0).eval(), mlp_permutation_spec, lambda: torch.randn(64, 64)),
    "vgg": (lambda: randomize_norms(vgg(seed=0, image_size=8)), vgg_permutation_spec, lambda: torch.randn(48, 3, 8, 8)),
    "resnet": (lambda: randomize_norms(resnet20(1, seed=0)), resnet_permutation_spec, lambda: torch.randn(8, 3, 16, 16)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_recovers_the_permutation_of_a_copy(case):
    make, build, inputs = CASES[case]
    torch.manual_seed(0)
    model = make()
    spec = build(model)
    true = spec.random(seed=4)
    other = copy.deepcopy(model)
    other.load_state_dict(apply_permutation(spec, model.state_dict(), true))
    batches = [inputs(), inputs()]
    found = activation_matching(spec, model, other, batches)
    for p in spec.perm_sizes:
        torch.testing.assert_close(found[p], invert(true[p]), msg=lambda m: f"{p}: {m}")


def test_streamed_statistics_equal_one_big_batch():
    model = make_mlp((8,), seed=0).eval()
    spec = mlp_permutation_spec(model)
    x = torch.randn(30, 64)
    one = unit_statistics(spec, [model, model], [x])["P_0"]
    streamed = unit_statistics(spec, [model, model], [x[:7], x[7:20], x[20:]])["P_0"]
    assert streamed.count == one.count == 30
    torch.testing.assert_close(streamed.correlation(), one.correlation())
    acts = model[0](x).double()  # the site of P_0 is the layer itself (pre-activation)
    torch.testing.assert_close(one.block(one.correlation(), 0, 1), torch.corrcoef(acts.T), atol=1e-6, rtol=1e-6)


def test_errors():
    model = make_mlp((8,), seed=0)
    with pytest.raises(ConfigError, match="activation sites"):
        activation_matching(mlp_permutation_spec(model.state_dict()), model, model, [torch.randn(3, 64)])
    with pytest.raises(ConfigError, match="empty"):
        activation_matching(mlp_permutation_spec(model), model, model, [])


@pytest.mark.parametrize("case, head_dims", [("gpt2", True), ("llama_gqa", True), ("llama_mha", True),
                                             ("llama_gqa", False)])
def test_transformer_heads_dims_ffn_residual_are_recovered(case, head_dims):
    """Every permutation group of a transformer (residual, heads with GQA groups, per-head value dims,
    FFN) is matched back exactly; GPT-2's query/key dims, which activation matching leaves alone, are
    planted as identities."""
    from test_permutation_spec import CASES as MODELS, outputs

    make, build, inputs = MODELS[case]
    model = make()
    spec = build(model, permute_head_dims=head_dims)
    true = spec.random(seed=4)
    true.update({p: t.sort(-1).values for p, t in true.items() if p.endswith("qk_dims")})
    permuted = apply_permutation(spec, model.state_dict(), true)
    other = copy.deepcopy(model)
    other.load_state_dict(permuted)
    torch.manual_seed(0)
    found = activation_matching(spec, model, other, [inputs(), inputs()])
    restored = apply_permutation(spec, permuted, found)
    assert all(torch.equal(restored[k], v) for k, v in model.state_dict().items())
    other.load_state_dict(restored)
    x = inputs()
    torch.testing.assert_close(outputs(other, x), outputs(model, x), atol=0, rtol=0)
