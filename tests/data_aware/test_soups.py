"""Model soups (uniform, greedy) and the SWA / EMA multi-tensor averaging functions."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.optim.swa_utils import get_ema_multi_avg_fn as torch_ema_multi_avg_fn
from torch.optim.swa_utils import get_swa_multi_avg_fn as torch_swa_multi_avg_fn

from fusion_engine.averaging import (
    ema_update_,
    get_ema_multi_avg_fn,
    get_swa_multi_avg_fn,
    greedy_soup,
    swa_update_,
    uniform_soup,
)
from fusion_engine.bench.digits import evaluate, load_digits_split, make_mlp, train
from fusion_engine.errors import ConfigError, MissingTensorError, ShapeMismatchError


def _snapshot(models):
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in models]


def _assert_unchanged(models, before):
    for m, sd in zip(models, before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k]), k


# ----------------------------------------------------------------------------------------------
# uniform soup


def test_uniform_soup_is_the_mean_and_leaves_inputs_alone():
    models = [make_mlp((8,), seed=s, n_in=5, n_out=3) for s in range(3)]
    before = _snapshot(models)
    soup = uniform_soup(models)
    for name in before[0]:
        expected = sum(sd[name] for sd in before) / 3
        torch.testing.assert_close(soup[name], expected, atol=1e-6, rtol=1e-6)
    _assert_unchanged(models, before)
    weighted = uniform_soup([m.state_dict() for m in models], weights=[2.0, 1.0, 1.0])
    for name in before[0]:
        expected = (2 * before[0][name] + before[1][name] + before[2][name]) / 4
        torch.testing.assert_close(weighted[name], expected, atol=1e-6, rtol=1e-6)


def test_uniform_soup_keeps_integer_buffers_of_the_first_model():
    models = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(2)]
    models[0][1].num_batches_tracked.fill_(7)
    models[1][1].num_batches_tracked.fill_(3)
    soup = uniform_soup(models)
    assert soup["1.num_batches_tracked"].item() == 7


def test_uniform_soup_rejects_mismatched_models():
    a, b = make_mlp((8,), n_in=5, n_out=3), make_mlp((9,), n_in=5, n_out=3)
    with pytest.raises(ShapeMismatchError, match="0.weight"):
        uniform_soup([a, b])
    sd = dict(a.state_dict())
    del sd["2.bias"]
    with pytest.raises(MissingTensorError, match="2.bias"):
        uniform_soup([a, sd])
    with pytest.raises(ConfigError):
        uniform_soup([])
    with pytest.raises(ConfigError):
        uniform_soup(a)  # one module, not a list


# ----------------------------------------------------------------------------------------------
# greedy soup


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(seed=0)


@pytest.fixture(scope="module")
def ingredients(digits):
    """Fine-tunings of one shared initialisation with different learning rates and data orders, plus
    one model from another initialisation (averaging it in wrecks the soup: it must be rejected)."""
    x, y = digits.x_train[:800], digits.y_train[:800]
    base = train(make_mlp((32,), seed=0), x, y, epochs=3, seed=0)
    models = [train(copy.deepcopy(base), x, y, epochs=4, lr=lr, seed=s)
              for s, lr in enumerate((1e-3, 3e-3, 5e-4, 2e-3), start=1)]
    stranger = train(make_mlp((32,), seed=99), x, y, epochs=7, seed=99)
    return models + [stranger]


def test_greedy_soup_never_lowers_the_held_out_score(digits, ingredients):
    x_val, y_val = digits.x_test[:200], digits.y_test[:200]

    def score(model):
        return evaluate(model, x_val, y_val).accuracy

    before = _snapshot(ingredients)
    result = greedy_soup(ingredients, score)
    _assert_unchanged(ingredients, before)
    individual = [score(m) for m in ingredients]
    assert result.individual_scores == individual
    assert result.ingredients[0] == max(range(len(individual)), key=lambda i: (individual[i], -i))
    assert result.score >= max(individual)
    assert score(result.model) == result.score
    assert len(result.history) == len(ingredients) - 1
    # every accepted step did not drop the running score; the stranger never joins
    running = individual[result.ingredients[0]]
    for index, s, kept in result.history:
        assert kept == (s >= running)
        if kept:
            running = s
    assert running == result.score
    assert len(ingredients) - 1 not in result.ingredients
    # the soup is the uniform average of its ingredients
    expected = uniform_soup([ingredients[i] for i in result.ingredients])
    for name, t in expected.items():
        torch.testing.assert_close(result.state_dict[name], t)


def test_greedy_soup_keeps_what_helps_in_score_order():
    """Noisy copies of one target: averaging cancels noise (kept), a far-away model is rejected."""
    target = make_mlp((16,), seed=0, n_in=5, n_out=3)
    g = torch.Generator().manual_seed(1)

    def noisy(scale):
        m = copy.deepcopy(target)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
        return m

    models = [noisy(0.12), noisy(0.1), noisy(5.0), noisy(0.11)]

    def score(model):  # closeness to the target
        return -float(sum(((p - q) ** 2).sum() for p, q in zip(model.state_dict().values(), target.state_dict().values())))

    result = greedy_soup(models, score)
    assert result.ingredients == [1, 3, 0]  # best first, then in order of score; the far one (2) rejected
    assert [h[0] for h in result.history] == [3, 0, 2]
    assert result.score > max(result.individual_scores)


def test_greedy_soup_on_state_dicts_needs_a_template(ingredients):
    sds = [m.state_dict() for m in ingredients[:2]]
    with pytest.raises(ConfigError, match="template"):
        greedy_soup(sds, lambda m: 0.0)
    result = greedy_soup(sds, lambda m: 1.0, template=ingredients[0])
    assert result.ingredients == [0, 1]  # equal scores: nothing drops, everything is kept
    with pytest.raises(ConfigError, match="number"):
        greedy_soup(sds, lambda m: "good", template=ingredients[0])


# ----------------------------------------------------------------------------------------------
# SWA / EMA


def _model_with_mixed_dtypes(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))
    m[2].double()
    return m


def _drift(model: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("decay", [0.9, 0.999, 0.0, 1.0])
def test_ema_multi_avg_fn_equals_torch(decay):
    model = _model_with_mixed_dtypes(0)
    ours = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    theirs = AveragedModel(model, multi_avg_fn=torch_ema_multi_avg_fn(decay))
    for step in range(6):
        _drift(model, step)
        ours.update_parameters(model)
        theirs.update_parameters(model)
    for (name, a), (_, b) in zip(ours.module.state_dict().items(), theirs.module.state_dict().items()):
        assert torch.equal(a, b), name


def test_ema_with_buffers_equals_torch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    ours = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True)
    theirs = AveragedModel(model, multi_avg_fn=torch_ema_multi_avg_fn(0.8), use_buffers=True)
    for step in range(4):
        model.train()
        model(torch.randn(16, 4, generator=torch.Generator().manual_seed(step)))  # moves the BN buffers
        _drift(model, step)
        ours.update_parameters(model)
        theirs.update_parameters(model)
    for (name, a), (_, b) in zip(ours.module.state_dict().items(), theirs.module.state_dict().items()):
        assert torch.equal(a, b), name


def test_swa_multi_avg_fn_equals_torch_default():
    model = _model_with_mixed_dtypes(1)
    ours = AveragedModel(model, multi_avg_fn=get_swa_multi_avg_fn())
    default = AveragedModel(model)  # torch's default: the SWA running mean (foreach on CUDA, per tensor on CPU)
    explicit = AveragedModel(model, multi_avg_fn=torch_swa_multi_avg_fn())
    history = [copy.deepcopy(model)]
    for step in range(7):
        _drift(model, step)
        history.append(copy.deepcopy(model))
        for averaged in (ours, default, explicit):
            averaged.update_parameters(model)
    for (name, a), (_, b), (_, c) in zip(ours.module.state_dict().items(), default.module.state_dict().items(),
                                         explicit.module.state_dict().items()):
        assert torch.equal(a, c), name
        # the default's per-tensor formula a + (x - a)/(n + 1) (used off CUDA) rounds differently from lerp
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        # and it is the mean of the 7 models passed to update_parameters (the first one is copied)
        mean = sum(h.state_dict()[name].double() for h in history[1:]) / (len(history) - 1)
        torch.testing.assert_close(a.double(), mean, atol=1e-5, rtol=1e-5)


def test_update_functions_directly():
    a = [torch.zeros(3), torch.ones(2, dtype=torch.float64)]
    c = [torch.full((3,), 10.0), torch.full((2,), 3.0, dtype=torch.float64)]
    ema_update_(a, c, 0.75)
    torch.testing.assert_close(a[0], torch.full((3,), 2.5))
    torch.testing.assert_close(a[1], torch.full((2,), 1.5, dtype=torch.float64))
    swa_update_(a, c, 1)  # mean of (a, c)
    torch.testing.assert_close(a[0], torch.full((3,), 6.25))
    counters = [torch.tensor([4])]
    swa_update_(counters, [torch.tensor([9])], torch.tensor(1))
    assert counters[0].item() == 6  # the rounded running mean of 4 and 9 (6.5 rounds to even)
    with pytest.raises(ConfigError, match="decay"):
        ema_update_(a, c, 1.5)
    with pytest.raises(ConfigError, match="decay"):
        get_ema_multi_avg_fn(-0.1)
    with pytest.raises(ConfigError):
        ema_update_(a, c[:1], 0.5)
    with pytest.raises(ShapeMismatchError):
        swa_update_([torch.zeros(3)], [torch.zeros(4)], 0)
    with pytest.raises(ConfigError, match="n_averaged"):
        swa_update_([torch.zeros(3)], [torch.zeros(3)], -1)
