"""estimate_fisher against loops over single examples, and fisher_merge_models against the op / FusionBench."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fusion_engine.data_aware import estimate_fisher, fisher_merge_models
from fusion_engine.errors import ConfigError, MissingTensorError, ShapeMismatchError
from fusion_engine.ops import fisher_merge


def small_net(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).to(dtype)


def data(n: int, seed: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


def single_example_grads(model, x, objective):
    """∇θ objective(model(x_n)) for each example n, one backward pass each."""
    out = []
    for n in range(len(x)):
        model.zero_grad()
        objective(model(x[n:n + 1]), n).backward()
        out.append({k: p.grad.detach().clone() for k, p in model.named_parameters()})
    return out


def empirical_by_loop(model, x, y):
    model = copy.deepcopy(model)
    grads = single_example_grads(model, x, lambda out, n: F.cross_entropy(out, y[n:n + 1]))
    return {k: sum(g[k] ** 2 for g in grads) / len(x) for k in grads[0]}


def model_fisher_by_loop(model, x):
    model = copy.deepcopy(model)
    total = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for n in range(len(x)):
        with torch.no_grad():
            prob = torch.softmax(model(x[n:n + 1]), -1)[0]
        for c in range(prob.numel()):
            model.zero_grad()
            torch.log_softmax(model(x[n:n + 1]), -1)[0, c].backward()
            for k, p in model.named_parameters():
                total[k] += prob[c] * p.grad ** 2
    return {k: v / len(x) for k, v in total.items()}


def assert_dicts_close(a, b, rtol=1e-9, atol=1e-12):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].double(), b[k].double(), rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("n", [1, 6, 13])
def test_empirical_fisher_equals_loop_over_single_examples(n):
    model = small_net()
    x, y = data(n)
    assert_dicts_close(estimate_fisher(model, [(x, y)]), empirical_by_loop(model, x, y))


def test_model_fisher_equals_expectation_over_classes():
    model = small_net(3)
    x, _ = data(7, seed=4)
    got = estimate_fisher(model, [x[:3], x[3:]], kind="model")
    assert_dicts_close(got, model_fisher_by_loop(model, x))


def test_model_fisher_ignores_labels():
    model = small_net(1)
    x, y = data(5)
    assert_dicts_close(estimate_fisher(model, [(x, y)], kind="model"), estimate_fisher(model, [x], kind="model"))


def test_streamed_batches_equal_one_batch():
    model = small_net(2)
    x, y = data(23, seed=7)
    streamed = estimate_fisher(model, [(x[i:i + 5], y[i:i + 5]) for i in range(0, 23, 5)])
    assert_dicts_close(streamed, estimate_fisher(model, [(x, y)]))


# ---------------------------------------------------------------------------------------------
# the factored Linear / LayerNorm path and its fallback to vmap


class TokenNet(nn.Module):
    """[N, T, 5] tokens → LayerNorm → Linear → GELU → mean over tokens → Linear: logits [N, 4]."""

    def __init__(self, seed=0, inplace_after_linear=False, reuse_linear=False, tie=False):
        super().__init__()
        torch.manual_seed(seed)
        self.norm = nn.LayerNorm(5)
        self.inner = nn.Linear(5, 5)
        self.head = nn.Linear(5, 4)
        with torch.no_grad():  # LayerNorm starts at (1, 0): move it so its gradients are generic
            self.norm.weight.add_(0.3 * torch.randn(5))
            self.norm.bias.add_(0.3 * torch.randn(5))
        if tie:
            self.head.weight = nn.Parameter(self.inner.weight[:4].clone())
            self.tied = nn.Linear(5, 4)
            self.tied.weight = self.head.weight
        self.inplace_after_linear, self.reuse_linear, self.tie = inplace_after_linear, reuse_linear, tie
        self.double()

    def forward(self, x):
        h = self.inner(self.norm(x))
        h = h.relu_() if self.inplace_after_linear else F.gelu(h)
        if self.reuse_linear:
            h = self.inner(h)
        out = self.head(h.mean(1))
        return out + self.tied(h.mean(1)) if self.tie else out


def token_data(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("variant", [{}, {"inplace_after_linear": True}, {"reuse_linear": True}, {"tie": True}])
def test_token_models_equal_loop_over_single_examples(variant):
    """Tokens and LayerNorm take the factored path; in-place ops on a Linear's output, a Linear called
    twice and tied weights fall back to vmap: all equal the loop over single examples."""
    model = TokenNet(**variant)
    x, y = token_data(6)
    assert_dicts_close(estimate_fisher(model, [(x[:4], y[:4]), (x[4:], y[4:])]), empirical_by_loop(model, x, y))
    assert_dicts_close(estimate_fisher(model, [x[:2], x[2:]], kind="model"), model_fisher_by_loop(model, x))


def test_factored_path_is_taken_and_equals_vmap(monkeypatch):
    from fusion_engine.data_aware import fisher as fisher_module

    x, y = token_data(5)
    model = TokenNet(4)
    vmap_calls = []
    original = fisher_module._per_example_step
    monkeypatch.setattr(fisher_module, "_per_example_step", lambda *a: (vmap_calls.append(1), original(*a)))
    fast = estimate_fisher(model, [(x, y)])
    fast_model = estimate_fisher(model, [x], kind="model")
    assert vmap_calls == []                                   # Linear + LayerNorm only: no vmap
    monkeypatch.setattr(fisher_module.LayerTaps, "for_model", classmethod(lambda cls, m, p: None))
    assert_dicts_close(fast, estimate_fisher(model, [(x, y)]))
    assert_dicts_close(fast_model, estimate_fisher(model, [x], kind="model"))
    assert len(vmap_calls) == 2


def test_models_with_other_layers_use_vmap_and_stay_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(6, 3)).double()
    x = torch.randn(5, 1, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    assert_dicts_close(estimate_fisher(model, [(x, y)]), empirical_by_loop(model, x, y))


def test_reducing_loss_fn_falls_back_to_single_example_calls():
    """A loss_fn that averages over the batch equals the per-example loss on single examples (vmap's
    calls); the factored path needs one loss per example, so it steps aside."""
    model = small_net(8)
    x, y = data(7)
    assert_dicts_close(estimate_fisher(model, [(x, y)], loss_fn=F.cross_entropy), empirical_by_loop(model, x, y))


def test_fp32_model_gives_fp32_fisher_close_to_fp64():
    model64 = small_net(5)
    model32 = copy.deepcopy(model64).float()
    x, y = data(9)
    got = estimate_fisher(model32, [(x.float(), y)])
    assert all(v.dtype == torch.float32 for v in got.values())
    assert_dicts_close(got, estimate_fisher(model64, [(x, y)]), rtol=1e-4, atol=1e-7)


def test_batch_estimator_is_fusionbench_squared_batch_gradient():
    """per_example=False: (∇ Σ_n ℓ_n)² / N per batch, which equals the exact estimate for batches of one."""
    model = small_net(6)
    x, y = data(8)
    exact = estimate_fisher(model, [(x, y)])
    singles = estimate_fisher(model, [(x[i:i + 1], y[i:i + 1]) for i in range(8)], per_example=False)
    assert_dicts_close(singles, exact)
    approx = estimate_fisher(model, [(x[:4], y[:4]), (x[4:], y[4:])], per_example=False)
    m = copy.deepcopy(model)
    expected = {k: torch.zeros_like(p) for k, p in m.named_parameters()}
    for part in (slice(0, 4), slice(4, 8)):
        m.zero_grad()
        F.cross_entropy(m(x[part]), y[part], reduction="sum").backward()
        for k, p in m.named_parameters():
            expected[k] += p.grad ** 2
    assert_dicts_close(approx, {k: v / 8 for k, v in expected.items()})
    assert not torch.allclose(approx["0.weight"], exact["0.weight"])  # the cross terms


def test_custom_per_example_loss():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, 1, dtype=torch.float64)

    def mse(out, target):
        return ((out - target) ** 2).sum(-1)

    got = estimate_fisher(model, [(x, y)], loss_fn=mse)
    # ∇_W (w·x + b − y)² = 2 r x, ∇_b = 2 r with r the residual
    r = (model(x) - y).detach()
    torch.testing.assert_close(got["weight"], ((2 * r * x) ** 2).mean(0, keepdim=True))
    torch.testing.assert_close(got["bias"], ((2 * r) ** 2).mean(0))
    singles = [(x[i:i + 1], y[i:i + 1]) for i in range(6)]
    assert_dicts_close(estimate_fisher(model, singles, loss_fn=mse, per_example=False), got)


def test_model_is_not_modified_and_mode_is_restored():
    model = nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    model.train()
    before = copy.deepcopy(model.state_dict())
    x, y = data(4)
    y = y % 3
    a = estimate_fisher(model, [(x, y)])
    b = estimate_fisher(model, [(x, y)])  # dropout is off: deterministic
    assert_dicts_close(a, b)
    assert model.training and model[1].training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_errors():
    model = small_net()
    x, y = data(3)
    with pytest.raises(ConfigError, match="kind"):
        estimate_fisher(model, [(x, y)], kind="true")
    with pytest.raises(ConfigError, match="labels"):
        estimate_fisher(model, [x])
    with pytest.raises(ConfigError, match="loss_fn"):
        estimate_fisher(model, [(x, y)], kind="model", loss_fn=F.cross_entropy)
    with pytest.raises(ConfigError, match="reduction='none'"):
        estimate_fisher(model, [(x, y)], per_example=False, loss_fn=F.cross_entropy)
    with pytest.raises(ConfigError, match="nothing"):
        estimate_fisher(model, [])
    with pytest.raises(ConfigError, match="iterable of batches"):
        estimate_fisher(model, (x, y))
    with pytest.raises(ShapeMismatchError, match="targets"):
        estimate_fisher(model, [(x, y[:2])])


# ---------------------------------------------------------------------------------------------
# fisher_merge_models


def three_models():
    models = [small_net(s) for s in range(3)]
    fishers = [estimate_fisher(m, [data(10, seed=s)]) for s, m in enumerate(models)]
    return models, fishers


def test_merge_is_the_op_per_tensor():
    models, fishers = three_models()
    merged = fisher_merge_models(models, fishers, weights=[1.0, 2.0, 0.5])
    for k in merged:
        expected = fisher_merge([m.state_dict()[k] for m in models], [f[k] for f in fishers], [1.0, 2.0, 0.5])
        torch.testing.assert_close(merged[k], expected, rtol=0, atol=0)


def test_normalize_fisher_matches_fusionbench_formula():
    """FusionBench: scale model i by (1/‖F_i‖) / Σ_j (1/‖F_j‖), ‖F_i‖ over all of model i's Fisher entries."""
    models, fishers = three_models()
    fishers[1] = {k: 50 * v for k, v in fishers[1].items()}  # a model with a much larger Fisher overall
    merged = fisher_merge_models(models, fishers, normalize_fisher=True, eps=0.0)
    norms = torch.stack([torch.cat([f[k].reshape(-1) for k in f]).norm() for f in fishers])
    scale = (1 / norms) / (1 / norms).sum()
    for k in merged:
        x = torch.stack([m.state_dict()[k] for m in models])
        f = torch.stack([fi[k] for fi in fishers]) * scale.view(-1, *[1] * (x.dim() - 1))
        torch.testing.assert_close(merged[k], (f * x).sum(0) / f.sum(0))
    plain = fisher_merge_models(models, fishers, eps=0.0)
    assert not torch.allclose(plain["0.weight"], merged["0.weight"])


