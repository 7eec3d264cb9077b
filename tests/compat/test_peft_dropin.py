"""fusion_engine.compat.peft is a drop-in for peft.utils.merge_utils: same results (deterministic
functions exactly up to float rounding, random ones in distribution), same dtypes, same errors, and
``patch()`` routes PEFT's ``add_weighted_adapter`` through it."""

import warnings

import pytest
import torch

import fusion_engine.ops
from fusion_engine.compat import peft as fe_peft
from utils import assert_verbose_allclose

peft = pytest.importorskip("peft")
from peft.utils import merge_utils  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tensors(seed, shape=(37, 53), k=3, dtype=torch.float32):
    """Random task tensors whose magnitudes are distinct within each tensor, so the top-k is unique
    (torch.topk's choice among equal magnitudes is implementation-defined)."""
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    if dtype == torch.float32:
        return [torch.randn(shape, generator=g) * (1 + i) for i in range(k)]
    first = 0x3C00 if dtype == torch.bfloat16 else 0x2000  # n distinct positive bit patterns from here
    out = []
    for _ in range(k):
        bits = (first + torch.randperm(n, generator=g)).to(torch.int16)
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(dtype)
        out.append((bits.view(dtype) * sign).reshape(shape))
    return out


def _quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args)


def _same(ours, theirs, what):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, what
    scale = float(theirs.abs().max()) if theirs.numel() else 1.0
    rtol = 1e-5 if theirs.dtype == torch.float32 else 1e-2
    assert_verbose_allclose(ours.float(), theirs.float(), rtol * max(scale, 1.0), rtol, what=what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_deterministic_merges_equal_peft(dtype, density):
    tensors = _tensors(1, dtype=dtype)
    weights = torch.tensor([0.7, -0.4, 1.3])
    _same(fe_peft.task_arithmetic(tensors, weights), merge_utils.task_arithmetic(tensors, weights), "task_arithmetic")
    _same(_quiet(fe_peft.magnitude_prune, tensors, weights, density),
          _quiet(merge_utils.magnitude_prune, tensors, weights, density), "magnitude_prune")
    for method in ("total", "frequency"):
        _same(_quiet(fe_peft.ties, tensors, weights, density, method),
              _quiet(merge_utils.ties, tensors, weights, density, method), f"ties {method}")


def test_helpers_equal_peft():
    stacked = torch.stack(_tensors(2, k=4))
    for method in ("total", "frequency"):
        mask = fe_peft.calculate_majority_sign_mask(stacked, method)
        assert torch.equal(mask, merge_utils.calculate_majority_sign_mask(stacked, method))
        _same(fe_peft.disjoint_merge(stacked, mask), merge_utils.disjoint_merge(stacked, mask), "disjoint_merge")
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.equal(fe_peft.reshape_weight_task_tensors(stacked, w),
                       merge_utils.reshape_weight_task_tensors(stacked, w))
    x = _tensors(3, k=1)[0]
    _same(fe_peft.prune(x, 0.25, "magnitude"), merge_utils.prune(x, 0.25, "magnitude"), "prune magnitude")
    with pytest.warns(UserWarning, match="no pruning"):
        assert fe_peft.prune(x, 1.0, "random") is x


def test_errors_are_peft_compatible():
    x = torch.ones(4)
    with pytest.raises(ValueError, match="Density should be >= 0"):
        fe_peft.prune(x, -0.1, "magnitude")
    with pytest.raises(ValueError, match="Unknown method"):
        fe_peft.prune(x, 0.5, "bogus")
    with pytest.raises(ValueError, match="weights"):
        fe_peft.task_arithmetic([x, x], torch.tensor([1.0]))
    with pytest.raises(ValueError, match="Unimplemented mask method"):
        fe_peft.ties([x, x], torch.tensor([1.0, 1.0]), 0.5, "median")


@pytest.mark.parametrize("density", [0.2, 0.6])
def test_dare_keep_rate_rescale_and_seeding(density):
    n = 100_003
    ones = [torch.ones(n)]
    w = torch.tensor([1.0])
    torch.manual_seed(5)
    a = fe_peft.dare_linear(ones, w, density)
    torch.manual_seed(5)
    b = fe_peft.dare_linear(ones, w, density)
    assert torch.equal(a, b), "torch.manual_seed must reproduce the masks"
    values = a.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / density)
    bound = 6 * (density * (1 - density) / n) ** 0.5
    assert abs(float((a != 0).double().mean()) - density) < bound
    r = fe_peft.random_pruning(ones[0], density, rescale=False)
    assert set(r.unique().tolist()) == {0.0, 1.0}
    # dare_ties at density 1 is deterministic: equal to PEFT's
    tensors = _tensors(4)
    weights = torch.tensor([0.5, 1.0, -0.25])
    for method in ("total", "frequency"):
        _same(_quiet(fe_peft.dare_ties, tensors, weights, 1.0, method),
              _quiet(merge_utils.dare_ties, tensors, weights, 1.0, method), "dare_ties at density 1")
    _same(_quiet(fe_peft.dare_linear, tensors, weights, 1.0),
          _quiet(merge_utils.dare_linear, tensors, weights, 1.0), "dare_linear at density 1")


