"""``BASE+ADAPTER`` references: the adapter merged per tensor equals PEFT's ``merge_and_unload()``."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from fusion_engine.cli import main as cli_main
from fusion_engine.errors import CheckpointError
from fusion_engine.lora import open_model
from fusion_engine.lora.adapter import LoraAdapter
from lora_fixtures import peft_lora, scratch, tiny_lora
from utils import load_dir, merge_alongside_mergekit


def write(folder: str, text: str) -> str:
    path = os.path.join(folder, "config.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def assert_same(got: dict, want: dict, atol: float = 1e-6) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name].float(), want[name].float(), atol=atol, rtol=0, msg=name)


def test_open_model_equals_merge_and_unload():
    p = tiny_lora()
    want = load_dir(p["merged"])
    with open_model(f"{p['base']}+{p['adapter']}") as ck:
        got = {n: ck.read(n) for n in ck.names()}
        assert ck.config()["model_type"] == "llama" and ck.directory == p["base"]
    assert_same(got, want)
    base = load_dir(p["base"])  # the adapter changed what it targets and nothing else
    changed = {n for n in base if not torch.equal(base[n], got[n])}
    assert changed == {n for n in base if any(t in n for t in ("q_proj", "v_proj", "down_proj", "lm_head",
                                                               "embed_tokens"))}


@pytest.mark.parametrize("spelling", ["plus", "long_form"])
def test_merge_with_lora_reference_equals_peft_then_merge(spelling):
    """linear(base+adapter, model_0) with base+adapter also as base_model == the same merge of PEFT's merged model."""
    p = tiny_lora()
    ref = f"{p['base']}+{p['adapter']}" if spelling == "plus" else f"{{model: {p['base']}, lora: {p['adapter']}}}"
    folder = scratch("merge")
    template = ("merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n  - model: {b}\n"
                "  - model: {m0}\n    parameters: {{weight: 0.7}}\n  - model: {m1}\n    parameters: {{weight: 0.4}}\n"
                "dtype: float32\n")
    ours = write(folder, template.format(b=ref, m0=p["model_0"], m1=p["model_1"]))
    assert cli_main(["merge", ours, os.path.join(folder, "out"), "--quiet", "--lora-merge-cache", folder]) == 0
    ref_folder = scratch("ref")
    theirs = write(ref_folder, template.format(b=p["merged"], m0=p["model_0"], m1=p["model_1"]))
    assert cli_main(["merge", theirs, os.path.join(ref_folder, "out"), "--quiet"]) == 0
    assert_same(load_dir(os.path.join(folder, "out")), load_dir(os.path.join(ref_folder, "out")))
    out_files = set(os.listdir(os.path.join(folder, "out")))
    assert {"config.json", "tokenizer.json"} <= out_files  # config and tokenizer from the base


def test_lora_in_slices():
    p = tiny_lora()
    folder = scratch("slices")
    cfg = write(folder, f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {p['base']}+{p['adapter']}\n"
                        f"        layer_range: [1, 2]\n  - sources:\n      - model: {p['model_0']}\n"
                        f"        layer_range: [0, 1]\n")
    out = os.path.join(folder, "out")
    assert cli_main(["merge", cfg, out, "--quiet"]) == 0
    got, merged = load_dir(out), load_dir(p["merged"])
    torch.testing.assert_close(got["model.layers.0.self_attn.q_proj.weight"],
                               merged["model.layers.1.self_attn.q_proj.weight"], atol=0, rtol=0)
    torch.testing.assert_close(got["lm_head.weight"], load_dir(p["model_0"])["lm_head.weight"], atol=0, rtol=0)


def test_bf16_matches_peft():
    p = tiny_lora(torch.bfloat16)
    with open_model(f"{p['base']}+{p['adapter']}") as ck:
        got = {n: ck.read(n) for n in ck.names()}
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert_same(got, load_dir(p["merged"]), atol=0)


