"""REPAIR: after the correction every site's channels have exactly the interpolated endpoint statistics
(no norm, LayerNorm, BatchNorm networks; the root mean square at RMSNorms); a network merged with itself
is unchanged; bad input is named."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fusion_engine.alignment import interpolate, repair
from fusion_engine.alignment.models import vgg
from fusion_engine.alignment.repair import _moments, default_sites
from fusion_engine.errors import ConfigError

from test_permutation_spec import randomize_norms


def layernorm_mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.LayerNorm(20), nn.ReLU(), nn.Linear(20, 16), nn.LayerNorm(16),
                         nn.ReLU(), nn.Linear(16, 3)).eval()


def plain_mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 16, bias=False), nn.ReLU(),
                         nn.Linear(16, 3)).eval()


def bn_vgg(seed):
    return randomize_norms(vgg((8, "M", 16, "M"), seed=seed, image_size=8, in_channels=3, hidden=12))


CASES = {
    "no_norm": (plain_mlp, lambda g: torch.randn(64, 12, generator=g), ["0", "2"]),
    "layernorm": (layernorm_mlp, lambda g: torch.randn(64, 12, generator=g), ["1", "4"]),
    "batchnorm": (bn_vgg, lambda g: torch.randn(16, 3, 8, 8, generator=g),
                  ["features.1", "features.5", "classifier.1"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_channels_get_the_interpolated_statistics(case):
    make, inputs, expected_sites = CASES[case]
    a, b = make(0), make(1)
    g = torch.Generator().manual_seed(0)
    batches = [inputs(g), inputs(g)]
    merged = make(2)
    merged.load_state_dict(interpolate(a.state_dict(), b.state_dict(), 0.3))
    before = {k: v.clone() for k, v in merged.state_dict().items()}
    fixed = repair(merged, [a, b], batches, weights=[0.7, 0.3])
    assert all(torch.equal(before[k], v) for k, v in merged.state_dict().items())  # input untouched
    sites = default_sites(fixed)
    assert sites == expected_sites
    got = _moments(fixed, sites, batches)
    ends = [_moments(m, sites, batches) for m in (a, b)]
    for s in sites:
        for i, what in enumerate(("mean", "std")):
            target = 0.7 * ends[0][s][i] + 0.3 * ends[1][s][i]
            torch.testing.assert_close(got[s][i], target, atol=1e-5, rtol=1e-4, msg=lambda m: f"{s} {what}: {m}")


class LibraryRMSNorm(nn.Module):
    """An RMSNorm as model libraries write it (transformers' LlamaRMSNorm): weight only, found by name."""

    def __init__(self, width, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(width)), eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


@pytest.mark.parametrize("norm", [nn.RMSNorm, LibraryRMSNorm], ids=["torch", "library"])
def test_rms_norm_channels_get_the_interpolated_root_mean_square(norm):
    """An RMSNorm has no shift: its channels get the interpolated RMS, exactly, by a scale alone, and
    no bias is added (the architecture and its state dict keys stay the same)."""
    def make(seed):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(12, 20), norm(20), nn.ReLU(), nn.Linear(20, 16), norm(16), nn.ReLU(),
                            nn.Linear(16, 3)).eval()
        with torch.no_grad():
            for m in net:
                if isinstance(m, norm):
                    m.weight.uniform_(0.5, 2.0)
        return net

    a, b = make(0), make(1)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, 12, generator=g) for _ in range(2)]
    merged = make(2)
    merged.load_state_dict(interpolate(a.state_dict(), b.state_dict(), 0.4))
    fixed = repair(merged, [a, b], batches, weights=[0.6, 0.4])
    sites = default_sites(fixed)
    assert sites == ["1", "4"]
    assert fixed.state_dict().keys() == merged.state_dict().keys()
    got = _moments(fixed, sites, batches)
    ends = [_moments(m, sites, batches) for m in (a, b)]
    before = _moments(merged, sites, batches)
    for s in sites:
        target = 0.6 * ends[0][s][2] + 0.4 * ends[1][s][2]
        assert not torch.allclose(before[s][2], target, rtol=1e-3)  # there was something to repair
        torch.testing.assert_close(got[s][2], target, atol=1e-6, rtol=1e-5, msg=lambda m: f"{s} rms: {m}")


class GemmaRMSNorm(LibraryRMSNorm):
    """Gemma's convention: x̂·(1 + w). Scaling w does not scale the output: REPAIR must refuse, by name."""

    def forward(self, x):
        return (1.0 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def test_a_site_the_correction_cannot_be_folded_into_is_named():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 20), GemmaRMSNorm(20), nn.ReLU(inplace=True), nn.Linear(20, 3)).eval()
    other = copy.deepcopy(net)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    with pytest.raises(ConfigError, match=r"site '1' \(GemmaRMSNorm\).*does not scale with its weight"):
        repair(net, [net, other], [torch.randn(32, 12)], sites=["1"])
    repair(net, [net, other], [torch.randn(32, 12)], sites=["0"])  # the Linear before it takes it


def test_a_network_merged_with_itself_is_unchanged():
    a = layernorm_mlp(0)
    x = torch.randn(32, 12)
    fixed = repair(a, [a, a], [x])
    torch.testing.assert_close(fixed(x), a(x), atol=1e-5, rtol=1e-5)


def test_errors():
    a = plain_mlp(0)
    x = torch.randn(8, 12)
    with pytest.raises(ConfigError, match="endpoint"):
        repair(a, [], [x])
    with pytest.raises(ConfigError, match="weights"):
        repair(a, [a, a], [x], weights=[1.0])
    with pytest.raises(ConfigError, match="empty"):
        repair(a, [a], [])
    with pytest.raises(ConfigError, match="no module 'nope'"):
        repair(a, [a], [x], sites=["nope"])
    with pytest.raises(ConfigError, match="affine weight|channels"):
        repair(a, [a], [x], sites=["1"])
