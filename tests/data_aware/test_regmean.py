"""collect_gram and regmean_merge against closed-form least squares, the α limits and RegMean++ by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fusion_engine.data_aware import collect_gram, regmean_merge
from fusion_engine.errors import ConfigError, MissingTensorError, ShapeMismatchError

D = torch.float64


def linear(n_in: int, n_out: int, seed: int, bias: bool = False) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias).to(D)


def inputs(n: int, d: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, d, generator=g, dtype=D)


def test_collect_gram_is_xtx_summed_over_batches():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).to(D)
    x = inputs(17, 4, 0)
    grams = collect_gram(model, [x[:5], (x[5:11], None), x[11:]])
    assert list(grams) == ["0", "2"]
    torch.testing.assert_close(grams["0"], x.T @ x)
    h = torch.relu(model[0](x)).detach()
    torch.testing.assert_close(grams["2"], h.T @ h)
    averaged = collect_gram(model, [x], average=True)
    torch.testing.assert_close(averaged["2"], h.T @ h / 17)


def test_collect_gram_flattens_token_dimensions():
    model = nn.Sequential(nn.Linear(3, 2)).to(D)
    x = inputs(10, 3, 1).view(2, 5, 3)
    flat = x.reshape(-1, 3)
    torch.testing.assert_close(collect_gram(model, [x])["0"], flat.T @ flat)


def test_wide_inputs_accumulate_the_block_triangle_and_mirror_it(monkeypatch):
    """From _TRIANGLE_FROM columns on only block rows X_iᵀ X_{i:} are accumulated: the mirrored result
    is XᵀX, exactly symmetric, for sums, averages, tokens and RegMean++ (thresholds lowered to test
    small widths; one real width of 512 too)."""
    from fusion_engine.data_aware import regmean as regmean_module

    wide = nn.Sequential(nn.Linear(512, 3)).to(D)
    x = inputs(6, 512, 5)
    g = collect_gram(wide, [x[:2], x[2:]])["0"]
    torch.testing.assert_close(g, x.T @ x)
    assert torch.equal(g, g.T)
    monkeypatch.setattr(regmean_module, "_TRIANGLE_FROM", 4)
    monkeypatch.setattr(regmean_module, "_block", lambda width: 3)
    model = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 2)).to(D)
    x = inputs(12, 7, 6).view(3, 4, 7)
    grams = collect_gram(model, [x[:1], x[1:]])
    flat = x.reshape(-1, 7)
    h = torch.relu(model[0](flat)).detach()
    torch.testing.assert_close(grams["0"], flat.T @ flat)
    torch.testing.assert_close(grams["2"], h.T @ h)
    assert all(torch.equal(v, v.T) for v in grams.values())
    torch.testing.assert_close(collect_gram(model, [x], average=True)["0"], flat.T @ flat / 12)
    models = [copy.deepcopy(model) for _ in range(2)]
    with torch.no_grad():
        models[1][0].weight.mul_(-0.5)
    xs = [inputs(9, 7, 7), inputs(9, 7, 8)]
    merged = regmean_merge(models, None, plus_plus=True, batches=[[x] for x in xs])
    monkeypatch.setattr(regmean_module, "_TRIANGLE_FROM", 10 ** 9)
    for k, v in regmean_merge(models, None, plus_plus=True, batches=[[x] for x in xs]).items():
        torch.testing.assert_close(merged[k], v)


def test_alpha_one_is_the_least_squares_merge():
    """min_W Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖²: the stacked least-squares problem, solved by lstsq."""
    models = [linear(6, 4, s) for s in range(3)]
    xs = [inputs(20 + 5 * s, 6, 10 + s, scale=1 + s) for s in range(3)]
    grams = [collect_gram(m, [x]) for m, x in zip(models, xs)]
    merged = regmean_merge(models, grams, alpha=1.0)
    a = torch.cat(xs)
    b = torch.cat([m(x).detach() for m, x in zip(models, xs)])
    expected = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(merged["weight"], expected, rtol=1e-9, atol=1e-10)


def test_one_model_is_returned_unchanged():
    model = linear(5, 3, 0, bias=True)
    merged = regmean_merge([model], [collect_gram(model, [inputs(9, 5, 1)])], alpha=0.7)
    torch.testing.assert_close(merged["weight"], model.weight.detach())
    torch.testing.assert_close(merged["bias"], model.bias.detach())


def test_alpha_zero_weights_columns_by_input_energy():
    models = [linear(5, 3, s) for s in range(2)]
    xs = [inputs(30, 5, 20 + s, scale=1 + 2 * s) for s in range(2)]
    grams = [collect_gram(m, [x]) for m, x in zip(models, xs)]
    merged = regmean_merge(models, grams, alpha=0.0)["weight"]
    energy = [torch.diagonal(x.T @ x) for x in xs]
    expected = sum(e * m.weight.detach() for e, m in zip(energy, models)) / sum(energy)
    torch.testing.assert_close(merged, expected)
    # and α → 0 approaches it continuously
    near = regmean_merge(models, grams, alpha=1e-7)["weight"]
    torch.testing.assert_close(near, expected, rtol=1e-5, atol=1e-6)


def test_alpha_zero_with_equal_input_energies_is_simple_averaging():
    models = [linear(4, 3, s) for s in range(3)]
    xs = []
    for s in range(3):
        x = inputs(12, 4, 30 + s)
        xs.append(x / x.norm(dim=0))  # unit-norm columns: diag(XᵀX) = 1 for every model
    grams = [collect_gram(m, [x]) for m, x in zip(models, xs)]
    merged = regmean_merge(models, grams, alpha=0.0)
    torch.testing.assert_close(merged["weight"], sum(m.weight.detach() for m in models) / 3)
    assert not torch.allclose(regmean_merge(models, grams, alpha=1.0)["weight"], merged["weight"])


def test_intermediate_alpha_matches_explicit_formula_for_batched_layers():
    """An MLP whose two hidden layers share an input width (one batched solve) and differ in output width."""
    def mlp(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 2),
                             nn.LayerNorm(2)).to(D)

    models = [mlp(s) for s in range(3)]
    with torch.no_grad():
        for s, m in enumerate(models):
            m[5].weight.add_(0.1 * s)
    xs = [inputs(15, 3, 40 + s) for s in range(3)]
    grams = [collect_gram(m, [x]) for m, x in zip(models, xs)]
    alpha = 0.6
    merged = regmean_merge(models, grams, alpha=alpha)
    for name in ("0", "2", "4"):
        gs = [alpha * g[name] + (1 - alpha) * torch.diag(torch.diagonal(g[name])) for g in grams]
        ws = [m.state_dict()[name + ".weight"] for m in models]
        expected = torch.linalg.solve(sum(gs), sum(g @ w.T for g, w in zip(gs, ws))).T
        torch.testing.assert_close(merged[name + ".weight"], expected)
        torch.testing.assert_close(merged[name + ".bias"], sum(m.state_dict()[name + ".bias"] for m in models) / 3)
    torch.testing.assert_close(merged["5.weight"], sum(m[5].weight.detach() for m in models) / 3)


def test_fp32_models_stay_fp32():
    models = [linear(6, 3, s).float() for s in range(2)]
    grams = [collect_gram(m, [inputs(10, 6, s).float()]) for s, m in enumerate(models)]
    merged = regmean_merge([m.state_dict() for m in models], grams)
    assert merged["weight"].dtype == torch.float32
    models64 = [copy.deepcopy(m).double() for m in models]
    grams64 = [{k: v.double() for k, v in g.items()} for g in grams]
    torch.testing.assert_close(merged["weight"].double(), regmean_merge(models64, grams64)["weight"],
                               rtol=1e-4, atol=1e-5)


def test_inputs_no_model_activates_get_the_average():
    models = [linear(4, 3, s) for s in range(2)]
    xs = [inputs(10, 4, 50 + s) for s in range(2)]
    for x in xs:
        x[:, 2] = 0.0  # feature 2 is never active: its column of W is not determined by the data
    grams = [collect_gram(m, [x]) for m, x in zip(models, xs)]
    merged = regmean_merge(models, grams, alpha=1.0)["weight"]
    torch.testing.assert_close(merged[:, 2], (models[0].weight[:, 2] + models[1].weight[:, 2]).detach() / 2)
    keep = [0, 1, 3]
    a = torch.cat([x[:, keep] for x in xs])
    b = torch.cat([m(x).detach() for m, x in zip(models, xs)])
    torch.testing.assert_close(merged[:, keep], torch.linalg.lstsq(a, b).solution.T)


def test_rank_deficient_grams_still_give_a_least_squares_solution():
    models = [linear(4, 3, s) for s in range(2)]
    base = inputs(3, 4, 60)                      # 3 rows only: XᵀX has rank ≤ 3 < 4
    xs = [base, 2 * base]
    grams = [collect_gram(m, [x]) for m, x in zip(models, xs)]
    merged = regmean_merge(models, grams, alpha=1.0)["weight"]
    assert bool(torch.isfinite(merged).all())
    a = torch.cat(xs)
    b = torch.cat([m(x).detach() for m, x in zip(models, xs)])
    best = torch.linalg.lstsq(a, b, driver="gelsd").solution.T
    residual = ((a @ merged.T - b) ** 2).sum()
    optimum = ((a @ best.T - b) ** 2).sum()
    assert residual <= optimum * (1 + 1e-6) + 1e-9


def test_regmean_plus_plus_fits_each_layer_on_merged_inputs():
    def net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(D)

    models = [net(s) for s in range(3)]
    xs = [inputs(25, 4, 70 + s) for s in range(3)]
    merged = regmean_merge(models, None, alpha=0.9, plus_plus=True,
                           batches=[[x[:10], (x[10:], None)] for x in xs])
    plain = regmean_merge(models, [collect_gram(m, [x]) for m, x in zip(models, xs)], alpha=0.9)
    torch.testing.assert_close(merged["0.weight"], plain["0.weight"])  # first layer: same inputs

    def reduce(g):
        return 0.9 * g + 0.1 * torch.diag(torch.diagonal(g))

    first = nn.Sequential(nn.Linear(4, 6), nn.Tanh()).to(D)
    first[0].weight.data = merged["0.weight"]
    first[0].bias.data = sum(m[0].bias.detach() for m in models) / 3
    hs = [first(x).detach() for x in xs]
    gs = [reduce(h.T @ h) for h in hs]
    expected = torch.linalg.solve(sum(gs), sum(g @ m[2].weight.detach().T for g, m in zip(gs, models))).T
    torch.testing.assert_close(merged["2.weight"], expected)
    assert not torch.allclose(merged["2.weight"], plain["2.weight"])
    # state dicts + a template give the same result; the template is not modified
    template = net(99)
    before = copy.deepcopy(template.state_dict())
    from_sds = regmean_merge([m.state_dict() for m in models], None, alpha=0.9, plus_plus=True,
                             batches=[[x] for x in xs], template=template)
    for k in merged:
        torch.testing.assert_close(from_sds[k], merged[k])
        assert torch.equal(template.state_dict()[k], before[k])


def test_inputs_are_not_modified():
    models = [linear(4, 3, s, bias=True) for s in range(2)]
    grams = [collect_gram(m, [inputs(8, 4, s)]) for s, m in enumerate(models)]
    before = [copy.deepcopy(m.state_dict()) for m in models], [{k: v.clone() for k, v in g.items()} for g in grams]
    regmean_merge(models, grams, alpha=0.5)
    for m, sd in zip(models, before[0]):
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    for g, g0 in zip(grams, before[1]):
        assert all(torch.equal(v, g0[k]) for k, v in g.items())


def test_errors():
    models = [linear(4, 3, s) for s in range(2)]
    grams = [collect_gram(m, [inputs(8, 4, s)]) for s, m in enumerate(models)]
    with pytest.raises(ConfigError, match="alpha"):
        regmean_merge(models, grams, alpha=1.5)
    with pytest.raises(ConfigError, match="one per model"):
        regmean_merge(models, grams[:1])
    with pytest.raises(ShapeMismatchError, match=r"grams\[1\]"):
        regmean_merge(models, [grams[0], {"": torch.eye(3, dtype=D)}])
    with pytest.raises(MissingTensorError, match="grams\\[1\\]"):
        regmean_merge(models, [grams[0], {"other": torch.eye(4, dtype=D)}])
    with pytest.raises(ConfigError, match="batches"):
        regmean_merge(models, None, plus_plus=True)
    with pytest.raises(ConfigError, match="grams=None"):
        regmean_merge(models, grams, plus_plus=True, batches=[[inputs(2, 4, 0)]] * 2)
    with pytest.raises(ConfigError, match="template"):
        regmean_merge([m.state_dict() for m in models], None, plus_plus=True, batches=[[inputs(2, 4, 0)]] * 2)
    with pytest.raises(ConfigError, match="no nn.Linear"):
        collect_gram(nn.Sequential(nn.Tanh()), [inputs(2, 4, 0)])
    nan = [grams[0], {"": torch.full((4, 4), float("nan"), dtype=D)}]
    with pytest.raises(Exception, match="NaN"):
        regmean_merge(models, nan)
