"""LAWA, SWAG, Lookahead and the cyclic-snapshot collectors against their papers' definitions."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from fusion_engine.errors import ConfigError, ShapeMismatchError
from fusion_engine.trajectory_averaging import (
    SWAG,
    CyclicSnapshots,
    LatestWeightAverage,
    Lookahead,
    bayesian_model_average,
    fge_lr,
    snapshot_ensemble_lr,
)


def _checkpoints(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g, dtype=torch.float64),
             "count": torch.tensor(i)} for i in range(n)]


# ----------------------------------------------------------------------------------------------
# LAWA


def test_lawa_is_the_mean_of_the_k_latest_checkpoints():
    cks = _checkpoints(7)
    lawa = LatestWeightAverage(k=3)
    for i, ck in enumerate(cks):
        lawa.update(ck)
        latest = cks[max(0, i - 2):i + 1]
        avg = lawa.state_dict()
        for name in ("w", "b"):
            expected = torch.stack([c[name].double() for c in latest]).mean(0)
            torch.testing.assert_close(avg[name].double(), expected, rtol=1e-6, atol=1e-7)
            assert avg[name].dtype == ck[name].dtype
        assert int(avg["count"]) == int(latest[0]["count"])  # integers: the oldest kept checkpoint's
    assert len(lawa) == 3


def test_lawa_keeps_copies_and_rejects_other_architectures():
    model = nn.Linear(4, 2)
    lawa = LatestWeightAverage(k=2)
    lawa.update(model)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    torch.testing.assert_close(lawa.state_dict()["weight"], before)
    with pytest.raises(ShapeMismatchError):
        lawa.update(nn.Linear(4, 3))
    with pytest.raises(ConfigError, match="k=0"):
        LatestWeightAverage(k=0)
    with pytest.raises(ConfigError, match="no checkpoint"):
        LatestWeightAverage(k=2).state_dict()


# ----------------------------------------------------------------------------------------------
# SWAG


def _trajectory(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(4, 3, generator=g, dtype=torch.float64) * 0.1 + 1.0,
             "v": torch.randn(6, generator=g, dtype=torch.float64)} for _ in range(n)]


def test_swag_moments_and_deviations_follow_the_paper():
    models = _trajectory(6)
    swag = SWAG(max_rank=4)
    for m in models:
        swag.collect(m)
    for name in ("w", "v"):
        stack = torch.stack([m[name] for m in models])
        torch.testing.assert_close(swag.mean()[name], stack.mean(0))
        torch.testing.assert_close(swag.variance()[name], (stack ** 2).mean(0) - stack.mean(0) ** 2)
    # D: the deviation of each of the last 4 models from the running mean right after it was folded in
    assert swag.rank == 4
    idx = swag._names.index("w")
    for col, i in zip(swag._deviations, range(2, 6)):
        running = torch.stack([m["w"] for m in models[:i + 1]]).mean(0)
        torch.testing.assert_close(col[idx], models[i]["w"] - running)


def test_swag_sample_is_the_papers_formula():
    models = _trajectory(5)
    swag = SWAG(max_rank=3)
    for m in models:
        swag.collect(m)
    sample = swag.sample(generator=torch.Generator().manual_seed(7))
    # the same draws, by hand: z2 first (K values), then z1 per tensor in order
    g = torch.Generator().manual_seed(7)
    z2 = torch.randn(3, generator=g, dtype=torch.float64)
    stack = {k: torch.stack([m[k] for m in models]) for k in ("w", "v")}
    for name in ("w", "v"):
        mean = stack[name].mean(0)
        var = (stack[name] ** 2).mean(0) - mean ** 2
        running = [stack[name][:i + 1].mean(0) for i in range(5)]
        dev = torch.stack([stack[name][i] - running[i] for i in range(2, 5)])  # [K, ...]
        z1 = torch.randn(mean.shape, generator=g, dtype=torch.float64)
        expected = mean + math.sqrt(0.5) * (var.sqrt() * z1 + torch.einsum("k,k...->...", z2, dev) / math.sqrt(2))
        torch.testing.assert_close(sample[name], expected)


def test_swag_sample_covariance_matches_the_gaussian():
    """Empirical covariance of many draws ≈ ½(Σ_diag + D Dᵀ/(K−1)) (the paper's SWAG)."""
    g = torch.Generator().manual_seed(3)
    models = [{"x": torch.randn(3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.5, 2.0],
                                                                                    dtype=torch.float64)}
              for _ in range(8)]
    swag = SWAG(max_rank=5)
    for m in models:
        swag.collect(m)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([swag.sample(generator=gen)["x"] for _ in range(6000)])
    dev = torch.stack([c[0] for c in swag._deviations])  # [K, 3]
    expected = 0.5 * (torch.diag(swag.variance()["x"]) + dev.T @ dev / (dev.shape[0] - 1))
    empirical = torch.cov(draws.T)
    torch.testing.assert_close(draws.mean(0), swag.mean()["x"], atol=0.08, rtol=0)
    torch.testing.assert_close(empirical, expected, atol=0.12 * float(expected.abs().max()), rtol=0)


