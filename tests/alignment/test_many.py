"""MergeMany: K permuted copies of one model are aligned into one universe (all aligned copies equal),
for weight and activation matching, on MLPs, ResNets and transformers (GQA included)."""

from __future__ import annotations

import copy

import pytest
import torch

from fusion_engine.alignment import (
    activation_matching_many,
    apply_permutation,
    interpolate_many,
    weight_matching_many,
)
from fusion_engine.errors import ConfigError

from test_permutation_spec import CASES, outputs


def copies(case, k=3):
    make, build, inputs = CASES[case]
    model = make()
    spec = build(model)
    sd = model.state_dict()
    sds = [sd] + [apply_permutation(spec, sd, spec.random(seed=20 + i)) for i in range(k - 1)]
    return model, spec, sds, inputs


def assert_one_universe(model, spec, sds, perms, inputs):
    aligned = [apply_permutation(spec, sd, p) for sd, p in zip(sds, perms)]
    for other in aligned[1:]:
        assert all(torch.equal(other[k], aligned[0][k]) for k in aligned[0])
    merged = copy.deepcopy(model)
    merged.load_state_dict(interpolate_many(aligned))
    x = inputs()
    torch.testing.assert_close(outputs(merged, x), outputs(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["mlp", "resnet", "llama_gqa"])
def test_weight_matching_many_recovers_planted_permutations(case):
    model, spec, sds, inputs = copies(case)
    assert_one_universe(model, spec, sds, weight_matching_many(spec, sds), inputs)


@pytest.mark.parametrize("case", ["mlp", "llama_gqa"])
def test_activation_matching_many_recovers_planted_permutations(case):
    model, spec, sds, inputs = copies(case)
    models = []
    for sd in sds:
        m = copy.deepcopy(model)
        m.load_state_dict(sd)
        models.append(m)
    torch.manual_seed(0)
    perms = activation_matching_many(spec, models, [inputs(), inputs()])
    assert_one_universe(model, spec, sds, perms, inputs)


def test_needs_two_models():
    model, spec, sds, _ = copies("mlp")
    with pytest.raises(ConfigError, match="at least two"):
        weight_matching_many(spec, sds[:1])
