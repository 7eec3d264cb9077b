"""Merges are differentiable as mergekit 0.1.5's are: the exact torch path taken when an input
requires grad gives mergekit's values and gradients, passes gradcheck in float64, and keeps
mergekit's finite gradients at its singular inputs."""

import pytest
import torch

from fusion_engine.errors import ConfigError
from fusion_engine.methods import merge_tensors, merge_state_dicts

mergekit_methods = pytest.importorskip("mergekit.merge_methods")

TASK_METHODS = ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
                "della", "della_linear"]
RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")

# (method, input count, base index, parameters)
CASES = [
    ("linear", 3, None, {"weight": [0.2, 0.5, 1.0]}),
    ("linear", 2, None, {"weight": [0.2, -0.7], "normalize": False}),
    ("slerp", 2, 0, {"t": 0.3}),
    ("nuslerp", 2, None, {"weight": [0.3, 0.7]}),
    ("nuslerp", 3, 0, {"weight": [0.3, 0.7]}),
    ("nuslerp", 2, None, {"weight": [0.3, 0.7], "nuslerp_flatten": False}),
    ("nuslerp", 2, None, {"weight": [0.3, 0.7], "nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("multislerp", 3, None, {"weight": [0.3, 0.7, 0.2]}),
    ("multislerp", 3, 0, {"weight": [0.3, 0.7]}),
    ("karcher", 3, None, {"tol": 1e-8}),
    ("model_stock", 4, 0, {}),
    ("model_stock", 4, 0, {"filter_wise": True}),
    ("nearswap", 2, 0, {"t": 0.5}),
    ("passthrough", 1, None, {"scale": 0.5}),
    ("sce", 4, 0, {}),
    ("sce", 4, 0, {"select_topk": 0.5}),
    ("ram", 3, 0, {"epsilon": 0.3}),
    ("ramplus_tl", 3, 0, {"epsilon": 0.3, "r": 0.5, "alpha": 0.8}),
    ("arcee_fusion", 2, 0, {}),
]


def _inputs(count, shape=(3, 5), seed=12):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, dtype=torch.float64, generator=generator, requires_grad=True) for _ in range(count)]


def _grads(result, inputs):
    return torch.autograd.grad(result.square().sum(), inputs)