def test_swag_diagonal_and_errors():
    swag = SWAG(max_rank=0)
    with pytest.raises(ConfigError, match="collect"):
        swag.mean()
    for m in _trajectory(4):
        swag.collect(m)
    s = swag.sample(generator=torch.Generator().manual_seed(1))   # SWAG-Diagonal: N(mean, var)
    g = torch.Generator().manual_seed(1)
    for name in ("w", "v"):
        z = torch.randn(swag.mean()[name].shape, generator=g, dtype=torch.float64)
        torch.testing.assert_close(s[name], swag.mean()[name] + swag.variance()[name].sqrt() * z)
    one = SWAG(max_rank=4)
    one.collect(_trajectory(1)[0])
    with pytest.raises(ConfigError, match="low_rank=False"):
        one.sample()
    with pytest.raises(ConfigError, match="max_rank"):
        SWAG(max_rank=-1)


def test_bayesian_model_average_is_the_mean_predictive_distribution():
    torch.manual_seed(0)
    models = [nn.Linear(4, 3) for _ in range(3)]
    x = torch.randn(5, 4)
    out = bayesian_model_average(models)(x)
    probs = torch.stack([torch.softmax(m(x), -1) for m in models]).mean(0)
    torch.testing.assert_close(out, probs.log(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Lookahead


def _quadratic_problem():
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=True)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    return model, x, y


def test_lookahead_equals_the_algorithm_written_out():
    model, x, y = _quadratic_problem()
    reference = copy.deepcopy(model)
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=3, alpha=0.5)
    steps = 10
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    # by hand: φ slow, θ fast; θ ← θ − lr ∇L(θ); every 3rd step φ ← φ + ½(θ − φ), θ ← φ
    params = [p.detach().clone().requires_grad_(True) for p in reference.parameters()]
    slow = [p.detach().clone() for p in params]
    for step in range(1, steps + 1):
        loss = ((x @ params[0].T + params[1] - y) ** 2).mean()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, gr in zip(params, grads):
                p -= 0.1 * gr
            if step % 3 == 0:
                for p, s in zip(params, slow):
                    s += 0.5 * (p - s)
                    p.copy_(s)
    for got, want in zip(model.parameters(), params):
        torch.testing.assert_close(got.detach(), want.detach())


def test_lookahead_works_with_schedulers_and_round_trips_its_state():
    model, x, y = _quadratic_problem()
    opt = Lookahead(torch.optim.Adam(model.parameters(), lr=0.1), k=2, alpha=0.3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)
    state = opt.state_dict()
    twin_model = copy.deepcopy(model)
    twin = Lookahead(torch.optim.Adam(twin_model.parameters(), lr=0.1), k=5, alpha=0.9)
    twin.load_state_dict(state)
    assert (twin.k, twin.alpha, twin.fast_steps) == (2, 0.3, 3)
    for a, b in zip(opt.slow_weights[0], twin.slow_weights[0]):
        torch.testing.assert_close(a, b)
    with pytest.raises(ConfigError, match="alpha"):
        Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), alpha=1.5)
    with pytest.raises(ConfigError, match="Optimizer"):
        Lookahead(object())


