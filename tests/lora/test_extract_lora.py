"""``extract-lora``: recovers planted low-rank deltas, keeps the best rank-k part, loads in PEFT."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fusion_engine.cli import main as cli_main
from fusion_engine.lora import open_model
from fusion_engine.lora.extract import extract_lora
from fusion_engine.lora.svd import truncated_svd
from lora_fixtures import ROOT, scratch, tiny_lora
from utils import load_dir

PLANTED = {"q_proj": 2, "k_proj": 3, "v_proj": 3, "o_proj": 5, "gate_proj": 5, "up_proj": 5, "down_proj": 5,
           "lm_head": 4}


def _planted(hidden: int = 64):
    """A tiny Llama base and a fine-tune whose linear deltas have the ranks of PLANTED; norms and embeddings
    change too."""
    from transformers import AutoModelForCausalLM

    from fusion_engine.demo import build_tiny_llamas

    folder = os.path.join(ROOT, f"planted_{hidden}")
    if os.path.isdir(os.path.join(folder, "tuned")):
        return {"base": os.path.join(folder, "base"), "tuned": os.path.join(folder, "tuned")}
    paths = build_tiny_llamas(folder, n_models=0, num_layers=2, hidden=hidden, seed=5)
    model = AutoModelForCausalLM.from_pretrained(paths["base"])
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in model.named_parameters():
            kind = name.split(".")[-2]
            if kind in PLANTED:
                r = PLANTED[kind]
                p += 0.05 * torch.randn(p.shape[0], r, generator=g) @ torch.randn(r, p.shape[1], generator=g)
            else:  # embeddings, norms
                p += 0.01 * torch.randn(p.shape, generator=g)
    paths["tuned"] = os.path.join(folder, "tuned")
    model.save_pretrained(paths["tuned"])
    return paths


def _peft_merged(base: str, adapter: str) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def _rel_errors(got: dict, want: dict, base: dict) -> dict[str, float]:
    out = {}
    for name, w in want.items():
        delta = (w - base[name]).norm()
        if delta > 0:
            out[name] = float((got[name] - w).norm() / delta)
    return out


def test_recovers_planted_low_rank_deltas_and_loads_in_peft():
    p = _planted()
    out = os.path.join(scratch("extract"), "adapter")
    reports = extract_lora(p["tuned"], p["base"], out, max_rank=8, sv_epsilon=1e-3)  # above fp32 rounding noise
    with open(os.path.join(out, "adapter_config.json")) as f:
        cfg = json.load(f)
    assert cfg["r"] == cfg["lora_alpha"] == 5
    assert cfg["rank_pattern"] == cfg["alpha_pattern"]
    assert {k.rsplit(".", 1)[-1] for k in cfg["rank_pattern"]} == {"q_proj", "k_proj", "v_proj", "lm_head"}
    assert all(v == PLANTED[k.rsplit(".", 1)[-1]] for k, v in cfg["rank_pattern"].items())
    assert set(cfg["target_modules"]) == set(PLANTED)
    assert set(cfg["modules_to_save"]) == {"embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"}
    by_module = {r.module: r for r in reports}
    assert by_module["model.layers.0.self_attn.q_proj"].rank == 2
    assert all(r.energy_kept > 0.999999 for r in reports if r.kind == "lora")
    want, base = load_dir(p["tuned"]), load_dir(p["base"])
    errors = _rel_errors(_peft_merged(p["base"], out), want, base)
    assert max(errors.values()) < 1e-2, errors
    with open_model(f"{p['base']}+{out}") as ck:  # and our own BASE+ADAPTER reader agrees
        ours = {n: ck.read(n) for n in ck.names()}
    assert max(_rel_errors(ours, want, base).values()) < 1e-2


def test_truncation_keeps_the_best_rank_k_part():
    p = tiny_lora()  # model_0 = base + dense noise: full-rank deltas
    out = os.path.join(scratch("trunc"), "adapter")
    reports = extract_lora(p["model_0"], p["base"], out, max_rank=3, skip_undecomposable=True)
    model, base = load_dir(p["model_0"]), load_dir(p["base"])
    adapter = load_dir(out)
    name = "model.layers.1.mlp.up_proj"
    delta = model[f"{name}.weight"] - base[f"{name}.weight"]
    u, s, vh = torch.linalg.svd(delta.double())
    best = (u[:, :3] * s[:3]) @ vh[:3]
    got = adapter[f"base_model.model.{name}.lora_B.weight"] @ adapter[f"base_model.model.{name}.lora_A.weight"]
    torch.testing.assert_close(got.double(), best, atol=1e-5, rtol=0)
    report = next(r for r in reports if r.module == name)
    assert report.rank == 3 and report.energy_kept == pytest.approx(float((s[:3] ** 2).sum() / (s ** 2).sum()), 1e-5)
    assert not any("norm" in k for k in adapter)  # --skip-undecomposable
    assert "base_model.model.model.embed_tokens.weight" in adapter  # embeddings stay whole


def test_embed_lora_and_sv_epsilon():
    p = _planted()
    out = os.path.join(scratch("embed"), "adapter")
    reports = extract_lora(p["tuned"], p["base"], out, max_rank=40, embed_lora=True, sv_epsilon=1e-4)
    adapter = load_dir(out)
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in adapter
    assert {r.module: r.rank for r in reports}["model.layers.0.mlp.up_proj"] == 5  # epsilon drops the noise floor
    want, base = load_dir(p["tuned"]), load_dir(p["base"])
    got = _peft_merged(p["base"], out)
    name = "model.embed_tokens.weight"  # dense noise: rank 40 of 64 keeps a known part of it
    kept = {r.module: r.energy_kept for r in reports}["model.embed_tokens"]
    rel = _rel_errors(got, want, base)[name]
    assert 0.05 < rel and rel ** 2 == pytest.approx(1 - kept, rel=1e-3)


def test_randomized_path_matches_exact_svd_on_low_rank_stacks():
    g = torch.Generator().manual_seed(0)
    stack = torch.randn(3, 300, 6, generator=g) @ torch.randn(3, 6, 200, generator=g)
    from fusion_engine.lora import svd

    svd.EXACT_MAX_DIM, saved = 0, svd.EXACT_MAX_DIM
    try:
        u, s, vh = truncated_svd(stack, max_rank=8)  # 300 x 200 > 2·18: randomized
    finally:
        svd.EXACT_MAX_DIM = saved
    exact = torch.linalg.svdvals(stack)[:, :18]
    torch.testing.assert_close(s[:, :6], exact[:, :6], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close((u[..., :6] * s[:, None, :6]) @ vh[:, :6], stack, rtol=0, atol=1e-3)


def test_conv_and_bias_modules():
    from test_lora_reference import _Mixed, _save_base

    torch.manual_seed(1)
    folder = scratch("convex")
    base = _Mixed()
    base_dir = _save_base(base, os.path.join(folder, "base"))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name in ("conv.weight", "conv1.weight", "pw.weight"):
                flat = torch.randn(p.shape[0], 1, generator=g) @ torch.randn(1, p[0].numel(), generator=g)
                p += flat.view(p.shape)
            elif name.endswith("bias"):
                p += 0.1
    tuned_dir = _save_base(base, os.path.join(folder, "tuned"))
    out = os.path.join(folder, "adapter")
    extract_lora(tuned_dir, base_dir, out, max_rank=4, sv_epsilon=1e-4, skip_undecomposable=True,
                 exclude_regexes=["^c1d$"])  # Conv1D weights are (in, out): not a PEFT Linear layout
    with open(os.path.join(out, "adapter_config.json")) as f:
        cfg = json.load(f)
    assert cfg["r"] == 1 and cfg["lora_bias"]  # conv biases ride on lora_B.bias
    assert cfg["modules_to_save"] == ["lin"]  # a bias change without a weight change
    with open_model(f"{base_dir}+{out}") as ck:
        got = {n: ck.read(n) for n in ck.names()}
    want = load_dir(tuned_dir)
    for name in ("conv.weight", "conv1.weight", "pw.weight", "conv.bias", "lin.bias"):
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=0, msg=name)


def test_cli_extract_lora(capsys):
    p = _planted()
    out = os.path.join(scratch("cli"), "adapter")
    assert cli_main(["extract-lora", "--model", p["tuned"], "--base-model", p["base"], "--out-path", out,
                     "--max-rank", "6", "--save-module", "lm_head", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "energy kept" in text and "model.layers.1.mlp.down_proj" in text and "saved whole" in text
    with open(os.path.join(out, "adapter_config.json")) as f:
        assert "lm_head" in json.load(f)["modules_to_save"]
    assert cli_main(["extract-lora", "--model", p["tuned"], "--base-model", p["base"], "--out-path", out]) == 2
    assert "exists" in capsys.readouterr().err
    assert cli_main(["extract-lora", "--model", p["tuned"], "--base-model", p["base"], "--out-path", out + "2",
                     "--max-rank", "0"]) == 2
    assert cli_main(["extract-lora", "--model", p["tuned"], "--base-model", p["base"] + "x", "--out-path",
                     out + "3"]) == 2


def test_round_trip_from_a_lora_reference():
    """Extracting BASE+ADAPTER against BASE gives an adapter with the same effect (ranks <= the adapter's)."""
    p = tiny_lora()
    out = os.path.join(scratch("roundtrip"), "adapter")
    reports = extract_lora(f"{p['base']}+{p['adapter']}", p["base"], out, max_rank=8, sv_epsilon=1e-4)
    ranks = {r.module: r.rank for r in reports if r.kind == "lora"}
    assert ranks["model.layers.1.self_attn.q_proj"] == 2 and max(ranks.values()) == 4
    with open_model(f"{p['base']}+{p['adapter']}") as a, open_model(f"{p['base']}+{out}") as b:
        for name in a.names():
            torch.testing.assert_close(b.read(name), a.read(name), atol=1e-5, rtol=1e-5, msg=name)