class _Mixed(torch.nn.Module):
    """Every PEFT LoRA layer kind: Linear (with bias), Conv1D (fan_in_fan_out), Conv2d 3×3 and 1×1, Conv1d, Embedding."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.emb = torch.nn.Embedding(20, 6)
        self.lin = torch.nn.Linear(6, 5)
        self.c1d = Conv1D(7, 6)  # weight (in=6, out=7)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.pw = torch.nn.Conv2d(4, 2, 1)
        self.conv1 = torch.nn.Conv1d(3, 5, 2)


def _save_base(model: torch.nn.Module, folder: str) -> str:
    from safetensors.torch import save_file

    os.makedirs(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "model.safetensors"))
    return folder


@pytest.mark.parametrize("targets,fan_in_fan_out,lora_bias", [
    (["lin", "conv", "pw", "conv1", "emb"], False, False),
    (["lin"], False, True),
    (["c1d"], True, False),
])
def test_every_layer_kind_matches_merge_and_unload(targets, fan_in_fan_out, lora_bias):
    torch.manual_seed(0)
    base = _Mixed()
    folder = scratch("mixed")
    base_dir = _save_base(base, os.path.join(folder, "base"))
    peft_model = peft_lora(base, seed=3, r=2, lora_alpha=5, target_modules=targets, fan_in_fan_out=fan_in_fan_out,
                           lora_bias=lora_bias)
    peft_model.save_pretrained(os.path.join(folder, "adapter"))
    want = {k: v.detach() for k, v in peft_model.merge_and_unload().state_dict().items()}
    with open_model(f"{base_dir}+{os.path.join(folder, 'adapter')}") as ck:
        got = {n: ck.read(n) for n in ck.names()}
    assert_same(got, want, atol=1e-6)


# --------------------------------------------------------------------------- bad adapters


def _broken_adapter(edit) -> str:
    p = tiny_lora()
    folder = os.path.join(scratch("broken"), "adapter")
    shutil.copytree(p["adapter"], folder)
    edit(folder)
    return folder


def _edit_config(**changes):
    def edit(folder):
        path = os.path.join(folder, "adapter_config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg.update(changes)
        with open(path, "w") as f:
            json.dump(cfg, f)
    return edit


def _drop_config(folder):
    os.remove(os.path.join(folder, "adapter_config.json"))


def _wrong_shape(folder):
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, "adapter_model.safetensors")
    sd = load_file(path)
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    sd[key] = torch.zeros(17, 4)
    save_file(sd, path)


@pytest.mark.parametrize("edit,says", [
    (_drop_config, "adapter_config.json: missing"),
    (_wrong_shape, "B·A has shape [17, 32]"),
    (_edit_config(r=3), "has rank 4 but adapter_config.json gives"),
    (_edit_config(target_modules=["q_proj", "wq"]), "target_modules ['wq'] match no module"),
])
def test_bad_adapter_is_a_clear_error_naming_the_file(edit, says, capsys):
    p = tiny_lora()
    adapter = _broken_adapter(edit)
    with pytest.raises(CheckpointError) as exc:
        open_model(f"{p['base']}+{adapter}").close()
    assert says in str(exc.value) and adapter in str(exc.value)
    folder = scratch("cli")
    cfg = write(folder, f"merge_method: linear\nmodels:\n  - model: {p['base']}+{adapter}\n  - model: {p['model_0']}\n"
                        "parameters: {weight: 0.5}\n")
    assert cli_main(["merge", cfg, os.path.join(folder, "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "config.yaml line 3" in err and says in err and not os.path.exists(os.path.join(folder, "out"))


def test_adapter_on_the_wrong_base(capsys):
    torch.manual_seed(0)
    folder = scratch("wrong")
    other = _save_base(_Mixed(), os.path.join(folder, "other"))
    with pytest.raises(CheckpointError, match="is not in the base model"):
        open_model(f"{other}+{tiny_lora()['adapter']}")
    with pytest.raises(CheckpointError, match="no such folder"):
        LoraAdapter(os.path.join(folder, "nothing"))


@pytest.mark.slow  # mergekit merges the adapter with transformers + PEFT in a child process: ~25 s
def test_lora_reference_same_as_mergekit():
    """mergekit merges BASE+LORA into a cached model with PEFT first; we apply it per tensor: same output."""
    from utils import load_dir, merge_alongside_mergekit

    p = tiny_lora()
    folder = scratch("mergekit")
    cfg = write(folder, f"merge_method: ties\nbase_model: {p['base']}\nmodels:\n  - model: {p['base']}+{p['adapter']}\n"
                        f"    parameters: {{weight: 1.0, density: 0.6}}\n  - model: {p['model_0']}\n"
                        f"    parameters: {{weight: 0.5, density: 0.8}}\ndtype: float32\n")
    ours, theirs = os.path.join(folder, "ours"), os.path.join(folder, "theirs")

    def run_ours(config, out):
        assert cli_main(["merge", config, out, "--quiet", "--lora-merge-cache", os.path.join(folder, "unused")]) == 0

    merge_alongside_mergekit([(cfg, ours, theirs)], run_ours,
                             f"--no-write-model-card --lora-merge-cache {os.path.join(folder, 'cache')}")
    assert_same(load_dir(ours), load_dir(theirs), atol=2e-6)


def test_in_memory_merger_reads_lora_references():
    from fusion_engine.evolve.merger import InMemoryMerger

    p = tiny_lora()
    with InMemoryMerger() as merger:
        got = merger.merge(f"merge_method: linear\nmodels:\n  - model: {p['base']}+{p['adapter']}\n"
                           "parameters: {weight: 1.0}\n")
    assert_same(got, load_dir(p["merged"]))
