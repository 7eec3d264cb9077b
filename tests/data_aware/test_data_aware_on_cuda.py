"""Data-aware fusion with CUDA models: Fisher, Gram matrices, RegMean and AdaMerging give the CPU results,
on the models' device. Skipped without a GPU."""

from __future__ import annotations

import copy

import pytest
import torch

from fusion_engine.bench.digits import make_mlp
from fusion_engine.data_aware import adamerging, collect_gram, estimate_fisher, regmean_merge

pytestmark = pytest.mark.gpu


def _data(seed, n=24):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


def _cuda(model):
    return copy.deepcopy(model).cuda()


def _close(gpu: dict, cpu: dict, **tol):
    assert set(gpu) == set(cpu)
    for k, v in cpu.items():
        assert gpu[k].device.type == "cuda", k
        torch.testing.assert_close(gpu[k].cpu(), v, msg=lambda m: f"{k}: {m}", **tol)


@pytest.mark.parametrize("kind", ["empirical", "model"])
def test_estimate_fisher_on_cuda_equals_cpu(kind):
    model = make_mlp((32,), seed=0).eval()
    x, y = _data(0)
    batches = [(x, y)] if kind == "empirical" else [x]
    gpu_batches = [(x.cuda(), y.cuda())] if kind == "empirical" else [x.cuda()]
    _close(estimate_fisher(_cuda(model), gpu_batches, kind=kind), estimate_fisher(model, batches, kind=kind),
           atol=1e-6, rtol=1e-4)


def test_collect_gram_and_regmean_on_cuda_equal_cpu():
    models = [make_mlp((32,), seed=s).eval() for s in range(2)]
    xs = [_data(10 + s)[0] for s in range(2)]
    grams = [collect_gram(m, [x]) for m, x in zip(models, xs)]
    gpu_grams = [collect_gram(_cuda(m), [x.cuda()]) for m, x in zip(models, xs)]
    for g, c in zip(gpu_grams, grams):
        _close(g, c, atol=1e-4, rtol=1e-5)
    _close(regmean_merge([_cuda(m) for m in models], gpu_grams, alpha=0.9), regmean_merge(models, grams, alpha=0.9),
           atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["task", "layer"])
def test_adamerging_on_cuda_equals_cpu(mode):
    base = make_mlp((32,), seed=0).eval()
    finetuned = [make_mlp((32,), seed=s).eval() for s in (1, 2)]
    x = _data(20)[0]
    cpu = adamerging(base, finetuned, [x[:12], x[12:]], mode=mode, steps=5, lr=1e-2)
    gpu = adamerging(_cuda(base), [_cuda(m) for m in finetuned], [x[:12].cuda(), x[12:].cuda()], mode=mode,
                     steps=5, lr=1e-2)
    torch.testing.assert_close(gpu.coefficients.cpu(), cpu.coefficients, atol=1e-5, rtol=1e-4)
    _close(gpu.state_dict, cpu.state_dict, atol=1e-5, rtol=1e-4)
