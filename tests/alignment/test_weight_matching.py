"""weight_matching recovers known permutations exactly and aligns independently trained models."""

from __future__ import annotations

import copy

import pytest
import torch

from fusion_engine.alignment import apply_permutation, mlp_permutation_spec, weight_matching
from fusion_engine.alignment.spec import invert
from fusion_engine.errors import ConfigError, ShapeMismatchError

from test_permutation_spec import CASES, outputs


@pytest.mark.parametrize("case", list(CASES))
def test_recovers_random_permutations_exactly(case):
    make, build, inputs = CASES[case]
    torch.manual_seed(1)
    model, x = make(), inputs()
    spec = build(model)
    sd = model.state_dict()
    true = spec.random(seed=11)
    permuted = apply_permutation(spec, sd, true)
    found = weight_matching(spec, sd, permuted, seed=0)
    for p in spec.perm_sizes:
        assert found[p].dtype == torch.int64 and found[p].shape == true[p].shape
        if spec.copies.get(p, 1) == 1:  # per-head copies are re-indexed by the head permutation applied after them
            torch.testing.assert_close(found[p], invert(true[p]), msg=lambda m: f"{p}: {m}")
    # with random weights only the true inverse restores every tensor bit for bit
    restored = apply_permutation(spec, permuted, found)
    assert all(torch.equal(restored[k], sd[k]) for k in sd)
    other = copy.deepcopy(model)
    other.load_state_dict(permuted)
    torch.testing.assert_close(outputs(other, x), outputs(model, x), atol=2e-5, rtol=1e-5)


def test_matching_increases_the_inner_product_and_is_seeded():
    torch.manual_seed(0)
    from fusion_engine.bench.digits import make_mlp
    a, b = make_mlp((32, 32), seed=1), make_mlp((32, 32), seed=2)
    spec = mlp_permutation_spec(a)
    sa, sb = a.state_dict(), b.state_dict()

    def inner(s):
        return sum(float((sa[k] * s[k]).sum()) for k in spec.param_shapes)

    perms = weight_matching(spec, sa, sb, seed=3)
    assert inner(apply_permutation(spec, sb, perms)) > inner(sb) + 1.0
    again = weight_matching(spec, sa, sb, seed=3)
    assert all(torch.equal(perms[p], again[p]) for p in perms)
    one_sweep = weight_matching(spec, sa, sb, seed=3, max_iter=1)
    assert inner(apply_permutation(spec, sb, perms)) >= inner(apply_permutation(spec, sb, one_sweep)) - 1e-6


def test_validation():
    from fusion_engine.bench.digits import make_mlp
    a = make_mlp((8,), seed=1)
    spec = mlp_permutation_spec(a)
    with pytest.raises(ShapeMismatchError, match="params_b"):
        weight_matching(spec, a.state_dict(), make_mlp((9,), seed=1).state_dict())
    with pytest.raises(ConfigError, match="max_iter"):
        weight_matching(spec, a.state_dict(), a.state_dict(), max_iter=0)


