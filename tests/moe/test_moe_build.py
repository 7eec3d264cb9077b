"""``fusion-engine moe``: the output is a working MoE, bad configs fail clearly, nothing half-written."""

from __future__ import annotations

import os

import pytest
import torch

from fusion_engine.cli import main as cli_main
from fusion_engine.errors import ConfigError, MissingTensorError
from fusion_engine.moe import build_moe, parse_moe_config
from moe_fixtures import dense_models, scratch


def _yaml(paths, experts, gate_mode="cheap_embed", extra=""):
    lines = [f"base_model: {paths['base']}", f"gate_mode: {gate_mode}", "dtype: float32", extra, "experts:"]
    for i, model in enumerate(experts):
        lines += [f"  - source_model: {paths[model]}", f"    positive_prompts: [\"prompt {i}\"]"]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_copies_of_the_base_mlp_give_the_base_model(kind):
    """Every expert = the base's MLP: whatever the routing (weights sum to 1), the MoE computes the base model.
    This pins the fused layout (gate before up, down not transposed) in transformers' own forward."""
    from transformers import AutoModelForCausalLM

    paths = dense_models(kind)
    out = os.path.join(scratch("same"), "moe")
    build_moe(parse_moe_config(_yaml(paths, ["base", "base", "base"], "random")), out, seed=0, allow_all_same=True)
    moe, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    base = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32).eval()
    ids = torch.tensor([[1, 40, 41, 42, 60, 70, 5]])
    with torch.no_grad():
        torch.testing.assert_close(moe.eval()(ids).logits, base(ids).logits, atol=1e-5, rtol=1e-5)


def test_qwen2_moe_loads_every_tensor():
    from transformers import AutoModelForCausalLM

    paths = dense_models("llama")
    extra = f"architecture: qwen\nshared_experts:\n  - source_model: {paths['base']}\n    positive_prompts: [\"hi\"]"
    out = os.path.join(scratch("qwen2"), "moe")
    build_moe(parse_moe_config(_yaml(paths, ["e0", "e1", "e2"], "cheap_embed", extra)), out)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(model.model.layers[1].mlp.experts.down_proj[2],
                               _load(paths["e2"])["model.layers.1.mlp.down_proj.weight"])


def _load(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def test_output_loads_and_generates_through_the_cli():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = dense_models("llama")
    work = scratch("cli")
    config = os.path.join(work, "moe.yml")
    with open(config, "w") as f:
        f.write(_yaml(paths, ["e0", "e1", "e2"], "hidden", "experts_per_token: 2"))
    out = os.path.join(work, "out")
    assert cli_main(["moe", config, out, "--quiet", "--gate-dtype", "float32"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "mergekit_moe_config.yml", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json"]
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 3
    ids = tok("Hello", return_tensors="pt").input_ids
    new = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
    assert new.shape[1] == ids.shape[1] + 6
    assert cli_main(["moe", config, out, "--quiet"]) == 2  # exists: refused, untouched
    assert os.path.isfile(os.path.join(out, "model.safetensors"))


@pytest.mark.parametrize("change,message", [
    (lambda t: t.replace("gate_mode: cheap_embed", "gate_mode: hiden"), "unknown gate_mode 'hiden'"),
    (lambda t: t + "experts_per_token: 4\n", "3 experts but experts_per_token is 4"),
    (lambda t: t + "experts_per_token: 0\n", "experts_per_token must be >= 1"),
    (lambda t: t.replace('    positive_prompts: ["prompt 1"]\n', ""), "expert 1 has no positive_prompts"),
    (lambda t: t.replace("prompt 1", "prompt 0").replace("prompt 2", "prompt 0"), "prompts are identical"),
    (lambda t: t + "architecture: qwen3\n", "Qwen3 MoE takes qwen3 models"),
    (lambda t: t + "architecture: deepseek\n", "DeepSeek-MoE output needs remote code"),
    (lambda t: t + "colour: red\n", "unknown key 'colour'"),
])
def test_bad_configs_name_the_problem(change, message):
    paths = dense_models("llama")
    text = change(_yaml(paths, ["e0", "e1", "e2"]))
    out = os.path.join(scratch("bad"), "out")
    with pytest.raises(ConfigError, match=message):
        build_moe(parse_moe_config(text), out)
    assert not os.path.exists(out)


def test_same_model_everywhere_needs_the_flag():
    paths = dense_models("llama")
    with pytest.raises(ConfigError, match="all experts are the same model"):
        build_moe(parse_moe_config(_yaml(paths, ["e0", "e0", "e0"])), os.path.join(scratch("same"), "o"))


def test_expert_missing_an_mlp_tensor(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    paths = dict(dense_models("llama"))
    broken = str(tmp_path / "broken")
    shutil.copytree(paths["e1"], broken)
    sd = load_file(os.path.join(broken, "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, os.path.join(broken, "model.safetensors"), metadata={"format": "pt"})
    paths["e1"] = broken
    out = str(tmp_path / "out")
    with pytest.raises(MissingTensorError, match=r"broken: no tensor 'model.layers.1.mlp.up_proj.weight'"):
        build_moe(parse_moe_config(_yaml(paths, ["e0", "e1", "e2"])), out)
    assert not os.path.exists(out)


def test_random_gates_follow_the_seed_and_bad_cli_values_exit_2():
    from moe_fixtures import load_dir

    paths = dense_models("llama")
    work = scratch("seed")
    config = os.path.join(work, "moe.yml")
    with open(config, "w") as f:
        f.write(_yaml(paths, ["e0", "e1", "e2"], "random"))
    outs = [os.path.join(work, name) for name in ("a", "b", "c")]
    for out, seed in zip(outs, ("5", "5", "6")):
        assert cli_main(["moe", config, out, "--random-seed", seed, "-q"]) == 0
    a, b, c = (load_dir(o) for o in outs)
    gate = "model.layers.0.mlp.gate.weight"
    assert torch.equal(a[gate], b[gate]) and not torch.equal(a[gate], c[gate])
    assert torch.equal(a["model.layers.1.mlp.experts.down_proj"], c["model.layers.1.mlp.experts.down_proj"])
    assert cli_main(["moe", config, os.path.join(work, "d"), "--gate-dtype", "int8"]) == 2
    assert cli_main(["moe", os.path.join(work, "missing.yml"), os.path.join(work, "d")]) == 2
    assert not os.path.exists(os.path.join(work, "d"))
