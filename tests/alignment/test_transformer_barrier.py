"""A tiny Llama (GQA) trained twice on a Markov-chain language: barriers at the midpoint, naive vs aligned.

Two 2-layer models (hidden 32, 4 query / 2 key-value heads, FFN 64) trained from seeds 1 and 2 for 150
Adam steps (``fusion_engine.bench.tiny_lm``); test-set next-token loss barrier at the midpoint,
``L((A + π(B))/2) − (L(A) + L(B))/2`` (CPU, torch 2.13, transformers 5):

=====================================  =======
merge at α = 0.5                       barrier
=====================================  =======
naive interpolation                    1.242
weight matching                        1.205
activation matching (all groups)       1.180
OT fusion, exact                       1.076
OT fusion, entropic (reg 0.01)         0.993
ZipIt! (full)                          1.240
Sinkhorn re-basin, L_mid (30 steps)    1.142
STE (30 steps)                         0.907
=====================================  =======

Independently trained transformers are far harder to align than MLPs: weight and activation
matching remove little of the barrier; layer-wise OT fusion (heads one to one, residual and FFN
transported) removes 13-20 % of it, ZipIt! nothing, and the learned alignment, which optimises the
midpoint loss, a quarter.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from fusion_engine.alignment import (
    activation_matching,
    apply_permutation,
    interpolate,
    ot_fusion,
    ste_rebasin,
    zipit,
    transformer_permutation_spec,
    weight_matching,
)

pytest.importorskip("transformers")
from fusion_engine.bench.tiny_lm import lm_loss, markov_data, train_lm  # noqa: E402

pytestmark = pytest.mark.slow  # two trainings: ~10 s on a quiet 2-core machine, ~30 s on a busy one


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = markov_data(seed=0, length=16)
        a = train_lm(data, seed=1, steps=150)
        b = train_lm(data, seed=2, steps=150)
    finally:
        torch.set_num_threads(threads)
    return data, a, b


def barrier(data, a, b, perms, spec) -> float:
    merged = copy.deepcopy(a)
    merged.load_state_dict(interpolate(a.state_dict(), apply_permutation(spec, b.state_dict(), perms), 0.5))
    return lm_loss(merged, data.test) - (lm_loss(a, data.test) + lm_loss(b, data.test)) / 2


def lm_objective(out, targets):
    return F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())


def test_barriers_naive_and_aligned(trained):
    data, a, b = trained
    spec = transformer_permutation_spec(a)
    naive = barrier(data, a, b, spec.identity(), spec)
    assert naive > 0.5
    matched = barrier(data, a, b, weight_matching(spec, a.state_dict(), b.state_dict()), spec)
    activations = barrier(data, a, b, activation_matching(spec, a, b, [data.train[:256, :-1]]), spec)
    batches = [(data.train[i:i + 128, :-1], data.train[i:i + 128, 1:]) for i in range(0, 512, 128)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ste = barrier(data, a, b, ste_rebasin(spec, a, a.state_dict(), b.state_dict(), batches, steps=30, lr=1e-2,
                                              loss_fn=lm_objective), spec)
    finally:
        torch.set_num_threads(threads)
    fused = copy.deepcopy(a)
    fused.load_state_dict(ot_fusion([a, b], spec=spec, exact=False, reg=0.01))
    ot = lm_loss(fused, data.test) - (lm_loss(a, data.test) + lm_loss(b, data.test)) / 2
    zipped = lm_loss(zipit(a, b, [data.train[:256, :-1]], spec=spec), data.test)
    zipped -= (lm_loss(a, data.test) + lm_loss(b, data.test)) / 2
    print(f"naive {naive:.3f}  weight matching {matched:.3f}  activation matching {activations:.3f}  "
          f"OT fusion {ot:.3f}  ZipIt {zipped:.3f}  STE {ste:.3f}")
    assert zipped < 1.1 * naive
    assert activations < naive
    assert ot < 0.9 * naive
    assert ste < 0.85 * naive
