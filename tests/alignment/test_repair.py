"""REPAIR: after the correction every site's channels have exactly the interpolated endpoint statistics
(no norm, LayerNorm, BatchNorm networks); a network merged with itself is unchanged; bad input is named."""

from __future__ import annotations

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
