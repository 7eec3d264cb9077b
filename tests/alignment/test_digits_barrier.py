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
===========================  =======  =============
"""

from __future__ import annotations

import pytest
import torch

from fusion_engine.alignment import align_and_merge, ot_fusion, zipit
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
