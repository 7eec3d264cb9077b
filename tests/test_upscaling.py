"""SMILE upscaling (fusion_engine.upscaling): the formula, the routing, whole models, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fusion_engine.errors import ConfigError, ShapeMismatchError
from fusion_engine.upscaling import SmileLinear, smile_upscale


def _linear(inp, out, seed):
    torch.manual_seed(seed)
    return nn.Linear(inp, out)


def _finetuned(pre, seed, scale=0.3, mask=None):
    layer = copy.deepcopy(pre)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        delta = scale * torch.randn(layer.weight.shape, generator=g)
        layer.weight += delta if mask is None else delta * mask
        layer.bias += scale * torch.randn(layer.bias.shape, generator=g)
    return layer


def test_one_expert_at_full_rank_is_the_finetuned_layer():
    pre = _linear(12, 7, 0)
    ft = _finetuned(pre, 1)
    x = torch.randn(5, 3, 12)
    torch.testing.assert_close(SmileLinear(pre, [ft], gate_k=2)(x), ft(x), atol=1e-5, rtol=1e-5)


def test_inputs_route_to_the_expert_whose_subspace_they_lie_in():
    pre = _linear(8, 6, 0)
    left, right = torch.zeros(8), torch.zeros(8)
    left[:4], right[4:] = 1, 1
    experts = [_finetuned(pre, 1, mask=left), _finetuned(pre, 2, mask=right)]
    layer = SmileLinear(pre, experts, gate_k=3, top_k=1)
    x = torch.zeros(2, 8)
    x[0, :4] = torch.randn(4)
    x[1, 4:] = torch.randn(4)
    assert layer.routing(x).tolist() == [[1.0, 0.0], [0.0, 1.0]]
    torch.testing.assert_close(layer(x[:1]), experts[0](x[:1]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x[1:]), experts[1](x[1:]), atol=1e-5, rtol=1e-5)


def test_batched_forward_is_the_papers_formula_example_by_example():
    pre = _linear(10, 9, 0)
    fts = [_finetuned(pre, s) for s in (1, 2, 3)]
    layer = SmileLinear(pre, fts, gate_k=2, k=3, top_k=2)
    x = torch.randn(6, 10)
    expected = []
    for xi in x:
        rows = []
        for m in fts:
            u, s, vh = torch.linalg.svd(m.weight - pre.weight)
            rows.append((vh[:2] @ xi).norm())
        p = torch.softmax(torch.stack(rows), 0)
        top = p.topk(2)
        y = pre(xi)
        for w, e in zip(top.values / top.values.sum(), top.indices.tolist()):
            u, s, vh = torch.linalg.svd(fts[e].weight - pre.weight)
            y = y + w * (u[:, :3] @ (s[:3, None] * vh[:3]) @ xi + fts[e].bias - pre.bias)
        expected.append(y)
    torch.testing.assert_close(layer(x), torch.stack(expected), atol=1e-5, rtol=1e-5)


def test_smile_upscale_replaces_every_linear_and_leaves_inputs_alone():
    pre = nn.Sequential(_linear(6, 5, 0), nn.ReLU(), _linear(5, 3, 1))
    fts = [nn.Sequential(_finetuned(pre[0], s), nn.ReLU(), _finetuned(pre[2], s + 10)) for s in (1, 2)]
    before = copy.deepcopy(pre.state_dict())
    moe = smile_upscale(pre, fts, gate_k=2, k=4)
    assert isinstance(moe[0], SmileLinear) and isinstance(moe[2], SmileLinear) and isinstance(pre[0], nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in pre.state_dict().items())
    assert moe(torch.randn(4, 6)).shape == (4, 3)
    single = smile_upscale(pre, fts[:1], gate_k=1)
    x = torch.randn(4, 6)
    torch.testing.assert_close(single(x), fts[0](x), atol=1e-5, rtol=1e-5)


def test_errors_name_the_problem():
    pre = _linear(4, 3, 0)
    with pytest.raises(ConfigError, match="top_k=3 must be in"):
        SmileLinear(pre, [_finetuned(pre, 1), _finetuned(pre, 2)], gate_k=1, top_k=3)
    with pytest.raises(ShapeMismatchError, match="fine-tuned layer 0 has weight shape"):
        SmileLinear(pre, [_linear(5, 3, 1)], gate_k=1)
    with pytest.raises(ConfigError, match="ranks must be >= 1"):
        SmileLinear(pre, [_finetuned(pre, 1)], gate_k=0)
    with pytest.raises(ShapeMismatchError, match="no linear layer '2'"):
        smile_upscale(nn.Sequential(pre, nn.ReLU(), _linear(3, 2, 1)), [nn.Sequential(pre)], gate_k=1)