@pytest.mark.parametrize("method,count,base_index,parameters", CASES)
def test_values_and_gradients_match_mergekit(method, count, base_index, parameters):
    inputs = _inputs(count)
    expected = mergekit_methods.merge_tensors(inputs, method, base_index=base_index, parameters=parameters)
    actual = merge_tensors(inputs, method, base_index=base_index, parameters=parameters)
    assert actual.grad_fn is not None
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(_grads(actual, inputs), _grads(expected, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method,count,base_index,parameters", CASES)
def test_gradients_match_finite_differences(method, count, base_index, parameters):
    inputs = _inputs(count, shape=(2, 3))
    assert torch.autograd.gradcheck(
        lambda *xs: merge_tensors(list(xs), method, base_index=base_index, parameters=parameters), inputs)


@pytest.mark.parametrize("method", TASK_METHODS)
@pytest.mark.parametrize("rescale", [False, True])
def test_task_vector_methods_match_mergekit(method, rescale):
    """Masks are constant, gradients flow through the kept entries and the L1 rescale; the random
    methods with random_seed=None draw mergekit's masks from torch's global generator."""
    inputs = _inputs(4, shape=(4, 8), seed=42)
    parameters = {"weight": [0.7, -0.2, 0.5], "density": 0.6, "normalize": True, "rescale": rescale,
                  "lambda": 0.8}
    ours = dict(parameters, random_seed=None) if method in RANDOM else parameters
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        expected = mergekit_methods.merge_tensors(inputs, method, base_index=0, parameters=parameters)
        torch.manual_seed(123)
        actual = merge_tensors(inputs, method, base_index=0, parameters=ours)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(_grads(actual, inputs), _grads(expected, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", TASK_METHODS)
def test_task_vector_gradcheck(method):
    """Seeded Philox masks are fixed functions of the seed: the merge is smooth in the inputs
    away from the mask boundaries (random inputs), and gradcheck holds."""
    inputs = _inputs(3, shape=(2, 5), seed=3)
    parameters = {"weight": [0.6, 0.9], "density": 0.6, "rescale": True}
    assert torch.autograd.gradcheck(
        lambda *xs: merge_tensors(list(xs), method, base_index=0, parameters=parameters), inputs)


def test_philox_masks_are_the_fused_paths():
    """With a seed, the differentiable path draws the fused path's Philox masks: same values."""
    inputs = _inputs(3, shape=(4, 8), seed=7)
    parameters = {"weight": [0.6, 0.9], "density": 0.5, "random_seed": 11}
    for method in RANDOM:
        with_grad = merge_tensors(inputs, method, base_index=0, parameters=parameters, name="w")
        with torch.no_grad():
            fused = merge_tensors(inputs, method, base_index=0, parameters=parameters, name="w")
        assert fused.grad_fn is None and with_grad.grad_fn is not None
        torch.testing.assert_close(with_grad, fused, rtol=1e-12, atol=1e-12)


def test_slerp_and_nuslerp_collinear_rows_have_finite_gradients():
    a = torch.tensor([[1.0, 0.0]] * 4, dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    result = merge_tensors([a, b], "nuslerp", parameters={"weight": [0.75, 0.25], "nuslerp_flatten": False})
    result.sum().backward()
    torch.testing.assert_close(a.grad[:3], torch.full((3, 2), 0.75, dtype=torch.float64))
    torch.testing.assert_close(b.grad[:3], torch.full((3, 2), 0.25, dtype=torch.float64))
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([2.0, 4.0], dtype=torch.float64, requires_grad=True)
    merge_tensors([x, y], "slerp", base_index=0, parameters={"t": 0.25}).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 0.75))
    torch.testing.assert_close(y.grad, torch.full_like(y, 0.25))


@pytest.mark.parametrize("value", [0.0, 1e-7])
def test_karcher_below_tolerance_gives_zero_gradients(value):
    inputs = [torch.full((3,), value, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    result = merge_tensors(inputs, "karcher")
    torch.testing.assert_close(result, torch.zeros(3, dtype=torch.float64))
    result.sum().backward()
    for tensor in inputs:
        torch.testing.assert_close(tensor.grad, torch.zeros_like(tensor))


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_singularity_keeps_the_base_with_finite_gradients(filter_wise):
    base = torch.tensor([[2.0, 3.0]], dtype=torch.float64, requires_grad=True)
    a = torch.tensor([[3.0, 3.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[1.0, 3.0]], dtype=torch.float64, requires_grad=True)
    result = merge_tensors([base, a, b], "model_stock", base_index=0, parameters={"filter_wise": filter_wise})
    torch.testing.assert_close(result, base.detach())
    result.sum().backward()
    torch.testing.assert_close(base.grad, torch.ones_like(base))
    for tensor in (a, b):
        torch.testing.assert_close(tensor.grad, torch.zeros_like(tensor))


def test_no_graph_without_grad_and_module_parameters_get_gradients():
    models = [torch.nn.Linear(3, 2) for _ in range(2)]
    merged = merge_state_dicts(models, "linear", parameters={"weight": [0.25, 0.75]})
    sum(t.sum() for t in merged.values()).backward()
    for model, coefficient in zip(models, (0.25, 0.75)):
        for parameter in model.parameters():
            torch.testing.assert_close(parameter.grad, torch.full_like(parameter, coefficient))
    with torch.no_grad():
        merged = merge_state_dicts(models, "linear", parameters={"weight": [0.25, 0.75]})
    assert not any(t.requires_grad for t in merged.values())


def test_native_api_stays_strict_on_a_zero_weight_sum():
    inputs = _inputs(2)
    with pytest.raises(ConfigError, match="sum to 0"):
        merge_tensors(inputs, "linear", parameters={"weight": [1.0, -1.0]})
