"""``fusion-engine moe`` against mergekit-moe on the same YAML: every tensor, the config, loading.

Tiny dense Llama / Mistral / Qwen3 models (hidden 32, 2 layers, a character tokenizer) are built in
the session. mergekit 0.1.5 writes Mixtral and Qwen3-MoE experts fused (``experts.gate_up_proj``,
``experts.down_proj``), as transformers 5 holds them, and Qwen2-MoE experts one by one (transformers
fuses them on load); ours are fused for all three, so the Qwen2-MoE comparison fuses mergekit's.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from fusion_engine.moe import build_moe, parse_moe_config
from moe_fixtures import dense_models, load_dir, mergekit_moe, scratch


def moe_yaml(paths, gate_mode, *, architecture=None, shared=False, dtype="float32") -> str:
    text = f"""\
base_model: {paths['base']}
gate_mode: {gate_mode}
dtype: {dtype}
experts_per_token: 2
experts:
  - source_model: {paths['e0']}
    positive_prompts: ["def f(x): return x", "import os"]
    negative_prompts: ["Once upon a time"]
  - source_model: {paths['e1']}
    positive_prompts: ["The cat sat on the mat"]
    residual_scale: 0.5
  - source_model: {paths['e2']}
    positive_prompts: ["12 + 7 = 19", "3*3", "x"]
"""
    if architecture:
        text += f"architecture: {architecture}\n"
    if shared:
        text += f"shared_experts:\n  - source_model: {paths['base']}\n    positive_prompts: [\"hello there\"]\n"
    return text


def fuse_per_expert(tensors: dict, num_experts: int) -> dict:
    """mergekit's Qwen2-MoE per-expert tensors -> transformers' fused layout (what its loader does)."""
    out = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    layers = {k.split(".mlp.")[0] for k in tensors if ".mlp.experts." in k}
    for prefix in layers:
        w = lambda e, p: tensors[f"{prefix}.mlp.experts.{e}.{p}.weight"]  # noqa: E731
        out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([w(e, "gate_proj"), w(e, "up_proj")]) for e in range(num_experts)])
        out[f"{prefix}.mlp.experts.down_proj"] = torch.stack([w(e, "down_proj") for e in range(num_experts)])
    return out


def assert_same_checkpoint(ours: str, theirs: str, *, atol: float = 0.0, fuse: bool = False) -> None:
    a, b = load_dir(ours), load_dir(theirs)
    if fuse:
        b = fuse_per_expert(b, 3)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)
    ca = json.load(open(os.path.join(ours, "config.json")))
    cb = json.load(open(os.path.join(theirs, "config.json")))
    ca.pop("transformers_version", None), cb.pop("transformers_version", None)
    assert ca == cb


def run_both(text: str, seed: int | None = 3):
    theirs, ours = os.path.join(scratch("mk"), "out"), os.path.join(scratch("fe"), "out")
    mergekit_moe(text, theirs, seed=seed)
    build_moe(parse_moe_config(text), ours, seed=seed)
    return ours, theirs


@pytest.mark.parametrize("gate_mode", ["random", "uniform_random", "cheap_embed", "hidden"])
def test_mixtral_from_llama_matches_mergekit(gate_mode):
    ours, theirs = run_both(moe_yaml(dense_models("llama"), gate_mode))
    # random gates too: --random-seed makes mergekit's global draw the one we make from the seed
    assert_same_checkpoint(ours, theirs)
    assert json.load(open(os.path.join(ours, "config.json")))["architectures"] == ["MixtralForCausalLM"]


def test_mixtral_from_mistral_bf16_matches_mergekit():
    ours, theirs = run_both(moe_yaml(dense_models("mistral"), "cheap_embed", dtype="bfloat16"))
    assert_same_checkpoint(ours, theirs)


def test_qwen2_moe_with_shared_expert_matches_mergekit():
    ours, theirs = run_both(moe_yaml(dense_models("llama"), "hidden", architecture="qwen", shared=True))
    assert_same_checkpoint(ours, theirs, fuse=True)
    names = load_dir(ours)
    assert names["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 32)
    assert not names["model.layers.1.self_attn.q_proj.bias"].any()


def test_qwen3_moe_matches_mergekit():
    ours, theirs = run_both(moe_yaml(dense_models("qwen3"), "cheap_embed"))
    assert_same_checkpoint(ours, theirs)
    assert json.load(open(os.path.join(ours, "config.json")))["architectures"] == ["Qwen3MoeForCausalLM"]