def test_fisher_floor_falls_back_to_the_average():
    models, fishers = three_models()
    zero = [{k: torch.zeros_like(v) for k, v in f.items()} for f in fishers]
    merged = fisher_merge_models(models, zero, fisher_floor=1e-6, eps=0.0)
    for k in merged:
        torch.testing.assert_close(merged[k], sum(m.state_dict()[k] for m in models) / 3)


def test_state_dicts_buffers_and_uncovered_tensors():
    class WithBuffers(nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.lin = nn.Linear(3, 2)
            self.register_buffer("scale", torch.randn(2))
            self.register_buffer("steps", torch.tensor(seed + 7))

        def forward(self, x):
            return self.lin(x) * self.scale

    models = [WithBuffers(s) for s in range(2)]
    sds = [m.state_dict() for m in models]
    fishers = [estimate_fisher(m, [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]) for m in models]
    assert set(fishers[0]) == {"lin.weight", "lin.bias"}
    merged = fisher_merge_models(sds, fishers, weights=[3.0, 1.0])
    torch.testing.assert_close(merged["scale"], 0.75 * sds[0]["scale"] + 0.25 * sds[1]["scale"])
    assert merged["steps"] == 7 and merged["steps"].dtype == sds[0]["steps"].dtype
    assert list(merged) == list(sds[0])


def test_merge_errors():
    models, fishers = three_models()
    with pytest.raises(ConfigError, match="one per model"):
        fisher_merge_models(models, fishers[:2])
    bad = [dict(f) for f in fishers]
    del bad[2]["0.bias"]
    with pytest.raises(MissingTensorError, match="0.bias"):
        fisher_merge_models(models, bad)
    bad = [dict(f) for f in fishers]
    bad[1]["0.weight"] = torch.ones(3)
    with pytest.raises(ShapeMismatchError, match=r"fishers\[1\]\['0.weight'\]"):
        fisher_merge_models(models, bad)
    with pytest.raises(MissingTensorError, match="models\\[1\\]"):
        fisher_merge_models([models[0].state_dict(), {"x": torch.ones(1)}, models[2]], fishers)
    with pytest.raises(ConfigError, match="fisher_floor"):
        fisher_merge_models(models, fishers, fisher_floor=-1.0)
    nan = [dict(f) for f in fishers]
    nan[0]["0.bias"] = torch.full_like(nan[0]["0.bias"], math.nan)
    with pytest.raises(Exception, match="0.bias"):
        fisher_merge_models(models, nan)
