"""tsv, iso_c, iso_cts, wudi, magmax and consensus against FusionBench's own implementations (the
functions its TaskSingularVectorMerging, ISO_C_Merge, ISO_CTS_Merge, WUDIMerging and
TallMaskTaskArithmetic classes call; MagMaxAlgorithm itself) on the same tensors.

Skipped without ``fusion_bench`` (not a test dependency: it pulls lightning and hydra; importing it
takes tens of seconds, hence ``slow``). The TALL masks get fine-tuned weights, as documented
(FusionBench's class passes task vectors there).
"""

import importlib

import pytest
import torch

import fusion_engine as fe

from test_subspace_methods import TOL, assert_rel, models

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fb():
    pytest.importorskip("fusion_bench")
    names = {"tsv": "fusion_bench.method.task_singular_vector.utils.TSVM_utils",
             "iso": "fusion_bench.method.isotropic_merging.iso_utils",
             "wudi": "fusion_bench.method.wudi.wudi",
             "magmax": "fusion_bench.method.magmax.magmax",
             "tall": "fusion_bench.method.tall_mask.utils"}
    try:
        return {key: importlib.import_module(module) for key, module in names.items()}
    except ImportError as error:
        pytest.skip(f"fusion_bench is installed but does not import: {error}")


SHAPES = {"w": (24, 16), "v": (12, 30), "bias": (16,)}


def model_set(dtype, k=3, seed=0):
    """A base and k fine-tuned state dicts over SHAPES."""
    base, fts = {}, [{} for _ in range(k)]
    for i, (name, shape) in enumerate(SHAPES.items()):
        b, xs = models(shape, k, dtype, seed=seed + i)
        base[name] = b
        for sd, x in zip(fts, xs):
            sd[name] = x
    return base, fts


def ours(method, base, fts, params):
    return {n: fe.merge_tensors([base[n], *[sd[n] for sd in fts]], method, base_index=0, parameters=params)
            for n in base}


def task_vectors(base, fts):
    return [{n: sd[n] - base[n] for n in base} for sd in fts]


def check(got, expected, dtype):
    for name in got:
        assert_rel(got[name], expected[name], TOL[dtype])


DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])


@DTYPES
def test_tsv(fb, dtype):
    base, fts = model_set(dtype)
    merged = fb["tsv"].compute_and_sum_svd_mem_reduction(task_vectors(base, fts), accelerator="cpu")
    check(ours("tsv", base, fts, {"lambda": 0.8}), {n: base[n] + 0.8 * merged[n] for n in base}, dtype)


@DTYPES
def test_iso_c(fb, dtype):
    base, fts = model_set(dtype)
    merged = fb["iso"].iso_c(task_vectors(base, fts), accelerator="cpu")
    check(ours("iso_c", base, fts, {"lambda": 1.2}), {n: base[n] + 1.2 * merged[n] for n in base}, dtype)


@DTYPES
@pytest.mark.parametrize("fraction", [0.8, 0.5])
def test_iso_cts(fb, dtype, fraction):
    base, fts = model_set(dtype)
    merged = fb["iso"].iso_cts(task_vectors(base, fts), common_space_fraction=fraction, accelerator="cpu")
    check(ours("iso_cts", base, fts, {"lambda": 0.9, "common_space_fraction": fraction}),
          {n: base[n] + 0.9 * merged[n] for n in base}, dtype)


@DTYPES
def test_wudi(fb, dtype):
    base, fts = model_set(dtype)
    merged = fb["wudi"].wudi_merging(task_vectors(base, fts), accelerator="cpu", iter_num=50)
    check(ours("wudi", base, fts, {"iterations": 50}), {n: base[n] + merged[n].detach() for n in base}, dtype)


@DTYPES
def test_magmax_algorithm(fb, dtype):
    base, fts = model_set(dtype)

    def module(sd):
        m = torch.nn.Module()
        for name, t in sd.items():
            m.register_parameter(name, torch.nn.Parameter(t.clone(), requires_grad=False))
        return m

    pool = {"_pretrained_": module(base), **{f"task{i}": module(sd) for i, sd in enumerate(fts)}}
    merged = fb["magmax"].MagMaxAlgorithm(scaling_factor=0.5).run(pool).state_dict()
    check(ours("magmax", base, fts, {}), merged, dtype)


@DTYPES
def test_consensus_with_tall_masks(fb, dtype):
    base, fts = model_set(dtype)
    expected = {}
    for n in base:
        flat_ptm = base[n].reshape(-1)
        flat_ft = torch.stack([sd[n].reshape(-1) for sd in fts])
        tvs = flat_ft - flat_ptm
        masks = fb["tall"].generate_task_masks(tvs, flat_ft, flat_ptm, tv=tvs.sum(0), tall_mask_lambda=0.6)
        expected[n] = (flat_ptm + tvs.sum(0) * (masks.sum(0) >= 2)).reshape(base[n].shape)
    check(ours("consensus", base, fts, {}), expected, dtype)
