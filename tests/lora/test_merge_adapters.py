"""Adapter-to-adapter merges on the products B·A: exact methods, PEFT's definitions, KnOTS, the PEFT patch."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from peft.utils import merge_utils

from fusion_engine.cli import main as cli_main
from fusion_engine.compat import peft as fe_peft
from fusion_engine.errors import ConfigError
from fusion_engine.lora import open_model
from fusion_engine.lora.adapter_merge import merge_adapters
from fusion_engine.lora.merge import merge_factors
from lora_fixtures import LORA_CONFIG, peft_lora, scratch, tiny_lora
from utils import load_dir

WEIGHTS = [0.6, -0.9, 1.3]


def _factors(ranks=(3, 4, 2), m=24, n=18, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, n, generator=g), torch.randn(m, r, generator=g)) for r in ranks]


def _sum(factors, weights):
    return sum(w * b @ a for w, (a, b) in zip(weights, factors))


def _best(delta, rank):
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).float()


@pytest.mark.parametrize("method", ["cat", "linear", "knots_linear"])
def test_exact_methods_equal_the_weighted_sum_of_products(method):
    f = _factors()
    a, b = merge_factors(f, WEIGHTS, method)
    assert a.shape[0] == 9 and b.shape[1] == 9
    torch.testing.assert_close(b @ a, _sum(f, WEIGHTS), atol=1e-4, rtol=1e-5)


def test_linear_rank_control_is_the_best_approximation():
    f = _factors()
    a, b = merge_factors(f, WEIGHTS, "linear", rank=4)
    assert a.shape == (4, 18) and b.shape == (24, 4)
    torch.testing.assert_close(b @ a, _best(_sum(f, WEIGHTS), 4), atol=1e-4, rtol=1e-4)
    a, b = merge_factors(f[:1], [1.0], "linear")  # one adapter: itself, at its rank
    assert a.shape[0] == 3
    torch.testing.assert_close(b @ a, _sum(f[:1], [1.0]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,peft_fn,density", [
    ("ties", merge_utils.ties, 0.4), ("magnitude_prune", merge_utils.magnitude_prune, 0.3),
    ("dare_linear", merge_utils.dare_linear, 1.0), ("dare_ties", merge_utils.dare_ties, 1.0)])
def test_dense_methods_are_peft_definitions_on_products_then_svd(method, peft_fn, density):
    f = _factors()
    products = [b @ a for a, b in f]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        want = peft_fn(products, torch.tensor(WEIGHTS), density)
    for rank in (None, 6):
        a, b = merge_factors(f, WEIGHTS, method, rank=rank, density=density)
        assert a.shape[0] == (rank or 4)  # default: the largest input rank
        torch.testing.assert_close(b @ a, _best(want, rank or 4), atol=1e-4, rtol=1e-4)


def test_knots_ties_merges_coordinates_in_the_shared_basis():
    f = _factors(m=30, n=20)
    products = [b @ a for a, b in f]
    u, s, vh = torch.linalg.svd(torch.cat(products, dim=1).double(), full_matrices=False)
    keep = 9  # the concatenation has rank Σ r_k
    coords = [vh[:keep, k * 20:(k + 1) * 20].float() for k in range(3)]
    merged = merge_utils.ties(coords, torch.tensor(WEIGHTS), 0.5, "total")
    want = (u[:, :keep] * s[:keep]).float() @ merged
    a, b = merge_factors(f, WEIGHTS, "knots_ties", density=0.5)
    torch.testing.assert_close(b @ a, want, atol=1e-3, rtol=1e-3)


def test_bad_arguments():
    f = _factors()
    with pytest.raises(ConfigError, match="unknown"):
        merge_factors(f, WEIGHTS, "average")
    with pytest.raises(ConfigError, match="one weight per adapter"):
        merge_factors(f, [1.0], "linear")
    with pytest.raises(ConfigError, match="needs a density"):
        merge_factors(f, WEIGHTS, "ties")


# --------------------------------------------------------------------------- PEFT's add_weighted_adapter


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(30, 12)
        self.fc = torch.nn.Linear(12, 20)
        self.out = torch.nn.Linear(20, 7)
        self.conv = torch.nn.Conv2d(3, 5, 3)


def _two_adapters(use_rslora=False, patterns=False):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    targets = ["emb", "fc", "out", "conv"]
    extra = dict(rank_pattern={"out": 2}, alpha_pattern={"fc": 3}) if patterns else {}
    model = get_peft_model(_Net(), LoraConfig(r=4, lora_alpha=6, target_modules=targets, init_lora_weights=False,
                                              use_rslora=use_rslora, **extra), adapter_name="first")
    model.add_adapter("second", LoraConfig(r=4, lora_alpha=2, target_modules=targets, init_lora_weights=False,
                                           use_rslora=use_rslora))
    return model


def _deltas(model, adapter):
    from peft.tuners.lora.layer import LoraLayer

    return {k: m.get_delta_weight(adapter).detach() for k, m in model.base_model.model.named_modules()
            if isinstance(m, LoraLayer) and (adapter in m.lora_A or adapter in m.lora_embedding_A)}


def _add(model, name, patched, **kwargs):
    if patched:
        fe_peft.patch()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.add_weighted_adapter(["first", "second"], [0.7, -0.4], name, **kwargs)
    finally:
        fe_peft.unpatch()
    return _deltas(model, name)


@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_patched_equals_peft_where_peft_is_right(combination_type):
    model = _two_adapters()
    theirs = _add(model, "peft", False, combination_type=combination_type)
    ours = _add(model, "ours", True, combination_type=combination_type)
    assert sorted(theirs) == sorted(ours)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("combination_type", ["linear", "ties", "ties_svd", "dare_linear", "dare_ties_svd",
                                              "dare_linear_svd", "dare_ties", "magnitude_prune",
                                              "magnitude_prune_svd"])
def test_patched_every_combination_type_merges_products(combination_type):
    model = _two_adapters(use_rslora=True, patterns=True)
    first, second = _deltas(model, "first"), _deltas(model, "second")
    density = 1.0 if "dare" in combination_type else 0.5
    ours = _add(model, "ours", True, combination_type=combination_type, density=density)
    method = combination_type.removesuffix("_svd")
    for key, d1 in first.items():
        d2 = second[key]
        flat = [d.flatten(1) if d.dim() > 2 else d for d in (d1, d2)]
        if key == "emb":
            flat = [d.T for d in flat]  # factor layout of an embedding
        if method == "linear":
            want = 0.7 * flat[0] - 0.4 * flat[1]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dense = getattr(merge_utils, method)(flat, torch.tensor([0.7, -0.4]), density,
                                                     *(("total",) if "ties" in method else ()))
            want = _best(dense, 4)  # the module's largest input rank
        got = ours[key].flatten(1) if ours[key].dim() > 2 else ours[key]
        torch.testing.assert_close(got.T if key == "emb" else got, want, atol=1e-4, rtol=1e-4, msg=key)


def test_patched_cat_keeps_rank_pattern_and_rslora_scale_through_save(tmp_path):
    from peft import PeftModel

    model = _two_adapters(use_rslora=True, patterns=True)
    first, second = _deltas(model, "first"), _deltas(model, "second")
    _add(model, "both", True, combination_type="cat")
    cfg = model.peft_config["both"]
    assert cfg.r == 8 and not cfg.use_rslora and cfg.rank_pattern == {"out": 6}
    model.save_pretrained(str(tmp_path), selected_adapters=["both"])
    with open(tmp_path / "both" / "adapter_config.json") as f:
        assert json.load(f)["rank_pattern"] == {"out": 6}
    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(_Net(), str(tmp_path / "both"))
    got = _deltas(reloaded, "default")
    for key in first:
        torch.testing.assert_close(got[key], 0.7 * first[key] - 0.4 * second[key], atol=1e-5, rtol=1e-4, msg=key)


def test_patched_bf16_adapters():
    model = _two_adapters().to(torch.bfloat16)
    first, second = _deltas(model, "first"), _deltas(model, "second")
    ours = _add(model, "ours", True, combination_type="svd", svd_rank=8)
    for key in first:
        want = 0.7 * first[key].float() - 0.4 * second[key].float()
        torch.testing.assert_close(ours[key].float(), want, atol=0.05, rtol=0.02, msg=key)


# --------------------------------------------------------------------------- adapter folders and the CLI


def _second_adapter() -> str:
    from transformers import AutoModelForCausalLM

    p = tiny_lora()
    path = os.path.join(os.path.dirname(p["adapter"]), "adapter2")
    if not os.path.isdir(path):
        model = AutoModelForCausalLM.from_pretrained(p["base"])
        config = dict(LORA_CONFIG, r=3, rank_pattern={}, alpha_pattern={}, use_rslora=False,
                      target_modules=["q_proj", "k_proj", "up_proj"])
        peft_lora(model, seed=21, **config).save_pretrained(path)
    return path


def _weights_through(adapter: str) -> dict[str, torch.Tensor]:
    p = tiny_lora()
    with open_model(f"{p['base']}+{adapter}") as ck:
        return {n: ck.read(n) for n in ck.names()}


def test_merge_adapter_folders_linear_is_exact():
    p = tiny_lora()
    second = _second_adapter()
    base = load_dir(p["base"])
    one, two = _weights_through(p["adapter"]), _weights_through(second)
    out = os.path.join(scratch("madp"), "merged")
    ranks = merge_adapters([p["adapter"], second], [0.5, 2.0], out, "linear")
    assert ranks["model.layers.0.self_attn.q_proj"] == 7 and ranks["model.layers.1.self_attn.q_proj"] == 5
    got = _weights_through(out)
    for name, w in base.items():
        if "embed_tokens" in name or "lm_head" in name:  # stored whole by the first adapter (weighted average)
            continue
        want = w + 0.5 * (one[name] - w) + 2.0 * (two[name] - w)
        torch.testing.assert_close(got[name], want, atol=1e-5, rtol=1e-5, msg=name)
    with open(os.path.join(out, "adapter_config.json")) as f:
        cfg = json.load(f)
    assert cfg["r"] == 7 and cfg["rank_pattern"]["model.layers.0.self_attn.k_proj"] == 3 and not cfg["use_rslora"]


def test_cli_merge_adapters(capsys):
    p = tiny_lora()
    second = _second_adapter()
    out = os.path.join(scratch("cli"), "merged")
    assert cli_main(["merge-adapters", p["adapter"], second, "--out-path", out, "--method", "ties",
                     "--density", "0.5", "--rank", "2", "--weights", "1", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    with open(os.path.join(out, "adapter_config.json")) as f:
        assert json.load(f)["r"] == 2
    assert cli_main(["merge-adapters", p["adapter"], second, "--out-path", out + "x", "--method", "ties"]) == 2
    assert "needs a density" in capsys.readouterr().err
    assert cli_main(["merge-adapters", p["adapter"], p["base"], "--out-path", out + "y"]) == 2
    assert "adapter_config.json: missing" in capsys.readouterr().err
