"""magmax, consensus (TALL masks) and pcb against references written here from the papers' and the
authors' code (stacked K × d tensors, sorts, argmax: not the engine's streamed slices and
selections), in fp64 to 1e-10 and fp32 to 1e-4 relative; parameters and errors."""

import pytest
import torch

import fusion_engine as fe

from test_subspace_methods import assert_rel, check_defaults_and_base_position, check_equals_reference, models

# ------------------------------------------------------------------------------- references (fp64)


def stacked(base, xs):
    b = base.double().reshape(-1)
    return b, torch.stack([x.double().reshape(-1) - b for x in xs])


def magmax_reference(base, xs, lam):
    """argmax of |τ| over the tasks, the last one on ties (flip, then the first maximum)."""
    b, tv = stacked(base, xs)
    last = tv.shape[0] - 1 - tv.abs().flip(0).argmax(0)
    return (b + lam * tv.gather(0, last.unsqueeze(0))[0]).reshape(base.shape)


def consensus_reference(base, xs, k, tall_lambda, lam):
    """The tall_masks rule on weights: |θ0 − θt| > λ_tall |θ_MT − θt|, θ_MT = θ0 + Σ τ; votes ≥ k."""
    b, tv = stacked(base, xs)
    ft = tv + b
    multi = b + tv.sum(0)
    masks = (b - ft).abs() > (multi - ft).abs() * tall_lambda
    return (b + lam * tv.sum(0) * (masks.sum(0) >= k)).reshape(base.shape)


def pcb_reference(base, xs, ratio, lam):
    """The authors' PCB_merge (pcb-merging.py) on the K × d task vectors of one tensor."""
    b, checks = stacked(base, xs)
    n, d = checks.shape

    def normalize(x):  # a constant row (0/0 in the authors' code) gives 0
        lo, hi = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
        return torch.where(hi > lo, (x - lo) / torch.where(hi > lo, hi - lo, 1.0), 0.0)

    def clamp(x, min_ratio, max_ratio):
        s = x.sort(1).values
        return torch.clamp(x, s[:, int(d * min_ratio)].unsqueeze(1), s[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1))

    magnitude = clamp(checks.abs(), 0.0001, 0.0001)
    clamped = checks.sign() * magnitude
    score = torch.exp(n * normalize(magnitude) ** 2) * torch.tanh(checks * checks.sum(0))
    scale = normalize(clamp(score, 1 - ratio, 0))
    merged = (clamped * scale).sum(0) / torch.clamp(scale.sum(0), min=1e-12)
    return (b + lam * merged).reshape(base.shape)


CASES = {
    "magmax": (magmax_reference, {"lambda": 0.7}),
    "consensus": (consensus_reference, {"k": 2, "tall_lambda": 0.4, "lambda": 1.1}),
    "pcb": (pcb_reference, {"ratio": 0.2, "lambda": 0.9}),
}


@pytest.mark.parametrize("method", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape,k", [((24, 16), 3), ((300_001,), 4), ((9, 9), 2), ((3, 5, 7), 5)])
def test_equals_reference(method, dtype, shape, k):
    check_equals_reference(CASES, method, dtype, shape, k)


@pytest.mark.parametrize("method", list(CASES))
def test_defaults_base_position_and_inputs_untouched(method):
    check_defaults_and_base_position(CASES, method)


def test_published_defaults():
    spec = {m: {p.name: p.default for p in fe.methods.get(m).parameters} for m in CASES}
    assert spec == {"magmax": {"lambda": 0.5}, "consensus": {"k": 2, "tall_lambda": 0.6, "lambda": 1.0},
                    "pcb": {"ratio": 0.1, "lambda": 1.0}}


def test_magmax_later_task_wins_ties():
    base = torch.zeros(3)
    a, b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([-1.0, 2.0, 0.25])
    got = fe.merge_tensors([base, a, b], "magmax", base_index=0, parameters={"lambda": 1.0})
    assert got.tolist() == [-1.0, 2.0, 0.5]


def test_consensus_masks_are_strict_and_count_votes():
    base = torch.zeros(4)
    a = torch.tensor([1.0, 1.0, 0.0, 3.0])
    b = torch.tensor([1.0, -1.0, 2.0, 0.0])
    # Σ τ = [2, 0, 2, 3]; |τ_a| > |Σ − τ_a| = [1, 1, 2, 0] → [F, F, F, T]; τ_b: [1, 1, 0, 3] → [F, F, T, F]
    one = fe.merge_tensors([base, a, b], "consensus", base_index=0, parameters={"k": 1, "tall_lambda": 1.0})
    assert one.tolist() == [0.0, 0.0, 2.0, 3.0]
    two = fe.merge_tensors([base, a, b], "consensus", base_index=0, parameters={"k": 2, "tall_lambda": 1.0})
    assert two.tolist() == [0.0, 0.0, 0.0, 0.0]
    none = fe.merge_tensors([base, a, b], "consensus", base_index=0, parameters={"k": 0})
    assert none.tolist() == [2.0, 0.0, 2.0, 3.0]  # k = 0: plain task arithmetic


def test_pcb_keeps_about_ratio_of_each_task():
    base, xs = models((100, 50), 3)
    got = fe.merge_tensors([base, *xs], "pcb", base_index=0, parameters={"ratio": 0.1})
    changed = float(((got - base).abs() > 0).double().mean())
    assert 0.1 <= changed <= 0.3  # the union of three top-10 % sets


def test_pcb_constant_task_vector_contributes_nothing():
    """min–max normalisation of a constant row is 0 here (the authors' code divides 0 by 0)."""
    base, xs = models((30, 20), 2)
    got = fe.merge_tensors([base, *xs, base.clone()], "pcb", base_index=0, parameters={"ratio": 0.3})
    assert torch.isfinite(got).all()
    assert_rel(got, pcb_reference(base, [*xs, base.clone()], 0.3, 1.0), 1e-10)
