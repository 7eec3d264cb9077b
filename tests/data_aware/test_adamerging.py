"""merge_with_coefficients against autograd through an explicit weighted sum; adamerging against a
plain re-implementation (explicit sums, functional_call, Adam)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from fusion_engine.data_aware import AdaMergingResult, adamerging, merge_with_coefficients
from fusion_engine.errors import ConfigError, MissingTensorError, ShapeMismatchError

D = torch.float64


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (5, 3), (2, 3, 4)])
@pytest.mark.parametrize("stacked", [True, False])
def test_coefficient_gradients_equal_autograd_through_explicit_sum(shape, stacked):
    g = torch.Generator().manual_seed(sum(shape) + stacked)
    K = 3
    base = torch.randn(shape, generator=g, dtype=D, requires_grad=True)
    taus = torch.randn((K, *shape), generator=g, dtype=D)
    upstream = torch.randn(shape, generator=g, dtype=D)
    c = torch.randn(K, generator=g, dtype=D, requires_grad=True)
    y = merge_with_coefficients(base, taus if stacked else list(taus.unbind(0)), c)
    (y * upstream).sum().backward()

    base_ref = base.detach().clone().requires_grad_(True)
    c_ref = c.detach().clone().requires_grad_(True)
    y_ref = base_ref + sum(c_ref[k] * taus[k] for k in range(K))
    (y_ref * upstream).sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(c.grad, c_ref.grad)
    torch.testing.assert_close(base.grad, base_ref.grad)


def test_gradcheck_and_non_contiguous_task_vectors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 3, generator=g, dtype=D)
    wide = torch.randn(2, 4, 6, generator=g, dtype=D)
    taus = wide[:, :, ::2]                                     # non-contiguous rows
    c = torch.randn(2, generator=g, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda cc: merge_with_coefficients(base, taus, cc), (c,))
    b = base.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda bb, cc: merge_with_coefficients(bb, taus, cc), (b, c))


def test_fp32_forward_uses_fp32_and_matches():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(33, generator=g)
    taus = torch.randn(4, 33, generator=g)
    c = torch.tensor([0.1, 0.2, 0.3, 0.4], requires_grad=True)
    y = merge_with_coefficients(base, taus, c)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, base + (c.detach()[:, None] * taus).sum(0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stacked", [True, False])
def test_half_precision_accumulates_in_fp32(dtype, stacked):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(50, generator=g).to(dtype)
    taus = torch.randn(3, 50, generator=g).to(dtype)
    c = torch.tensor([0.3, -0.7, 1.1], requires_grad=True)
    y = merge_with_coefficients(base, taus if stacked else list(taus.unbind(0)), c)
    assert y.dtype == dtype
    exact = base.float() + (c.detach()[:, None] * taus.float()).sum(0)
    torch.testing.assert_close(y, exact.to(dtype), rtol=0, atol=0)
    upstream = torch.randn(50, generator=g).to(dtype)
    (y.float() * upstream.float()).sum().backward()
    torch.testing.assert_close(c.grad, taus.float() @ upstream.float(), rtol=2e-2, atol=2e-2)


def test_merge_with_coefficients_errors():
    base = torch.zeros(3)
    with pytest.raises(ConfigError, match="one per task vector"):
        merge_with_coefficients(base, torch.ones(2, 3), torch.ones(3))
    with pytest.raises(ShapeMismatchError, match="task_vectors"):
        merge_with_coefficients(base, torch.ones(2, 4), torch.ones(2))
    with pytest.raises(ShapeMismatchError, match=r"task_vectors\[1\]"):
        merge_with_coefficients(base, [torch.ones(3), torch.ones(2)], torch.ones(2))
    with pytest.raises(ConfigError, match="1-D"):
        merge_with_coefficients(base, torch.ones(2, 3), torch.ones(2, 1))


# ---------------------------------------------------------------------------------------------
# adamerging


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).to(D)


def finetuned_from(pre: nn.Module, K: int) -> list[nn.Module]:
    out = []
    for k in range(K):
        m = copy.deepcopy(pre)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + k), dtype=D))
        out.append(m)
    return out


def reference_adamerging(pre, fts, xs, mode, steps, lr, init, clamp):
    """AdaMerging written plainly: explicit weighted sums of task vectors in a Python loop."""
    names = [n for n, _ in pre.named_parameters()]
    base = {n: p.detach() for n, p in pre.named_parameters()}
    taus = [{n: m.state_dict()[n] - base[n] for n in names} for m in fts]
    shape = (len(fts),) if mode == "task" else (len(fts), len(names))
    lam = torch.full(shape, init, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=lr)
    for step in range(steps):
        params = {}
        for l, n in enumerate(names):
            w = base[n]
            for k in range(len(fts)):
                w = w + (lam[k] if mode == "task" else lam[k, l]).to(D) * taus[k][n]
            params[n] = w
        log_p = torch.log_softmax(functional_call(pre, params, (xs[step % len(xs)],)).float(), -1)
        loss = -(log_p.exp() * log_p).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            lam.clamp_(*clamp)
    return lam.detach()


@pytest.mark.parametrize("mode", ["task", "layer"])
def test_adamerging_matches_plain_reimplementation(mode):
    pre = mlp(0)
    fts = finetuned_from(pre, 3)
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(9, 6, generator=g, dtype=D) for _ in range(3)]
    result = adamerging(pre, fts, xs, mode=mode, steps=7, lr=0.05, init=0.3, clamp=(0.0, 1.0))
    expected = reference_adamerging(pre, fts, xs, mode, 7, 0.05, 0.3, (0.0, 1.0))
    assert isinstance(result, AdaMergingResult)
    torch.testing.assert_close(result.coefficients, expected, rtol=1e-5, atol=1e-6)
    assert result.parameter_names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert len(result.history) == 7
    lam = result.coefficients
    for l, name in enumerate(result.parameter_names):
        coeff = lam if mode == "task" else lam[:, l]
        want = pre.state_dict()[name] + sum(coeff[k].to(D) * (fts[k].state_dict()[name] - pre.state_dict()[name])
                                           for k in range(3))
        torch.testing.assert_close(result.state_dict[name], want)


def test_parameters_the_loss_does_not_reach_keep_their_coefficients():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(4)
            self.net = mlp(4)
            self.spare = nn.Linear(2, 2).to(D)   # never called: its θ_l gets no gradient

        def forward(self, x):
            return self.net(x)

    pre = WithSpare()
    fts = finetuned_from(pre, 2)
    xs = [torch.randn(5, 6, generator=torch.Generator().manual_seed(6), dtype=D)]
    result = adamerging(pre, fts, xs, mode="layer", steps=3, lr=0.05, init=0.3)
    assert result.parameter_names[-2:] == ["spare.weight", "spare.bias"]
    torch.testing.assert_close(result.coefficients[:, -2:], torch.full((2, 2), 0.3))
    assert not torch.allclose(result.coefficients[:, :4], torch.full((2, 4), 0.3))
    task = adamerging(pre, fts, xs, mode="task", steps=3, lr=0.05, init=0.3)
    plain = adamerging(pre.net, [m.net for m in fts], xs, mode="task", steps=3, lr=0.05, init=0.3)
    torch.testing.assert_close(task.coefficients, plain.coefficients)


def test_entropy_decreases_and_clamp_holds():
    pre = mlp(1)
    fts = finetuned_from(pre, 2)
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(2), dtype=D)
    result = adamerging(pre, fts, [x], mode="layer", steps=40, lr=0.05, clamp=(0.1, 0.6))
    assert result.history[-1] < result.history[0]
    assert bool((result.coefficients >= 0.1).all()) and bool((result.coefficients <= 0.6).all())
    assert result.coefficients.shape == (2, 4)


def test_zero_steps_is_task_arithmetic_at_init_and_inputs_are_untouched():
    pre = mlp(2)
    pre.train()
    fts = finetuned_from(pre, 2)
    before = copy.deepcopy(pre.state_dict()), [copy.deepcopy(m.state_dict()) for m in fts]
    result = adamerging(pre, [m.state_dict() for m in fts], [torch.randn(3, 6, dtype=D)], steps=0, init=0.25)
    assert result.history == []
    for k, v in result.state_dict.items():
        torch.testing.assert_close(v, before[0][k] + 0.25 * sum(sd[k] - before[0][k] for sd in before[1]))
    assert pre.training
    assert all(torch.equal(v, before[0][k]) for k, v in pre.state_dict().items())
    init = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.0, 0.5, 1.0, 0.0]])
    layered = adamerging(pre, fts, [torch.randn(3, 6, dtype=D)], mode="layer", steps=0, init=init)
    torch.testing.assert_close(layered.coefficients, init)


def test_buffers_come_from_the_pretrained_model():
    torch.manual_seed(0)
    pre = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).to(D)
    pre[1].running_mean.fill_(0.5)
    fts = finetuned_from(pre, 2)
    for m in fts:
        m[1].running_mean.fill_(9.0)
    result = adamerging(pre, fts, [torch.randn(8, 4, dtype=D)], steps=2)
    assert torch.equal(result.state_dict["1.running_mean"], pre[1].running_mean)
    assert result.state_dict["1.num_batches_tracked"] == pre[1].num_batches_tracked


def test_adamerging_errors():
    pre = mlp(0)
    fts = finetuned_from(pre, 2)
    x = [torch.randn(2, 6, dtype=D)]
    with pytest.raises(ConfigError, match="mode"):
        adamerging(pre, fts, x, mode="block")
    with pytest.raises(ConfigError, match="clamp"):
        adamerging(pre, fts, x, clamp=(1.0, 0.0))
    with pytest.raises(ConfigError, match="init"):
        adamerging(pre, fts, x, mode="layer", init=torch.zeros(2))
    with pytest.raises(ConfigError, match="steps"):
        adamerging(pre, fts, x, steps=-1)
    sd = dict(fts[1].state_dict())
    del sd["2.bias"]
    with pytest.raises(MissingTensorError, match="2.bias"):
        adamerging(pre, [fts[0].state_dict(), sd], x)
    with pytest.raises(ConfigError, match="nothing"):
        adamerging(pre, fts, [])


@pytest.mark.slow  # about 5 s on a quiet 2-core machine (trains 5 small MLPs)
def test_data_aware_methods_beat_averaging_on_digits_tasks():
    """The seeded digits tasks (rotated / mirrored digits), fine-tuned until confident: Fisher merging,
    RegMean and AdaMerging each beat the plain average of the fine-tuned models on mean test accuracy."""
    pytest.importorskip("sklearn")
    from fusion_engine.bench.tasks import TaskConfig, build_tasks
    from fusion_engine.data_aware import collect_gram, estimate_fisher, fisher_merge_models, regmean_merge
    from fusion_engine.ops import linear_merge

    setup = build_tasks(TaskConfig(seed=0, finetune_epochs=15))

    def accuracy(state_dict):
        model = copy.deepcopy(setup.pretrained)
        model.load_state_dict(state_dict)
        return setup.mean_accuracy(model)

    sds = [m.state_dict() for m in setup.finetuned]
    average = accuracy({k: linear_merge([sd[k] for sd in sds]) for k in sds[0]})
    train = [t.batches(64) for t in setup.tasks]
    fishers = [estimate_fisher(m, b) for m, b in zip(setup.finetuned, train)]
    fisher = accuracy(fisher_merge_models(setup.finetuned, fishers, normalize_fisher=True))
    regmean = accuracy(regmean_merge(setup.finetuned, [collect_gram(m, b) for m, b in zip(setup.finetuned, train)]))
    unlabeled = [x for t in setup.tasks for x, _ in t.batches(16, "val")]
    order = torch.randperm(len(unlabeled), generator=torch.Generator().manual_seed(0)).tolist()
    ada = adamerging(setup.pretrained, setup.finetuned, [unlabeled[i] for i in order], init=0.5, steps=100)
    adamerged = accuracy(ada.state_dict)
    assert min(fisher, regmean, adamerged) > average + 0.03, (average, fisher, regmean, adamerged)
