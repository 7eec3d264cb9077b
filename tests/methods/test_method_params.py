"""The method registry and parameter validation: mergekit's names, scopes and defaults; clear
ConfigErrors naming the parameter, the value and the valid range; contracts; fisher."""

import pytest
import torch

import fusion_engine as fe
from fusion_engine.errors import (ConfigError, DeviceMismatchError, DTypeMismatchError, MissingTensorError,
                                  NonFiniteError, ShapeMismatchError)
from fusion_engine.methods import get, names, validate_parameters
from fusion_engine.methods.registry import REQUIRED

MERGEKIT_METHODS = {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                    "breadcrumbs_ties", "della", "della_linear", "slerp", "nuslerp", "multislerp", "karcher",
                    "model_stock", "nearswap", "sce", "ram", "ramplus_tl", "arcee_fusion", "passthrough"}


TASK_VECTOR_METHODS_2024_26 = {"tsv", "iso_c", "iso_cts", "magmax", "consensus", "pcb", "wudi"}


def test_names_cover_mergekit_and_fisher():
    assert set(names()) == MERGEKIT_METHODS | {"fisher", "regmean"} | TASK_VECTOR_METHODS_2024_26
    assert list(names()) == sorted(names())


def test_specs_match_mergekit_registry():
    registry = pytest.importorskip("mergekit.merge_methods.registry")
    from mergekit.merge_methods.base import MISSING
    assert {m.spec.name for m in registry.registered_methods()} == MERGEKIT_METHODS
    for theirs in registry.registered_methods():
        ours = get(theirs.spec.name)
        our_params = {p.name: p for p in ours.parameters if p.name != "random_seed"}
        assert list(our_params) == [p.name for p in theirs.spec.parameters], ours.name
        for p in theirs.spec.parameters:
            assert our_params[p.name].scope == p.scope.value, (ours.name, p.name)
            expected = REQUIRED if p.default is MISSING else p.default
            assert our_params[p.name].default == expected, (ours.name, p.name)
        contract = theirs.spec.contract
        assert ours.base == contract.base.value
        assert (ours.min_inputs, ours.max_inputs, ours.min_non_base, ours.max_non_base) == (
            contract.min_inputs, contract.max_inputs, contract.min_non_base, contract.max_non_base), ours.name
    assert {n for n in names() if get(n).randomized} == {"dare_ties", "dare_linear", "della", "della_linear"}


def test_validate_binds_defaults_scalars_sequences_mappings():
    bound = validate_parameters("ties", {"weight": 0.5, "density": [0.2, 0.3]}, 3, base_index=0)
    assert bound == {"int8_mask": False, "normalize": True, "rescale": False, "lambda": 1.0,
                     "weight": [0.5, 0.5], "density": [0.2, 0.3]}
    bound = validate_parameters("linear", {"weight": {"a": 1, "b": 2}}, 2, ids=["a", "b"])
    assert bound["weight"] == [1.0, 2.0]
    # per-non-base values aligned with all inputs: the base's entry is dropped
    assert validate_parameters("ties", {"weight": [9, 1, 2]}, 3, base_index=0)["weight"] == [1.0, 2.0]
    # no non-base inputs: a required per-non-base parameter is not needed (mergekit returns the base)
    assert validate_parameters("ties", {}, 1, base_index=0)["weight"] == []


@pytest.mark.parametrize("method,params,n,base,message", [
    ("ties", {"weight": 1.0, "density": 1.5}, 3, 0, "density for input 1 = 1.5 is out of range; it must be a finite number in [0, 1]"),
    ("ties", {"weight": 1.0, "density": -0.1}, 3, 0, "in [0, 1]"),
    ("ties", {"density": 0.5}, 3, 0, "parameter weight is required"),
    ("ties", {"weight": 1.0, "denisty": 0.5}, 3, 0, "unknown parameter(s) denisty"),
    ("ties", {"weight": [1.0, 2.0, 3.0, 4.0]}, 3, 0, "has 4 values; expected 2 (the non-base inputs) or 3"),
    ("ties", {"weight": 1.0, "lambda": float("nan")}, 3, 0, "lambda = nan"),
    ("ties", {"weight": "heavy"}, 3, 0, "'heavy' is not a number"),
    ("ties", {"weight": 1.0, "normalize": "yes"}, 3, 0, "normalize = 'yes'; it must be true or false"),
    ("ties", {"weight": 1.0}, 3, None, "ties needs a base model"),
    ("ties", {"weight": 1.0, "lambda": [1, 2]}, 3, 0, "one value for all inputs"),
    ("della", {"weight": 1.0, "density": 0.1, "epsilon": 0.15}, 2, 0, "density ± epsilon must lie in (0, 1)"),
    ("della", {"weight": 1.0, "epsilon": 1.0}, 2, 0, "epsilon for input 1 = 1.0 is out of range"),
    ("dare_ties", {"weight": 1.0, "random_seed": -1}, 2, 0, "random_seed = -1 is out of range"),
    ("dare_ties", {"weight": 1.0, "random_seed": 0.5}, 2, 0, "random_seed = 0.5"),
    ("slerp", {"t": 0.5}, 3, 0, "slerp needs exactly 2 inputs; got 3"),
    ("slerp", {}, 2, 0, "parameter t is required"),
    ("nuslerp", {"weight": 1.0}, 2, 0, "nuslerp needs exactly 2 non-base inputs; got 1"),
    ("model_stock", {}, 2, 0, "model_stock needs at least 3 inputs; got 2"),
    ("passthrough", {}, 2, None, "passthrough needs exactly 1 inputs; got 2"),
    ("nearswap", {"t": -1.0}, 2, 0, "t = -1.0 is out of range"),
    ("karcher", {"max_iter": 2.5}, 2, None, "max_iter = 2.5"),
    ("sce", {"select_topk": 2}, 3, 0, "select_topk = 2.0 is out of range"),
    ("linear", {"weight": 1.0}, 2, 5, "base_index=5 is out of range"),
    ("nosuch", {}, 2, None, "unknown merge method 'nosuch'"),
])
def test_invalid_parameters_raise_config_error(method, params, n, base, message):
    with pytest.raises(ConfigError) as info:
        validate_parameters(method, params, n, base_index=base)
    assert message in str(info.value)


