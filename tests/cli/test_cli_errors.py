"""Bad input to ``fusion-engine merge``: a clear one-line error, exit code 2, and no output folder left."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_fixtures import run_cli, run_cli_subprocess, scratch, tiny_llamas, write


def broken_copy(src: str, edit) -> str:
    """A copy of model ``src`` whose model.safetensors went through ``edit(path)``."""
    dest = os.path.join(scratch("broken"), "model")
    shutil.copytree(src, dest)
    edit(os.path.join(dest, "model.safetensors"))
    return dest


def linear_config(*models: str, extra: str = "") -> str:
    entries = "".join(f"  - model: {m}\n    parameters: {{weight: 1.0}}\n" for m in models)
    return f"merge_method: linear\nmodels:\n{entries}{extra}"


def expect_user_error(capsys, text: str, *needles: str, line: int | None = None) -> str:
    folder = scratch("err")
    config = write(folder, "config.yaml", text)
    out = os.path.join(folder, "out")
    before = sorted(os.listdir(folder))
    assert run_cli("merge", config, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("fusion-engine: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    if line is not None:
        assert f"config.yaml line {line}:" in err, err
    assert sorted(os.listdir(folder)) == before, "the failed merge left something behind"
    return err


def test_missing_model_dir(capsys):
    m = tiny_llamas()
    expect_user_error(capsys, linear_config(m["model_0"], "/no/such/model"), "'/no/such/model'",
                      "no such file or directory", line=5)


def test_hub_id_needs_a_local_path(capsys):
    m = tiny_llamas()
    expect_user_error(capsys, linear_config(m["model_0"], "mistralai/Mistral-7B-v0.1"), "no network",
                      "give a local path", line=5)


def test_missing_tensor(capsys):
    m = tiny_llamas()

    def drop(path):
        tensors = load_file(path)
        del tensors["model.layers.1.self_attn.k_proj.weight"]
        save_file(tensors, path, metadata={"format": "pt"})

    broken = broken_copy(m["model_1"], drop)
    expect_user_error(capsys, linear_config(m["model_0"], broken), "model.layers.1.self_attn.k_proj.weight",
                      broken, line=5)


def test_shape_mismatch(capsys):
    m = tiny_llamas()

    def widen(path):
        tensors = load_file(path)
        tensors["model.norm.weight"] = torch.ones(65)
        save_file(tensors, path, metadata={"format": "pt"})

    broken = broken_copy(m["model_1"], widen)
    expect_user_error(capsys, linear_config(m["model_0"], broken), "model.norm.weight", "(65,)", "(64,)", line=5)


def test_unknown_method(capsys):
    m = tiny_llamas()
    text = linear_config(m["model_0"]).replace("merge_method: linear", "merge_method: dare-ties")
    expect_user_error(capsys, text, "unknown merge_method 'dare-ties'", "did you mean 'dare_ties'", line=1)


def test_parameter_out_of_range(capsys):
    m = tiny_llamas()
    text = (f"merge_method: ties\nbase_model: {m['base']}\nmodels:\n  - model: {m['model_0']}\n"
            f"    parameters:\n      weight: 1.0\n      density: [0.2, 1.7]\n")
    # the gradient leaves [0, 1] first at layer 2 (t = 2/3): 0.2 + 1.5 * 2/3 = 1.2
    expect_user_error(capsys, text, "density", "1.2", "model.layers.2.", m["model_0"], line=7)


def test_truncated_safetensors(capsys):
    m = tiny_llamas()

    def truncate(path):
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)

    broken = broken_copy(m["model_1"], truncate)
    expect_user_error(capsys, linear_config(m["model_0"], broken), broken, line=5)


def test_corrupted_safetensors_header(capsys):
    m = tiny_llamas()

    def corrupt(path):
        with open(path, "r+b") as f:
            f.seek(8)
            f.write(b"\x00garbage{{{" * 4)

    broken = broken_copy(m["model_1"], corrupt)
    expect_user_error(capsys, linear_config(m["model_0"], broken), broken, line=5)


def test_not_a_safetensors_file(capsys):
    m = tiny_llamas()
    broken = broken_copy(m["model_1"], lambda path: open(path, "wb").write(b"\x01\x02"))
    expect_user_error(capsys, linear_config(m["model_0"], broken), broken, line=5)


def test_yaml_syntax_error(capsys):
    expect_user_error(capsys, "merge_method: linear\nmodels:\n  - model: [a\n", "not valid YAML")


def test_out_dir_exists(capsys):
    m = tiny_llamas()
    folder = scratch("exists")
    config = write(folder, "config.yaml", linear_config(m["model_0"]))
    out = os.path.join(folder, "out")
    os.makedirs(out)
    write(out, "keep.txt", "precious")
    assert run_cli("merge", config, out) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--allow-overwrite" in err
    assert os.listdir(out) == ["keep.txt"] and sorted(os.listdir(folder)) == ["config.yaml", "out"]


def test_output_inside_an_input_is_refused(capsys):
    m = tiny_llamas()
    folder = scratch("inside")
    model = os.path.join(folder, "model")
    shutil.copytree(m["model_0"], model)
    config = write(folder, "config.yaml", linear_config(model))
    assert run_cli("merge", config, folder, "--allow-overwrite") == 2
    assert "input model" in capsys.readouterr().err
    assert sorted(os.listdir(model)) == sorted(os.listdir(m["model_0"]))


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        run_cli("merge", "only_one_argument")
    assert info.value.code == 2
    m = tiny_llamas()
    folder = scratch("args")
    config = write(folder, "config.yaml", linear_config(m["model_0"]))
    assert run_cli("merge", config, os.path.join(folder, "o"), "--out-shard-size", "lots") == 2
    assert "shard size" in capsys.readouterr().err
    assert run_cli("merge", config, os.path.join(folder, "o"), "--device", "tpu") == 2
    assert run_cli("merge", os.path.join(folder, "nope.yaml"), os.path.join(folder, "o")) == 2
    assert "no such config file" in capsys.readouterr().err
    assert sorted(os.listdir(folder)) == ["config.yaml"]


def test_other_failures_exit_1_and_leave_nothing(capsys, monkeypatch):
    from fusion_engine.checkpoint import executor

    m = tiny_llamas()
    folder = scratch("fail")
    config = write(folder, "config.yaml", linear_config(m["model_0"], m["model_1"]))
    calls = []

    def exploding_merge(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated failure in the middle of the merge")
        return original(*args, **kwargs)

    original = executor.merge_bound  # the executor merges planned tasks with their bound parameters
    monkeypatch.setattr(executor, "merge_bound", exploding_merge)
    assert run_cli("merge", config, os.path.join(folder, "out"), "--quiet") == 1
    err = capsys.readouterr().err
    assert "simulated failure" in err and "Traceback" not in err
    assert sorted(os.listdir(folder)) == ["config.yaml"], "a failed merge must not leave a partial output"


def test_subprocess_exit_code_and_stderr():
    m = tiny_llamas()
    folder = scratch("sub")
    config = write(folder, "config.yaml", linear_config(m["model_0"], "/no/such/model"))
    result = run_cli_subprocess("merge", config, os.path.join(folder, "out"))
    assert result.returncode == 2 and "no such file or directory" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""