def test_inputs_untouched():
    tensors = _tensors(6)
    copies = [t.clone() for t in tensors]
    fe_peft.ties(tensors, torch.tensor([1.0, 1.0, 1.0]), 0.5)
    fe_peft.dare_ties(tensors, torch.tensor([1.0, 1.0, 1.0]), 0.5)
    assert all(torch.equal(t, c) for t, c in zip(tensors, copies))


def _lora_model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False),
                           adapter_name="first")
    model.add_adapter("second", LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
    return model


def _merged_lora(model, combination_type, density, name):
    with warnings.catch_warnings():  # PEFT warns that density 1 prunes nothing
        warnings.simplefilter("ignore", UserWarning)
        model.add_weighted_adapter(["first", "second"], [0.6, 0.8], name, combination_type=combination_type,
                                   density=density)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if f".{name}." in k}


@pytest.mark.parametrize("combination_type,density", [("ties", 0.5), ("magnitude_prune", 0.5), ("dare_ties", 1.0)])
def test_patch_routes_add_weighted_adapter(combination_type, density, monkeypatch):
    """Patched, add_weighted_adapter runs on fusion_engine's ops and merges the products B·A (PEFT merges A and
    B separately); tests/lora/test_merge_adapters.py checks the results against the product-level definitions."""
    from fusion_engine.lora import peft_bridge

    model = _lora_model()
    theirs = _merged_lora(model, combination_type, density, "peft_merge")
    calls = []
    for op in ("ties_merge", "linear_merge", "dare_merge"):
        original = getattr(fusion_engine.ops, op)
        monkeypatch.setattr(fusion_engine.ops, op, lambda *a, _f=original, _n=op, **k: calls.append(_n) or _f(*a, **k))
    fe_peft.patch()
    try:
        assert fe_peft.is_patched()
        from peft.tuners.lora.model import LoraModel

        assert LoraModel.add_weighted_adapter is peft_bridge.add_weighted_adapter
        ours = _merged_lora(model, combination_type, density, "fe_merge")
    finally:
        fe_peft.unpatch()
    assert not fe_peft.is_patched()
    from peft.tuners.lora import model as lora_model_module

    assert lora_model_module.ties is merge_utils.ties and merge_utils.ties.__module__ == "peft.utils.merge_utils"
    assert lora_model_module.LoraModel.add_weighted_adapter is not peft_bridge.add_weighted_adapter
    assert calls, "patched PEFT did not call fusion_engine"
    assert sorted(k.replace("peft_merge", "fe_merge") for k in theirs) == sorted(ours)
