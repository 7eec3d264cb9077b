"""The objects install() puts into mergekit's registry honour mergekit's method interface (batched
and group kinds, spec, attributes), mergekit's arithmetic at degenerate inputs, and its autograd."""

import math

import pytest
import torch

import fusion_engine.compat.mergekit as fe_mergekit
from fusion_engine.errors import ConfigError
from fusion_engine.methods import merge_tensors as fe_merge_tensors

pytest.importorskip("mergekit")
from mergekit.merge_methods import (BatchedMergeMethod, GroupMergeMethod, TensorBatch, TensorGroup,  # noqa: E402
                                    merge_state_dicts, merge_tensors, registry)

ORIGINALS = dict(registry._METHODS)


@pytest.fixture
def installed():
    names = fe_mergekit.install()
    yield names
    fe_mergekit.uninstall()


def _inputs(count, shape=(4, 6), seed=0, grad=False):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, dtype=torch.float64, generator=generator, requires_grad=grad) for _ in range(count)]


def test_installed_objects_have_mergekit_interface(installed):
    for name in installed:
        ours, original = registry.get(name), ORIGINALS[name]
        assert ours is not original and ours.spec == original.spec
        assert ours.supports_batching == original.supports_batching
        assert isinstance(ours, BatchedMergeMethod if original.supports_batching else GroupMergeMethod)
    assert {n for n in installed if registry.get(n).supports_batching} == {"linear", "slerp"}
    ties = registry.get("ties")
    for attribute in ("sparsification_method", "consensus_method", "default_normalize", "default_rescale",
                      "method_name", "method_pretty_name", "method_reference_url"):
        assert getattr(ties, attribute) == getattr(ORIGINALS["ties"], attribute)


def test_merge_batch_and_implementation_take_mergekit_packed_batches(installed):
    groups = [_inputs(2, seed=s) for s in range(3)]
    batch = TensorBatch(tuple(torch.stack([g[i] for g in groups]) for i in range(2)), base_index=0)
    weight = torch.tensor([[0.25, 0.75], [1.0, 1.0], [0.5, -0.25]], dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    for name, params in (("linear", {"weight": weight, "normalize": True}), ("slerp", {"t": t})):
        expected = ORIGINALS[name].merge_batch(batch, **params)
        torch.testing.assert_close(registry.get(name).merge_batch(batch, **params), expected)
        torch.testing.assert_close(registry.get(name).implementation(batch, **params), expected)
    results = registry.get("linear")([TensorGroup.from_tensors(g) for g in groups],
                                     parameters={"weight": [0.25, 0.75]})
    for result, group in zip(results, groups):
        torch.testing.assert_close(result, 0.25 * group[0] + 0.75 * group[1])


@pytest.mark.parametrize("other", [1.0, 2.0])
def test_zero_weight_sum_follows_mergekit_division_and_native_stays_strict(installed, other):
    source = torch.ones(3)
    result = merge_tensors([source, source * other], "linear", parameters={"weight": [1.0, -1.0]})
    expected = math.nan if other == 1.0 else -math.inf
    torch.testing.assert_close(result, torch.full_like(source, expected), equal_nan=True)
    with pytest.raises(ConfigError, match="sum to 0"):
        fe_merge_tensors([source, source * other], "linear", parameters={"weight": [1.0, -1.0]})


@pytest.mark.parametrize("name,count,base,params", [
    ("linear", 3, None, {"weight": [0.2, 0.5, 0.3]}),
    ("slerp", 2, 0, {"t": 0.3}),
    ("ties", 3, 0, {"weight": [0.7, 0.4], "density": 0.5, "rescale": True}),
    ("dare_ties", 3, 0, {"weight": [0.7, 0.4], "density": 0.5}),
    ("della", 3, 0, {"weight": [0.7, 0.4], "density": 0.5, "epsilon": 0.1}),
    ("karcher", 3, None, {}),
    ("model_stock", 3, 0, {}),
    ("sce", 3, 0, {"select_topk": 0.5}),
    ("arcee_fusion", 2, 0, {}),
])
def test_gradients_through_installed_methods_are_mergekits(name, count, base, params):
    inputs = _inputs(count, grad=True)
    results = []
    for install in (False, True):
        if install:
            fe_mergekit.install()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(5)
                merged = merge_tensors(inputs, name, base_index=base, parameters=params)
            results.append((merged, torch.autograd.grad(merged.square().sum(), inputs)))
        finally:
            fe_mergekit.uninstall()
    (expected, expected_grads), (actual, actual_grads) = results
    assert actual.grad_fn is not None
    torch.testing.assert_close(actual, expected)
    for got, want in zip(actual_grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_module_parameters_keep_their_graph_and_no_grad_records_none(installed):
    models = [torch.nn.Linear(3, 2) for _ in range(2)]
    merged = merge_state_dicts(models, "linear", parameters={"weight": [0.25, 0.75]})
    sum(t.sum() for t in merged.values()).backward()
    for model, coefficient in zip(models, (0.25, 0.75)):
        torch.testing.assert_close(model.weight.grad, torch.full_like(model.weight, coefficient))
    with torch.no_grad():
        merged = merge_state_dicts(models, "ties", base=0, parameters={"weight": 1.0, "density": 0.5})
    assert not any(t.requires_grad for t in merged.values())


def test_seeded_install_uses_philox_masks_reproducibly():
    inputs = _inputs(3)
    fe_mergekit.install(["dare_linear"], seed=7)
    try:
        first = merge_tensors(inputs, "dare_linear", base_index=0, parameters={"weight": 1.0, "density": 0.5},
                              name="w")
        torch.manual_seed(99)  # the global generator plays no part
        second = merge_tensors(inputs, "dare_linear", base_index=0, parameters={"weight": 1.0, "density": 0.5},
                               name="w")
    finally:
        fe_mergekit.uninstall()
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_unseeded_random_methods_draw_mergekits_masks_without_grad(name):
    inputs = _inputs(3, shape=(8, 16))
    params = {"weight": [0.7, 0.4], "density": 0.4, "epsilon": 0.1} if name.startswith("della") else \
        {"weight": [0.7, 0.4], "density": 0.4}
    results = []
    for install in (False, True):
        if install:
            fe_mergekit.install([name])
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(3)
                results.append(merge_tensors(inputs, name, base_index=0, parameters=params))
        finally:
            fe_mergekit.uninstall()
    torch.testing.assert_close(results[1], results[0])
