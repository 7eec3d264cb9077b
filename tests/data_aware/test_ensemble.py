"""Output ensembles: the vmapped path equals the loop, the four modes, and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusion_engine.bench.digits import make_mlp
from fusion_engine.ensemble import Ensemble
from fusion_engine.errors import ConfigError

X = torch.randn(13, 6, generator=torch.Generator().manual_seed(0))


def _models(seeds, hidden=(9,)):
    return [make_mlp(hidden, seed=s, n_in=6, n_out=5).eval() for s in seeds]


def _count_calls(model):
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("mode, weights", [("mean", None), ("weighted", [0.5, 2.0, 1.0, 0.25]), ("vote", None),
                                           ("vote", [3.0, 1.0, 1.0, 1.0]), ("max", None)])
def test_vmap_path_equals_loop_path(mode, weights):
    models = _models(range(4))
    batched = Ensemble(models, mode, weights)
    looped = Ensemble(models, mode, weights, batched=False)
    assert batched.groups == [[0, 1, 2, 3]]
    second = _count_calls(models[1])
    out = batched(X)
    assert second == []  # models[1] was never called: the group ran as one vmapped forward
    reference = looped(X)
    assert len(second) == 1
    torch.testing.assert_close(batched.member_outputs(X), looped.member_outputs(X), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-5)


def test_mixed_architectures_group_and_keep_order():
    models = _models([0, 1], (9,)) + _models([2], (7,)) + _models([3], (9,)) + _models([4], (7,)) + _models([5], (4,))
    ens = Ensemble(models, "mean")
    assert ens.groups == [[0, 1, 3], [2, 4], [5]]
    stacked = ens.member_outputs(X)
    for i, m in enumerate(models):
        torch.testing.assert_close(stacked[i], m(X), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ens(X), Ensemble(models, "mean", batched=False)(X), atol=1e-6, rtol=1e-5)


def test_modes_match_their_formulas():
    models = _models(range(3))
    outs = torch.stack([m(X) for m in models])
    torch.testing.assert_close(Ensemble(models, "mean")(X), outs.mean(0), atol=1e-6, rtol=1e-5)
    w = torch.tensor([1.0, 2.0, 5.0])
    torch.testing.assert_close(Ensemble(models, "weighted", w)(X), (w[:, None, None] * outs).sum(0) / w.sum(),
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(Ensemble(models, "max")(X), outs.max(0).values, atol=1e-6, rtol=1e-5)
    votes = Ensemble(models, "vote")(X)
    assert votes.shape == (len(X), 5)
    torch.testing.assert_close(votes.sum(-1), torch.ones(len(X)))
    predictions = outs.argmax(-1)  # [3, n]
    for n in range(len(X)):
        counts = torch.bincount(predictions[:, n], minlength=5).float() / 3
        torch.testing.assert_close(votes[n], counts)
    # a weighted vote where model 2 outweighs the others together follows model 2
    assert torch.equal(Ensemble(models, "vote", [1.0, 1.0, 3.0])(X).argmax(-1), predictions[2])


def test_batched_path_sees_in_place_updates():
    models = _models(range(3))
    ens = Ensemble(models, "mean")
    before = ens(X)
    with torch.no_grad():
        models[1][0].weight.mul_(2.0)
    after = ens(X)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, Ensemble(models, "mean", batched=False)(X), atol=1e-6, rtol=1e-5)


def test_training_mode_runs_the_loop():
    models = [nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 5)) for _ in range(2)]
    ens = Ensemble(models, "mean").train()
    calls = _count_calls(models[1])
    ens(X)  # BatchNorm updates its running stats in training mode: that needs the loop
    assert calls == [1]
    ens.eval()
    torch.testing.assert_close(ens(X), Ensemble(models, "mean", batched=False).eval()(X), atol=1e-6, rtol=1e-5)


def test_errors():
    models = _models(range(2))
    with pytest.raises(ConfigError, match="mode"):
        Ensemble(models, "median")
    with pytest.raises(ConfigError, match="weights"):
        Ensemble(models, "weighted")
    with pytest.raises(ConfigError, match="2 models"):
        Ensemble(models, "weighted", [1.0])
    with pytest.raises(ConfigError, match="non-negative"):
        Ensemble(models, "weighted", [1.0, -1.0])
    with pytest.raises(ConfigError, match="no weights"):
        Ensemble(models, "mean", [1.0, 1.0])
    with pytest.raises(ConfigError):
        Ensemble([])
    with pytest.raises(ConfigError):
        Ensemble(models[0])
    mixed = Ensemble([models[0], make_mlp((9,), n_in=6, n_out=4)])
    with pytest.raises(ConfigError, match="output"):
        mixed(X)
