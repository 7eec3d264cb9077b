"""zipit: greedy matching, merge/unmerge matrices, full and partial zips of MLPs and ResNets."""

from __future__ import annotations

import copy

import pytest
import torch

from fusion_engine.alignment import (
    PartialZip,
    apply_permutation,
    greedy_feature_matching,
    merge_unmerge,
    mlp_permutation_spec,
    resnet_permutation_spec,
    zipit,
)
from fusion_engine.alignment.models import resnet20
from fusion_engine.bench.digits import make_mlp
from fusion_engine.errors import ConfigError

from test_permutation_spec import randomize_norms


def sequential_greedy(corr, within=True):
    """One pair at a time: the definition the round-based implementation must reproduce."""
    size = corr.shape[0]
    n = size // 2
    s = corr.clone().double()
    s.fill_diagonal_(float("-inf"))
    if not within:
        own = torch.arange(size) // n
        s[own[:, None] == own[None, :]] = float("-inf")
    pairs = []
    for _ in range(n):
        i, j = divmod(int(s.argmax()), size)
        pairs.append(tuple(sorted((i, j))))
        s[[i, j], :] = float("-inf")
        s[:, [i, j]] = float("-inf")
    return sorted(pairs)


@pytest.mark.parametrize("within", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_greedy_rounds_equal_one_at_a_time_greedy(seed, within):
    x = torch.randn(40, 14, generator=torch.Generator().manual_seed(seed))
    corr = torch.corrcoef(x.T)
    got = sorted(tuple(sorted(p)) for p in greedy_feature_matching(corr, within_model=within).tolist())
    assert got == sequential_greedy(corr, within)


def test_merge_unmerge_matrices():
    m, u = merge_unmerge(torch.tensor([[0, 3], [1, 2]]), 2)
    torch.testing.assert_close(m, torch.tensor([[0.5, 0, 0, 0.5], [0, 0.5, 0.5, 0]], dtype=torch.float64))
    torch.testing.assert_close(m @ u, torch.eye(2, dtype=torch.float64))


@pytest.mark.parametrize("arch", ["mlp", "resnet"])
def test_zipping_a_permuted_copy_reproduces_the_model(arch):
    if arch == "mlp":
        model, x = make_mlp((24, 16), seed=0).eval(), torch.randn(64, 64)
        spec = mlp_permutation_spec(model)
    else:
        model, x = randomize_norms(resnet20(1, seed=0)), torch.randn(8, 3, 16, 16)
        spec = resnet_permutation_spec(model)
    other = copy.deepcopy(model)
    other.load_state_dict(apply_permutation(spec, model.state_dict(), spec.random(seed=1)))
    zipped = zipit(model, other, [x], spec=spec, within_model=False)
    with torch.no_grad():
        torch.testing.assert_close(zipped(x), model(x), atol=1e-4, rtol=1e-4)


def test_partial_zip_shares_the_trunk():
    a, b = make_mlp((24, 16), seed=1).eval(), make_mlp((24, 16), seed=2).eval()
    x = torch.randn(64, 64)
    part = zipit(a, b, [x], stop_at="P_0")
    assert isinstance(part, PartialZip)
    h0, h1 = part.heads
    torch.testing.assert_close(h0[0].weight, h1[0].weight)  # zipped first layer
    assert not torch.allclose(h0[2].weight, h1[2].weight)  # each head keeps its own second layer
    assert h0[2].weight.shape == a[2].weight.shape


def test_partial_zip_of_a_resnet_at_a_stage_boundary():
    a, b = randomize_norms(resnet20(1, seed=1)), randomize_norms(resnet20(1, seed=2))
    x = torch.randn(4, 3, 8, 8)
    spec = resnet_permutation_spec(a)
    order = list(spec.layer_order)
    stage1 = order.index("P_res1") - 1  # everything before the second stage's residual stream
    part = zipit(a, b, [x], stop_at=order[stage1])
    h0, h1 = part.heads
    torch.testing.assert_close(h0.layer1[2].conv2.weight, h1.layer1[2].conv2.weight)
    with torch.no_grad():
        assert part(x).shape == (4, 10)
    with pytest.raises(ConfigError, match="layer boundary"):
        zipit(a, b, [x], stop_at="P_res0")


@pytest.mark.parametrize("case", ["gpt2", "llama_gqa", "llama_mha"])
def test_transformer_zip_of_a_permuted_copy_is_the_model(case):
    """Residual stream and FFN zipped by greedy matching, heads and per-head value dims one to one across
    the models (GPT-2's query/key dims are kept, so they are planted as identities): zipping a model with a
    permuted copy of itself gives the model back, outputs included."""
    from fusion_engine.alignment import apply_permutation

    from test_permutation_spec import CASES as MODELS, outputs

    make, build, inputs = MODELS[case]
    model = make()
    spec = build(model)
    true = spec.random(seed=4)
    true.update({p: t.sort(-1).values for p, t in true.items() if p.endswith("qk_dims")})
    other = copy.deepcopy(model)
    other.load_state_dict(apply_permutation(spec, model.state_dict(), true))
    torch.manual_seed(0)
    zipped = zipit(model, other, [inputs(), inputs()], spec=spec)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(zipped.state_dict()[k], v, atol=1e-6, rtol=1e-6, msg=lambda m: f"{k}: {m}")
    x = inputs()
    torch.testing.assert_close(outputs(zipped, x), outputs(model, x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="zipped whole"):
        zipit(model, other, [inputs()], spec=spec, stop_at=1)
