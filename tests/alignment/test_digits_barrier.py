"""A real outcome on scikit-learn's digits: alignment removes most of the loss barrier between two MLPs.

Two MLPs 64-48-48-10 trained from seeds 1 and 2 (Adam, lr 1e-3, 12 epochs, data split seed 0).
Training-set loss barrier at the midpoint, ``L((A + B)/2) - (L(A) + L(B))/2``, and test accuracy
of the midpoint (CPU, torch 2.13; each aligned barrier must be at most half the naive one):

===========================  =======  =============
merge at α = 0.5             barrier  test accuracy
===========================  =======  =============
naive interpolation          0.872    0.817
weight matching              0.091    0.924
activation matching          0.124    0.918
OT fusion, exact             0.089    0.940
OT fusion, entropic 0.01     0.124    0.933
OT fusion, activations       0.153    0.898
ZipIt! (full)                0.102    0.949
weight matching + REPAIR     0.055    0.924
naive + REPAIR               0.359    0.906
STE (Git Re-Basin §3.3)      0.074    0.942
Sinkhorn re-basin, L_mid     0.067    0.944
===========================  =======  =============

The learned methods (100 steps on 256-example batches of the training set; Sinkhorn re-basin starts
from the weight-matching permutations) must beat weight matching's barrier.
"""

from __future__ import annotations

import pytest
import torch

from fusion_engine.alignment import (
    align_and_merge,
    apply_permutation,
    interpolate,
    mlp_permutation_spec,
    ot_fusion,
    sinkhorn_rebasin,
    ste_rebasin,
    weight_matching,
    zipit,
)
from fusion_engine.bench.digits import evaluate, load_digits_split, make_mlp, train_mlp

HIDDEN = (48, 48)
EPOCHS = 12


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster and immune to a loaded machine
    try:
        data = load_digits_split(seed=0)
        a = train_mlp(data, hidden=HIDDEN, seed=1, epochs=EPOCHS)
        b = train_mlp(data, hidden=HIDDEN, seed=2, epochs=EPOCHS)
    finally:
        torch.set_num_threads(threads)
    return data, a, b


def barrier(data, a, b, merged) -> float:
    ends = (evaluate(a, data.x_train, data.y_train).loss + evaluate(b, data.x_train, data.y_train).loss) / 2
    return evaluate(merged, data.x_train, data.y_train).loss - ends


METHODS = {
    "weight_matching": dict(method="weight_matching"),
    "activation_matching": dict(method="activation_matching"),
    "ot_fusion_exact": dict(method="ot_fusion"),
    "ot_fusion_entropic": dict(method="ot_fusion", exact=False, reg=0.01),
    "ot_fusion_activations": dict(method="ot_fusion", mode="activations"),
    "zipit": dict(method="zipit"),
}

# unit features for activation-based methods are pre-activations (the layer's output)


def test_naive_midpoint_has_a_clear_barrier(trained):
    data, a, b = trained
    naive = barrier(data, a, b, align_and_merge(a, b, "none"))
    assert naive > 0.2


@pytest.mark.parametrize("name", list(METHODS))
def test_alignment_halves_the_barrier(trained, name):
    data, a, b = trained
    naive = barrier(data, a, b, align_and_merge(a, b, "none"))
    merged = align_and_merge(a, b, batches=[data.x_train], **METHODS[name])
    aligned = barrier(data, a, b, merged)
    assert aligned <= 0.5 * naive, f"{name}: barrier {aligned:.3f} vs naive {naive:.3f}"
    assert evaluate(merged, data.x_test, data.y_test).accuracy > 0.85


def test_partial_zip_and_width_changing_ot(trained):
    data, a, b = trained
    naive = barrier(data, a, b, align_and_merge(a, b, "none"))
    partial = zipit(a, b, [data.x_train], stop_at=1)  # first hidden layer zipped, two heads after it
    assert barrier(data, a, b, partial) <= 0.5 * naive
    # OT onto a narrower target (32 units per layer): soft alignment compresses both models
    target = make_mlp((32, 32), seed=3).state_dict()
    fused = ot_fusion([a, b], target=target, reg=0.01)
    narrow = make_mlp((32, 32), seed=0)
    narrow.load_state_dict(fused)
    assert evaluate(narrow, data.x_test, data.y_test).accuracy > 0.5  # chance is 0.1


@pytest.mark.parametrize("method", ["ste", "sinkhorn_midpoint"])
def test_learned_alignment_beats_weight_matching(trained, method):
    data, a, b = trained
    spec = mlp_permutation_spec(a)
    sa, sb = a.state_dict(), b.state_dict()
    batches = [(data.x_train[i:i + 256], data.y_train[i:i + 256]) for i in range(0, len(data.y_train), 256)]
    wm = weight_matching(spec, sa, sb)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if method == "ste":
            perms = ste_rebasin(spec, a, sa, sb, batches, steps=100, lr=1e-2)
        else:
            perms = sinkhorn_rebasin(spec, a, sa, sb, batches, objective="midpoint", steps=100, lr=0.1,
                                     init_perms=wm)
    finally:
        torch.set_num_threads(threads)

    def midpoint(perms):
        merged = make_mlp(HIDDEN)
        merged.load_state_dict(interpolate(sa, apply_permutation(spec, sb, perms), 0.5))
        return merged

    learned, matched = barrier(data, a, b, midpoint(perms)), barrier(data, a, b, midpoint(wm))
    assert learned < 0.9 * matched, f"{method}: barrier {learned:.3f} vs weight matching {matched:.3f}"
    assert evaluate(midpoint(perms), data.x_test, data.y_test).accuracy > 0.9


def test_repair_lowers_the_barrier(trained):
    data, a, b = trained
    for method in ("none", "weight_matching"):
        plain = barrier(data, a, b, align_and_merge(a, b, method))
        repaired = barrier(data, a, b, align_and_merge(a, b, method, batches=[data.x_train], repair=True))
        assert repaired < 0.75 * plain, f"{method}: REPAIR barrier {repaired:.3f} vs {plain:.3f}"
