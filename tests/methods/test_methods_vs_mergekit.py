"""fusion_engine.merge_tensors / merge_state_dicts against mergekit 0.1.5's on random tensors.

Deterministic methods: within 1e-5 relative in fp32 (plus an absolute floor of 1e-6 × the
inputs' magnitude, since the methods sum terms that cancel). Random methods (dare_*, della*):
exact at density 1; otherwise equal to mergekit's computation on our Philox-masked task vectors,
and statistically like mergekit's masks (keep rate, rank dependence, L1 rescale).
"""

import math
import zlib

import pytest
import torch

import fusion_engine as fe
from fusion_engine.methods.task_arithmetic import della_keep, della_keep_probability
from fusion_engine.ops import stream_id
from fusion_engine.ops.philox import keep_mask
from utils import assert_verbose_allclose, max_abs

pytest.importorskip("mergekit")
from mergekit.merge_methods import PerGroupValues as MkPerGroupValues  # noqa: E402
from mergekit.merge_methods.api import merge_state_dicts as mk_merge_state_dicts  # noqa: E402
from mergekit.merge_methods.api import merge_tensors as mk_merge_tensors  # noqa: E402

SHAPES = [(37, 29), (101,), (3, 5, 7)]


def make_inputs(seed, shape, k, spread=0.5, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    xs = [base + torch.randn(shape, generator=gen) * (spread + 0.5 * i) for i in range(k)]
    return [t.to(dtype) for t in (base, *xs)]


# (method, number of non-base inputs, with base, parameters)
CASES = [
    ("linear", 3, False, {"weight": [0.3, 1.0, 0.5]}),
    ("linear", 3, False, {"weight": [0.3, -1.0, 2.5], "normalize": False}),
    ("linear", 2, True, {"weight": [1.0, 2.0, 3.0]}),
    ("task_arithmetic", 3, True, {"weight": [0.3, 1.0, -0.5], "lambda": 0.8}),
    ("task_arithmetic", 2, True, {"weight": [0.3, 1.0], "normalize": True}),
    ("ties", 3, True, {"weight": [0.3, 1.0, 0.5], "density": [0.3, 0.5, 0.9]}),
    ("ties", 3, True, {"weight": [0.3, -1.0, 0.5], "density": 0.4, "rescale": True, "normalize": False,
                       "lambda": 1.3}),
    ("ties", 2, True, {"weight": 1.0, "density": [0.001, 0.0]}),   # k = max(1, int(ρn)) and ρ = 0
    ("ties", 2, True, {"weight": [1.0, 0.5], "density": 1.0, "int8_mask": True}),
    ("dare_ties", 3, True, {"weight": [0.3, 1.0, 0.5], "density": 1.0}),
    ("dare_linear", 3, True, {"weight": [0.3, 1.0, 0.5], "density": 1.0, "normalize": True}),
    ("dare_linear", 2, True, {"weight": [0.3, 1.0], "density": 0.0}),
    ("breadcrumbs", 3, True, {"weight": [0.3, 1.0, 0.5], "density": 0.6, "gamma": 0.05}),
    ("breadcrumbs", 2, True, {"weight": [0.3, 1.0], "density": [0.6, 0.2], "gamma": [0.5, 0.0],
                              "rescale": True}),
    ("breadcrumbs_ties", 3, True, {"weight": [0.3, 1.0, 0.5], "density": 0.7, "gamma": 0.1, "normalize": True}),
    ("della", 3, True, {"weight": [0.3, 1.0, 0.5], "density": 1.0}),
    ("della_linear", 2, True, {"weight": [0.3, 1.0], "density": [1.0, 0.0]}),
    ("slerp", 1, True, {"t": 0.3}),
    ("slerp", 1, True, {"t": 1.4}),
    ("nuslerp", 2, True, {"weight": [0.3, 0.6]}),
    ("nuslerp", 2, False, {"weight": [0.3, 0.6]}),
    ("nuslerp", 2, False, {"weight": [1.0, -1.0], "nuslerp_flatten": False}),
    ("nuslerp", 2, True, {"weight": [0.2, 0.6], "nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("multislerp", 3, True, {"weight": [0.3, 1.0, 0.5]}),
    ("multislerp", 3, False, {"weight": [0.3, 1.0, 0.5], "normalize_weights": False}),
    ("multislerp", 1, True, {"weight": 0.5}),
    ("karcher", 3, False, {}),
    ("karcher", 2, False, {"max_iter": 3, "tol": 1e-6}),
    ("model_stock", 3, True, {}),
    ("model_stock", 2, True, {"filter_wise": True}),
    ("nearswap", 1, True, {"t": 0.5}),
    ("sce", 3, True, {}),
    ("sce", 3, True, {"select_topk": 0.3}),
    ("sce", 2, True, {"select_topk": 0.0}),
    ("ram", 3, True, {}),
    ("ram", 2, True, {"epsilon": 0.5}),
    ("ramplus_tl", 3, True, {"epsilon": 0.3, "r": 0.5, "alpha": 0.4}),
    ("arcee_fusion", 1, True, {}),
    ("passthrough", 1, False, {"scale": 0.5}),
    ("passthrough", 1, False, {}),
]


def _run_both(method, tensors, base_index, params, **kw):
    ours = fe.merge_tensors(tensors, method, parameters=params, base_index=base_index, name="layer.weight", **kw)
    theirs = mk_merge_tensors(tensors, method, parameters=params, base_index=base_index, name="layer.weight", **kw)
    return ours, theirs


def _fp32_close(ours, theirs, tensors, what, rtol=1e-5):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, what
    scale = max(1.0, max_abs(tensors))
    assert_verbose_allclose(ours, theirs, 1e-6 * scale, rtol, what=what)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{sorted(c[3])}")
def test_method_matches_mergekit_fp32(case, shape):
    method, k, with_base, params = case
    # a seed that is the same in every process (hash() of a str is salted per process)
    tensors = make_inputs(zlib.crc32(repr((method, k, shape)).encode()) % 1000, shape, k)
    if not with_base:
        tensors = tensors[1:]
    if method == "ram":  # sparse changes so that unique / shared / unchanged entries all occur
        gen = torch.Generator().manual_seed(3)
        tensors = [tensors[0]] + [t.where(torch.rand(shape, generator=gen) < 0.5, tensors[0]) for t in tensors[1:]]
    base_index = 0 if with_base else None
    snapshot = [t.clone() for t in tensors]
    ours, theirs = _run_both(method, tensors, base_index, params)
    _fp32_close(ours, theirs, tensors, f"{method} {params} {shape}")
    assert all(torch.equal(a, b) for a, b in zip(tensors, snapshot)), "inputs were modified"


def test_base_in_the_middle_and_ids_mappings():
    base, a, b = make_inputs(1, (40, 9), 2)
    tensors = [a, base, b]
    params = {"weight": {"A": 0.4, "B": 1.2}, "density": {"A": 0.3, "B": 0.8}}
    ids = ["A", "base", "B"]
    ours = fe.merge_tensors(tensors, "ties", parameters=params, ids=ids, base_index=1)
    theirs = mk_merge_tensors(tensors, "ties", parameters=params, ids=ids, base_index=1)
    _fp32_close(ours, theirs, tensors, "ties, base in the middle")
    # a per-non-base list aligned with all inputs (the executor's layout): the base's entry is ignored
    aligned = fe.merge_tensors(tensors, "ties", base_index=1,
                               parameters={"weight": [0.4, None, 1.2], "density": [0.3, 99, 0.8]})
    assert torch.equal(aligned, ours)


@pytest.mark.parametrize("method,params", [
    ("linear", {"weight": [0.3, 1.0, 0.5]}),
    ("task_arithmetic", {"weight": [0.3, 1.0], "lambda": 0.7}),
    ("ties", {"weight": [0.3, 1.0], "density": 1.0}),
    ("slerp", {"t": 0.4}),
    ("nuslerp", {"weight": [0.3, 0.6]}),
    ("multislerp", {"weight": [0.3, 1.0]}),
    ("karcher", {}),
    ("model_stock", {}),
    ("nearswap", {"t": 0.3}),
    ("passthrough", {"scale": 2.0}),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_inputs(method, params, dtype):
    """Low-precision inputs: mergekit's output dtype; values as mergekit's up to the roundings of its
    low-precision intermediates (we accumulate in fp32 and round once)."""
    spec = fe.methods.get(method)
    n_inputs = {"slerp": 2, "nearswap": 2, "passthrough": 1}.get(method, 3)
    tensors = make_inputs(7, (33, 17), n_inputs - 1, dtype=dtype)
    base_index = 0 if spec.base != "ignored" else None
    if method == "linear":
        tensors = make_inputs(7, (33, 17), 3, dtype=dtype)[1:]
    ours, theirs = _run_both(method, tensors, base_index, params)
    assert ours.dtype == theirs.dtype == dtype
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    scale = max_abs(tensors) * 2
    assert_verbose_allclose(ours, theirs, 4 * ulp * scale, 4 * ulp, what=f"{method} {dtype}")
    # against mergekit in fp32 on the same inputs, rounded once: within one output ulp (+ tiny atol)
    exact = mk_merge_tensors([t.float() for t in tensors], method, parameters=params, base_index=base_index)
    assert_verbose_allclose(ours.float(), exact.to(dtype).float(), ulp * scale * 0.25, 2 * ulp, what=f"{method} {dtype}")


@pytest.mark.parametrize("method,params", [("ties", {"weight": [1.0, 0.5], "density": 0.5}),
                                           ("slerp", {"t": 0.5}), ("linear", {"weight": 1.0})])
def test_dtype_and_out_dtype_like_mergekit(method, params):
    base, a, b = make_inputs(5, (20, 10), 2)
    tensors = [base, a] if method == "slerp" else [base, a, b]
    for kw in ({"dtype": torch.bfloat16}, {"out_dtype": torch.float16}, {"dtype": torch.float64},
               {"dtype": torch.bfloat16, "out_dtype": torch.float32}):
        ours, theirs = _run_both(method, tensors, 0, params, **kw)
        assert ours.dtype == theirs.dtype, kw
        tol = 2.0 ** -6 if torch.bfloat16 in kw.values() or torch.float16 in kw.values() else 1e-6
        assert_verbose_allclose(ours.double(), theirs.double(), tol * 4, tol, what=f"{method} {kw}")
    mixed = [tensors[0].bfloat16(), *tensors[1:]]  # promoted to fp32, as mergekit does
    ours, theirs = _run_both(method, mixed, 0, params)
    assert ours.dtype == theirs.dtype == torch.float32
    _fp32_close(ours, theirs, mixed, f"{method} mixed dtypes")


# ------------------------------------------------------------------------------- random methods


def _masked_inputs(tensors, density, name, seed, della_eps=None):
    """b + s_i (m_i ⊙ δ_i) with our Philox masks m_i and the L1 rescale s_i (mergekit's formula)."""
    base, xs = tensors[0], tensors[1:]
    out = [base]
    for i, x in enumerate(xs):
        d = x - base
        if della_eps is None:
            m = keep_mask(d.numel(), density, seed=seed, stream=stream_id(name), model=i).reshape(d.shape)
        else:
            m = della_keep(d, density, della_eps, seed=seed, stream=stream_id(name), model=i)
        kept = d * m
        out.append(base + kept * (d.abs().sum() / kept.abs().sum()))
    return out


@pytest.mark.parametrize("method,extra", [("dare_ties", {}), ("dare_linear", {"normalize": True}),
                                          ("della", {"epsilon": 0.1}), ("della_linear", {"epsilon": 0.2})])
def test_random_methods_are_mergekit_on_philox_masks(method, extra):
    tensors = make_inputs(11, (48, 31), 3)
    params = {"weight": [0.3, 1.0, 0.5], "density": 0.4, "random_seed": 1234, **extra}
    ours = fe.merge_tensors(tensors, method, parameters=params, base_index=0, name="model.layers.0.mlp")
    masked = _masked_inputs(tensors, 0.4, "model.layers.0.mlp", 1234, extra.get("epsilon"))
    mk_params = {k: v for k, v in params.items() if k not in ("random_seed", "density")}
    expected = mk_merge_tensors(masked, method, parameters={**mk_params, "density": 1.0}, base_index=0)
    _fp32_close(ours, expected, tensors, method)


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_drop_statistics_match_mergekit(method):
    """One input, weight 1: y − b is the sparsified task vector. Keep rate ≈ ρ, survivors scaled by
    one factor, L1 norm preserved: for ours and for mergekit alike."""
    n_rows, n_cols, rho = 64, 128, 0.3
    base, x = make_inputs(2, (n_rows, n_cols), 1)
    delta = x - base
    params = {"weight": 1.0, "density": rho}
    ours = fe.merge_tensors([base, x], method, parameters={**params, "random_seed": 5}, base_index=0, name="w") - base
    torch.manual_seed(0)
    theirs = mk_merge_tensors([base, x], method, parameters=params, base_index=0) - base
    n = delta.numel()
    for v in (ours, theirs):
        kept = v.abs() > 1e-6
        rate = kept.float().mean().item()
        assert abs(rate - rho) < 5 * math.sqrt(rho * (1 - rho) / n), (method, rate)
        ratio = v[kept] / delta[kept]
        assert torch.allclose(ratio, ratio.median().expand_as(ratio), rtol=1e-3)
        assert math.isclose(v.abs().sum().item(), delta.abs().sum().item(), rel_tol=1e-3)
    if method == "della_linear":  # MagPrune: larger magnitudes are kept more often (ρ ± ε)
        prob = della_keep_probability(delta, rho, 0.15)
        for v in (ours, theirs):
            kept = (v.abs() > 1e-6).float()
            high, low = prob > rho + 0.1, prob < rho - 0.1
            assert kept[high].mean() > rho + 0.07 and kept[low].mean() < rho - 0.07
            assert abs(kept[high].mean().item() - prob[high].mean().item()) < 0.04


def test_random_methods_reproducible_per_name_and_seed():
    tensors = make_inputs(3, (50, 20), 2)
    run = lambda **kw: fe.merge_tensors(tensors, "dare_ties", base_index=0,  # noqa: E731
                                        parameters={"weight": 1.0, "density": 0.5, **kw.pop("p", {})}, **kw)
    a = run(name="a")
    assert torch.equal(a, run(name="a"))
    assert not torch.equal(a, run(name="b"))
    assert not torch.equal(a, run(name="a", p={"random_seed": 1}))
    assert torch.equal(run(name="a", p={"random_seed": 1}), run(name="a", p={"random_seed": 1}))


# ------------------------------------------------------------------------------- state dicts


def test_merge_state_dicts_matches_mergekit():
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 5, generator=gen), "b": torch.randn(5, generator=gen),
            "steps": torch.tensor([3, 4])}
    models = {"base": base}
    for name in ("m1", "m2"):
        models[name] = {k: (v + torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone())
                        for k, v in base.items()}
    params = {"weight": {"m1": 0.4, "m2": 1.0}, "density": MkPerGroupValues([0.5, 0.9, 1.0])}
    ours = fe.merge_state_dicts(models, "ties", parameters=params, base="base")
    theirs = mk_merge_state_dicts(models, "ties", parameters=params, base="base")
    assert list(ours) == list(theirs) == ["w", "b", "steps"]
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype
        _fp32_close(ours[key].double(), theirs[key].double(), [base[key].double()], key)
    ours_seq = fe.merge_state_dicts([base, models["m1"]], "linear", parameters={"weight": [1.0, 3.0]})
    theirs_seq = mk_merge_state_dicts([base, models["m1"]], "linear", parameters={"weight": [1.0, 3.0]})
    for key in ours_seq:
        _fp32_close(ours_seq[key].double(), theirs_seq[key].double(), [base[key].double()], key)
    module = torch.nn.Linear(5, 6)
    merged = fe.merge_state_dicts([module, module], "linear", parameters={"weight": 1.0})
    assert torch.allclose(merged["weight"], module.weight.detach())