# ----------------------------------------------------------------------------------------------
# snapshot ensembles and FGE


def test_snapshot_ensemble_schedule_is_huang_et_al():
    T, M, a0 = 100, 4, 0.2
    assert snapshot_ensemble_lr(1, total_steps=T, cycles=M, lr_max=a0) == pytest.approx(a0)
    assert snapshot_ensemble_lr(26, total_steps=T, cycles=M, lr_max=a0) == pytest.approx(a0)        # restart
    assert snapshot_ensemble_lr(13 + 1, total_steps=T, cycles=M, lr_max=a0) == pytest.approx(
        a0 / 2 * (math.cos(math.pi * 13 / 25) + 1))
    assert snapshot_ensemble_lr(25, total_steps=T, cycles=M, lr_max=a0) < 0.01 * a0                   # minimum


def test_fge_schedule_is_garipov_et_al():
    c, a1, a2 = 10, 0.05, 0.0005
    assert fge_lr(5, cycle_length=c, lr_high=a1, lr_low=a2) == pytest.approx(a2)                      # t = 1/2
    assert fge_lr(10, cycle_length=c, lr_high=a1, lr_low=a2) == pytest.approx(a1)                     # t = 1
    assert fge_lr(3, cycle_length=c, lr_high=a1, lr_low=a2) == pytest.approx((1 - 0.6) * a1 + 0.6 * a2)
    assert fge_lr(18, cycle_length=c, lr_high=a1, lr_low=a2) == pytest.approx((2 - 1.6) * a2 + 0.6 * a1)


@pytest.mark.parametrize("kind", ["snapshot", "fge"])
def test_cyclic_snapshots_apply_the_schedule_and_collect_at_its_minima(kind):
    model, x, y = _quadratic_problem()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    if kind == "snapshot":
        snaps = CyclicSnapshots.snapshot_ensemble(opt, total_steps=12, cycles=3, lr_max=0.1)
        schedule = [snapshot_ensemble_lr(s, total_steps=12, cycles=3, lr_max=0.1) for s in range(1, 13)]
        collect_steps = [4, 8, 12]
    else:
        snaps = CyclicSnapshots.fast_geometric(opt, cycle_length=4, lr_high=0.1, lr_low=0.001)
        schedule = [fge_lr(s, cycle_length=4, lr_high=0.1, lr_low=0.001) for s in range(1, 13)]
        collect_steps = [2, 6, 10]
    used, expected_snaps = [], []
    for step in range(1, 13):
        used.append(opt.param_groups[0]["lr"])
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        snaps.step(model)
        if step in collect_steps:
            expected_snaps.append(model.weight.detach().clone())
    assert used == pytest.approx(schedule)
    assert len(snaps.snapshots) == 3
    for sd, w in zip(snaps.snapshots, expected_snaps):
        torch.testing.assert_close(sd["weight"], w)
    ens = snaps.ensemble(model)
    members = [copy.deepcopy(model) for _ in snaps.snapshots]
    for m, sd in zip(members, snaps.snapshots):
        m.load_state_dict(sd)
    torch.testing.assert_close(ens(x), torch.stack([m(x) for m in members]).mean(0))


def test_cyclic_snapshots_reject_bad_schedules():
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="even"):
        CyclicSnapshots.fast_geometric(opt, cycle_length=5, lr_high=0.1, lr_low=0.01)
    with pytest.raises(ConfigError, match="cycles"):
        CyclicSnapshots.snapshot_ensemble(opt, total_steps=2, cycles=3, lr_max=0.1)
    with pytest.raises(ConfigError, match="no snapshot"):
        CyclicSnapshots.snapshot_ensemble(opt, total_steps=10, cycles=2, lr_max=0.1).ensemble(nn.Linear(2, 2))
