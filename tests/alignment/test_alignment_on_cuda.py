"""Alignment on a CUDA device: the same permutations / fused weights as on the CPU, results on the inputs'
device (only the LAP solve visits the host, inside ops.linear_assignment). Skipped without a GPU."""

from __future__ import annotations

import copy

import pytest
import torch

from fusion_engine.alignment import activation_matching, apply_permutation, mlp_permutation_spec, ot_fusion, \
    weight_matching
from fusion_engine.bench.digits import make_mlp

pytestmark = pytest.mark.gpu


def _pair(hidden=(48, 32)):
    a = make_mlp(hidden, seed=1).eval()
    spec = mlp_permutation_spec(a)
    b = copy.deepcopy(a)
    b.load_state_dict(apply_permutation(spec, a.state_dict(), spec.random(seed=5)))
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return a, b, spec


def _on_cuda(sd):
    return {k: v.cuda() for k, v in sd.items()}


def test_weight_matching_on_cuda_equals_cpu():
    a, b, spec = _pair()
    cpu = weight_matching(spec, a.state_dict(), b.state_dict(), seed=0)
    gpu = weight_matching(spec, _on_cuda(a.state_dict()), _on_cuda(b.state_dict()), seed=0)
    assert all(torch.equal(gpu[p].cpu(), cpu[p]) for p in cpu)


def test_activation_matching_on_cuda_equals_cpu():
    a, b, spec = _pair()
    x = torch.randn(64, 64)
    cpu = activation_matching(spec, a, b, [x[:32], x[32:]])
    gpu = activation_matching(spec, copy.deepcopy(a).cuda(), copy.deepcopy(b).cuda(), [x[:32].cuda(), x[32:].cuda()])
    assert all(torch.equal(gpu[p].cpu(), cpu[p]) for p in cpu)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "sinkhorn"])
def test_ot_fusion_on_cuda_stays_on_the_device_and_equals_cpu(exact):
    a, b, spec = _pair()
    cpu = ot_fusion([a, b], spec=spec, exact=exact, reg=0.05)
    gpu = ot_fusion([copy.deepcopy(a).cuda(), copy.deepcopy(b).cuda()], spec=spec, exact=exact, reg=0.05)
    for k, v in cpu.items():
        assert gpu[k].device.type == "cuda", k
        torch.testing.assert_close(gpu[k].cpu(), v, atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
