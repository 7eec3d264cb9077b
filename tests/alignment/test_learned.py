"""Learned alignment (Sinkhorn re-basin, Git Re-Basin's straight-through estimator): planted permutations
are recovered exactly, the soft relabelling of a spec is exact on one-hot matrices, bad input is named."""

from __future__ import annotations

import copy

import pytest
import torch

from fusion_engine.alignment import apply_permutation, interpolate, sinkhorn_rebasin, ste_rebasin
from fusion_engine.alignment._transport import apply_matrices, one_hot
from fusion_engine.alignment.spec import invert
from fusion_engine.errors import ConfigError

from test_permutation_spec import CASES, outputs


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrix products: one thread is faster and immune to a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", ["mlp", "resnet", "gpt2", "llama_gqa"])
def test_one_hot_matrices_relabel_like_apply_permutation(case):
    make, build, _ = CASES[case]
    model = make()
    spec = build(model)
    sd = model.state_dict()
    perms = spec.random(seed=3)
    hard = apply_permutation(spec, sd, perms)
    soft = apply_matrices(spec, sd, {p: one_hot(t) for p, t in perms.items()})
    for k in spec.param_shapes:
        torch.testing.assert_close(soft[k].to(sd[k].dtype), hard[k], atol=0, rtol=0, msg=lambda m: f"{k}: {m}")


def planted(case, seed=11):
    make, build, inputs = CASES[case]
    torch.manual_seed(1)
    model, x = make(), inputs()
    spec = build(model)
    sd = model.state_dict()
    return model, spec, sd, apply_permutation(spec, sd, spec.random(seed=seed)), x


def assert_restores(spec, model, sd, permuted, found, x):
    restored = apply_permutation(spec, permuted, found)
    assert all(torch.equal(restored[k], sd[k]) for k in sd)
    other = copy.deepcopy(model)
    other.load_state_dict(restored)
    torch.testing.assert_close(outputs(other, x), outputs(model, x), atol=0, rtol=0)


@pytest.mark.parametrize("case", ["mlp", "gpt2", "llama_gqa"])
def test_sinkhorn_rebasin_distance_recovers_a_planted_permutation(case):
    model, spec, sd, permuted, x = planted(case)
    found = sinkhorn_rebasin(spec, model, sd, permuted, objective="distance", steps=60)
    assert_restores(spec, model, sd, permuted, found, x)


def invert_all(perms):
    return {p: invert(t) for p, t in perms.items()}


def classification_batches(x, model, n=2):
    with torch.no_grad():
        y = model(x).argmax(1)
    return [(x[i::n], y[i::n]) for i in range(n)]


def test_ste_recovers_a_planted_permutation():
    model, spec, sd, permuted, _ = planted("mlp")
    x = torch.randn(128, 64, generator=torch.Generator().manual_seed(0))
    found = ste_rebasin(spec, model, sd, permuted, classification_batches(x, model), steps=3, lr=1e-3)
    assert_restores(spec, model, sd, permuted, found, x)


@pytest.mark.parametrize("objective", ["midpoint", "random"])
def test_loss_objectives_lower_the_midpoint_loss(objective):
    """The learned permutations' midpoint (A + π(B))/2 closes most of the gap between the naive midpoint's
    loss on A's labels and the loss of the exact alignment (A itself)."""
    model, spec, sd, permuted, _ = planted("mlp")
    x = 3 * torch.randn(128, 64, generator=torch.Generator().manual_seed(0))  # confident labels
    batches = classification_batches(x, model)
    found = sinkhorn_rebasin(spec, model, sd, permuted, batches, objective=objective, steps=40)

    def midpoint_loss(perms):
        merged = copy.deepcopy(model)
        merged.load_state_dict(interpolate(sd, apply_permutation(spec, permuted, perms), 0.5))
        with torch.no_grad():
            return sum(float(torch.nn.functional.cross_entropy(merged(xb), yb)) for xb, yb in batches)

    exact = midpoint_loss(invert_all(spec.random(seed=11)))
    naive = midpoint_loss(spec.identity())
    assert midpoint_loss(found) - exact < 0.5 * (naive - exact)


def test_inputs_are_not_modified_and_errors():
    model, spec, sd, permuted, x = planted("mlp")
    before = {k: v.clone() for k, v in permuted.items()}
    batches = classification_batches(torch.randn(16, 64), model)
    sinkhorn_rebasin(spec, model, sd, permuted, batches, steps=2)
    assert all(torch.equal(before[k], permuted[k]) for k in before)
    with pytest.raises(ConfigError, match="objective"):
        sinkhorn_rebasin(spec, model, sd, permuted, batches, objective="mid")
    with pytest.raises(ConfigError, match="batches must be"):
        sinkhorn_rebasin(spec, model, sd, permuted, objective="midpoint")
    with pytest.raises(ConfigError, match="tau > 0"):
        sinkhorn_rebasin(spec, model, sd, permuted, batches, tau=0.0)
    with pytest.raises(ConfigError, match="batches must be"):
        ste_rebasin(spec, model, sd, permuted, [torch.randn(4, 64)])
    with pytest.raises(ConfigError, match="nn.Module"):
        ste_rebasin(spec, sd, sd, permuted, batches)