def test_merge_tensors_errors_name_the_input():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ShapeMismatchError, match="input 1 has shape"):
        fe.merge_tensors([a, torch.randn(3, 4)], "linear", parameters={"weight": 1.0})
    with pytest.raises(DTypeMismatchError, match="input 'x' has dtype torch.int64"):
        fe.merge_tensors([a, torch.ones(4, 3, dtype=torch.long)], "linear", ids=["w", "x"],
                         parameters={"weight": 1.0})
    with pytest.raises(DTypeMismatchError, match="out_dtype"):
        fe.merge_tensors([a, b], "linear", parameters={"weight": 1.0}, out_dtype=torch.int32)
    with pytest.raises(ConfigError, match="not one tensor"):
        fe.merge_tensors(a, "linear", parameters={"weight": 1.0})
    with pytest.raises(ConfigError, match="sum to 0"):
        fe.merge_tensors([a, b], "linear", parameters={"weight": [1.0, -1.0]})
    if torch.cuda.is_available():  # pragma: no cover
        with pytest.raises(DeviceMismatchError):
            fe.merge_tensors([a, b.cuda()], "linear", parameters={"weight": 1.0})


@pytest.mark.parametrize("method,params,n", [("ties", {"weight": 1.0, "density": 0.5}, 3),
                                              ("slerp", {"t": 0.5}, 2), ("ram", {}, 3), ("karcher", {}, 3)])
def test_nonfinite_inputs_are_named(method, params, n):
    tensors = [torch.randn(5, 4) for _ in range(n)]
    tensors[1][2, 1] = float("nan")
    base = None if method == "karcher" else 0
    with pytest.raises(NonFiniteError, match="input.*'bad'"):
        fe.merge_tensors(tensors, method, parameters=params, base_index=base, ids=["b", "bad", "c"][:n], name="t")
    out = fe.merge_tensors(tensors, method, parameters=params, base_index=base, check_finite=False)
    assert out.shape == (5, 4)


def test_fisher_method():
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(6, 4, generator=gen) for _ in range(3)]
    fishers = [torch.rand(6, 4, generator=gen) for _ in range(3)]
    w = [0.2, 1.0, 0.5]
    out = fe.merge_tensors(xs, "fisher", parameters={"fisher": fishers, "weight": w, "eps": 0.0})
    num = sum(wi * f * x for wi, f, x in zip(w, fishers, xs))
    den = sum(wi * f for wi, f in zip(w, fishers))
    torch.testing.assert_close(out, num / den, rtol=1e-5, atol=1e-6)
    half = fe.merge_tensors([x.bfloat16() for x in xs], "fisher", parameters={"fisher": fishers})
    assert half.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="fisher is required"):
        fe.merge_tensors(xs, "fisher")


def test_state_dict_errors():
    a = {"w": torch.ones(2), "n": torch.tensor([1])}
    b = {"w": torch.zeros(2), "n": torch.tensor([2])}
    with pytest.raises(ConfigError, match="non-floating buffer 'n' differs"):
        fe.merge_state_dicts([a, b], "linear", parameters={"weight": 1.0})
    with pytest.raises(MissingTensorError, match="different tensor names"):
        fe.merge_state_dicts([a, {"w": torch.ones(2)}], "linear", parameters={"weight": 1.0})
    merged = fe.merge_state_dicts([a, {"w": torch.zeros(2)}], "linear", parameters={"weight": 1.0}, strict=False)
    assert list(merged) == ["w"] and torch.equal(merged["w"], torch.full((2,), 0.5))
    with pytest.raises(ConfigError, match="base 'z' is not one of the models"):
        fe.merge_state_dicts({"x": a, "y": a}, "ties", base="z", parameters={"weight": 1.0})
    with pytest.raises(ConfigError, match="3 per-tensor values for 2 tensors"):
        fe.merge_state_dicts({"x": a, "y": a}, "linear",
                             parameters={"weight": fe.methods.PerGroupValues([1.0, 2.0, 3.0])})


def test_empty_tensors_and_passthrough_alias():
    e = torch.empty(0, 3)
    assert fe.merge_tensors([e, e], "slerp", base_index=0, parameters={"t": 0.5}).shape == (0, 3)
    x = torch.randn(3)
    assert fe.merge_tensors([x], "passthrough") is x  # mergekit returns the input itself too
    assert fe.merge_tensors([x], "passthrough", out_dtype=torch.float64).dtype == torch.float64