@pytest.mark.parametrize("case", ["mlp", "resnet", "vgg"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_grouped_fast_path_equals_per_slot_path(case, dtype, monkeypatch):
    """The cached, grouped whole-axis products give the permutations of the plain per-slot products
    (two independently initialised models, random starting permutations)."""
    import importlib

    wm = importlib.import_module("fusion_engine.alignment.weight_matching")
    make, build, _ = CASES[case]
    a = make()
    spec = build(a)
    b = copy.deepcopy(a)  # an independent model of the same architecture: fresh random weights
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for w in b.parameters():
            w.copy_(torch.randn(w.shape, generator=g) * (float(w.std()) if w.numel() > 1 else 1.0))
    sa = {k: v.to(dtype) if v.is_floating_point() else v for k, v in a.state_dict().items()}
    sb = {k: v.to(dtype) if v.is_floating_point() else v for k, v in b.state_dict().items()}
    init = spec.random(seed=5)
    fast = weight_matching(spec, sa, sb, seed=2, init_perms=init)
    monkeypatch.setattr(wm._SlotFeatures, "gathers", lambda self, perm, slot: None)
    slow = weight_matching(spec, sa, sb, seed=2, init_perms=init)
    assert all(torch.equal(fast[p], slow[p]) for p in spec.perm_sizes)


def test_costs_computed_ahead_of_the_lap_solves_give_the_sequential_result(monkeypatch):
    """The next cost is built before the current LAP is solved only when that LAP cannot change it."""
    import importlib

    from fusion_engine.bench.digits import make_mlp
    wm = importlib.import_module("fusion_engine.alignment.weight_matching")  # the module, not the function
    pairs = [(make_mlp((24, 24, 24), seed=s), make_mlp((24, 24, 24), seed=s + 10)) for s in range(4)]

    def run(independent):
        with monkeypatch.context() as m:
            if independent is not None:
                m.setattr(wm, "_independent", independent)
            return [weight_matching(mlp_permutation_spec(a), a.state_dict(), b.state_dict(), seed=s, max_iter=1)
                    for s, (a, b) in enumerate(pairs)]

    def same(x, y):
        return all(torch.equal(p[k], q[k]) for p, q in zip(x, y) for k in p)

    sequential = run(lambda parts, perm: False)
    assert same(run(None), sequential)
    assert not same(run(lambda parts, perm: True), sequential)  # building every cost early would be wrong here


def test_skipping_unchanged_solves_gives_the_plain_loops_result(monkeypatch):
    """A permutation whose inputs did not change since its last solve is not solved again; the result
    is still that of the plain Git Re-Basin loop, which solves every permutation in every sweep."""
    import importlib

    from scipy.optimize import linear_sum_assignment

    from fusion_engine.bench.digits import make_mlp
    wm = importlib.import_module("fusion_engine.alignment.weight_matching")
    a, b = make_mlp((40, 40, 40), seed=3), make_mlp((40, 40, 40), seed=4)
    spec = mlp_permutation_spec(a)
    sa, sb = a.state_dict(), b.state_dict()

    def plain_loop(seed):
        names, perms = list(spec.perm_sizes), spec.identity()
        g = torch.Generator().manual_seed(seed)
        solves = 0
        for _ in range(100):
            progress = False
            for j in torch.randperm(len(names), generator=g).tolist():
                p, n = names[j], spec.perm_sizes[names[j]]
                sim = torch.zeros(n, n, dtype=torch.float64)
                for name, axis in spec.perm_to_axes[p]:
                    w_b = sb[name]
                    for other_axis, q in enumerate(spec.axes_to_perm[name]):
                        if other_axis != axis and q is not None:
                            w_b = w_b.index_select(other_axis, perms[q])
                    sim += (sa[name].movedim(axis, 0).reshape(n, -1).double()
                            @ w_b.movedim(axis, 0).reshape(n, -1).double().T)
                cols = torch.from_numpy(linear_sum_assignment(sim.numpy(), maximize=True)[1])
                solves += 1
                rows = torch.arange(n)
                progress = progress or bool(sim[rows, cols].sum() > sim[rows, perms[p]].sum() + 1e-12)
                perms[p] = cols
            if not progress:
                return perms, solves

    calls = []
    solve = wm.ops.linear_assignment
    monkeypatch.setattr(wm.ops, "linear_assignment", lambda *a, **k: calls.append(1) or solve(*a, **k))
    for seed in range(3):
        calls.clear()
        ours = weight_matching(spec, {k: v.double() for k, v in sa.items()}, {k: v.double() for k, v in sb.items()},
                               seed=seed)
        expected, solves = plain_loop(seed)
        assert all(torch.equal(ours[p], expected[p]) for p in spec.perm_sizes), seed
        assert len(calls) < solves, (len(calls), solves)
