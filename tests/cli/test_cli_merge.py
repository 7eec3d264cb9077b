"""``fusion-engine merge`` and friends: options, outputs, help, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch

from cli_fixtures import load_dir, run_cli, run_cli_subprocess, scratch, tiny_llamas, write


def ties_config(m: dict, extra: str = "") -> str:
    return (f"merge_method: ties\nbase_model: {m['base']}\nmodels:\n"
            f"  - model: {m['model_0']}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
            f"  - model: {m['model_1']}\n    parameters: {{weight: 0.5, density: [0.2, 0.8]}}\n{extra}")


@pytest.fixture(scope="module")
def reference_merge():
    """One ordinary merge, reused as the reference by the option tests."""
    m = tiny_llamas()
    folder = scratch("ref")
    config = write(folder, "config.yaml", ties_config(m))
    out = os.path.join(folder, "out")
    assert run_cli("merge", config, out, "--quiet") == 0
    return config, out


def test_one_run_parses_each_header_once_and_validates_parameters_once(reference_merge, monkeypatch):
    from fusion_engine import methods
    from fusion_engine.io import safetensors_reader
    from fusion_engine.methods import registry

    config, out = reference_merge
    parsed, validated = [], []
    parse_header, validate = safetensors_reader.parse_header, registry.validate_parameters
    monkeypatch.setattr(safetensors_reader, "parse_header", lambda path, *a: parsed.append(path) or parse_header(path, *a))
    for where in (registry, methods):  # merge_tensors calls the first, the planner the second
        monkeypatch.setattr(where, "validate_parameters", lambda *a, **k: validated.append(a) or validate(*a, **k))
    folder = scratch("once")
    assert run_cli("merge", config, os.path.join(folder, "out"), "--quiet") == 0
    assert sorted(parsed) == sorted(set(parsed)) and len(parsed) == 3  # base, model_0, model_1: once each
    # the planner validates each distinct parameter set (the density gradient makes one per layer), the
    # executor none of the 39 tensors again
    assert 0 < len(validated) < 39
    assert load_dir(os.path.join(folder, "out")).keys() == load_dir(out).keys()


def test_merge_writes_a_complete_checkpoint(reference_merge):
    config, out = reference_merge
    files = sorted(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "mergekit_config.yml"} <= set(files)
    with open(os.path.join(out, "mergekit_config.yml")) as f, open(config) as g:
        assert f.read() == g.read()
    tensors = load_dir(out)
    assert len(tensors) == 39 and all(t.dtype == torch.float32 for t in tensors.values())
    base = load_dir(tiny_llamas()["base"])
    assert not torch.equal(tensors["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def test_console_script_merge_prints_plan_and_summary():
    m = tiny_llamas()
    folder = scratch("script")
    config = write(folder, "config.yaml", ties_config(m))
    exe = shutil.which("fusion-engine")
    argv = ["merge", config, os.path.join(folder, "out")]
    result = (subprocess.run([exe, *argv], capture_output=True, text=True, timeout=120) if exe
              else run_cli_subprocess(*argv))
    assert result.returncode == 0, result.stderr
    assert "plan for" in result.stdout and "ties: 39 tensors" in result.stdout and "wrote " in result.stdout
    assert os.path.isfile(os.path.join(folder, "out", "model.safetensors"))


def test_dry_run_writes_nothing(capsys):
    m = tiny_llamas()
    folder = scratch("dry")
    config = write(folder, "config.yaml", ties_config(m))
    os.makedirs(os.path.join(folder, "existing"))
    assert run_cli("merge", config, os.path.join(folder, "existing"), "--dry-run") == 0  # no out-dir check
    out = capsys.readouterr().out
    assert "39 tensors" in out and "ties" in out and "4 layers" in out and "reads:" in out and "dry run" in out
    assert sorted(os.listdir(folder)) == ["config.yaml", "existing"] and os.listdir(os.path.join(folder, "existing")) == []


def test_quiet_prints_nothing(capsys):
    m = tiny_llamas()
    folder = scratch("quiet")
    config = write(folder, "config.yaml", ties_config(m))
    assert run_cli("merge", config, os.path.join(folder, "out"), "--quiet") == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_shards_and_overwrite(reference_merge):
    config, ref_out = reference_merge
    folder = scratch("shards")
    out = os.path.join(folder, "out")
    os.makedirs(out)
    write(out, "stale.txt", "old")
    assert run_cli("merge", config, out, "--out-shard-size", "100KB", "--allow-overwrite", "--quiet") == 0
    files = os.listdir(out)
    assert "stale.txt" not in files and "model.safetensors.index.json" in files
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 3
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        assert set(json.load(f)["weight_map"].values()) == set(shards)
    ours, ref = load_dir(out), load_dir(ref_out)
    assert sorted(ours) == sorted(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4


def test_dtypes_and_tokenizer_source(capsys):
    m = tiny_llamas()
    other = tiny_llamas(num_layers=2)
    folder = scratch("dtypes")
    with open(os.path.join(other["base"], "tokenizer.json")) as f:
        tokenizer_json = f.read()
    donor = os.path.join(folder, "donor")
    os.makedirs(donor)
    write(donor, "tokenizer.json", tokenizer_json.replace('"<unk>"', '"<UNKNOWN>"'))
    shutil.copy(os.path.join(other["base"], "tokenizer_config.json"), donor)
    config = write(folder, "config.yaml", ties_config(m, f"dtype: float32\nout_dtype: bfloat16\n"
                                                         f"tokenizer_source: {donor}\n"))
    out = os.path.join(folder, "out")
    assert run_cli("merge", config, out, "--quiet") == 0
    assert all(t.dtype == torch.bfloat16 for t in load_dir(out).values())
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    with open(os.path.join(out, "tokenizer.json")) as f:
        assert "<UNKNOWN>" in f.read()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_user_error(capsys):
    m = tiny_llamas()
    folder = scratch("cuda")
    config = write(folder, "config.yaml", ties_config(m))
    assert run_cli("merge", config, os.path.join(folder, "out"), "--device", "cuda") == 2
    assert "no CUDA GPU" in capsys.readouterr().err and os.listdir(folder) == ["config.yaml"]


@pytest.mark.gpu
def test_merge_on_cuda_matches_cpu(reference_merge):
    config, ref_out = reference_merge
    out = os.path.join(scratch("gpu"), "out")
    assert run_cli("merge", config, out, "--device", "cuda", "--quiet") == 0
    ours, ref = load_dir(out), load_dir(ref_out)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("argv", [[], ["merge"], ["demo"], ["selftest"], ["backends"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(*argv, "--help")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fusion-engine")
    if argv == ["merge"]:
        for option in ("--device", "--out-shard-size", "--dry-run", "--allow-overwrite", "--quiet"):
            assert option in out


def test_backends_and_version(capsys):
    assert run_cli("backends") == 0
    out = capsys.readouterr().out
    assert "torch" in out and "cpp" in out
    with pytest.raises(SystemExit) as info:
        run_cli("--version")
    assert info.value.code == 0


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        run_cli("frobnicate")
    assert info.value.code == 2
