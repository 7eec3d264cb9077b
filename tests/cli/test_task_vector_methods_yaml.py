"""The 2024–26 task-vector methods and LiNeS from merge YAML, end to end on tiny Llamas: every
output tensor equals ``merge_tensors`` on the checkpoints' tensors; ``lines:`` equals
:func:`lines_state_dict`; bad settings are ConfigErrors naming the key."""

from __future__ import annotations

import os

import pytest
import torch

import fusion_engine as fe
from fusion_engine.errors import ConfigError
from fusion_engine.checkpoint.lines import lines_state_dict
from fusion_engine.methods.lines import lines_scale

from cli_fixtures import load_dir, run_cli, scratch, tiny_llamas, write

METHODS = {
    "tsv": {"lambda": 0.8},
    "iso_c": {"lambda": 1.1},
    "iso_cts": {"common_space_fraction": 0.5},
    "magmax": {"lambda": 0.7},
    "consensus": {"k": 2, "tall_lambda": 0.4},
    "pcb": {"ratio": 0.2},
    "wudi": {"iterations": 5, "lr": 1.0e-4},
}


def config_text(m: dict, method: str, params: dict | str, extra: str = "") -> str:
    models = "".join(f"  - model: {m[k]}\n" for k in ("model_0", "model_1", "model_2"))
    if isinstance(params, dict):
        params = ", ".join(f"{k}: {v!r}" for k, v in params.items())
    return (f"merge_method: {method}\nbase_model: {m['base']}\nmodels:\n{models}"
            f"parameters: {{{params}}}\n{extra}")


def merge(text: str, name: str) -> dict[str, torch.Tensor]:
    folder = scratch(name)
    out = os.path.join(folder, "out")
    assert run_cli("merge", write(folder, "config.yaml", text), out, "--quiet") == 0
    return load_dir(out)


def api_merge(m: dict, method: str, parameters: dict) -> dict[str, torch.Tensor]:
    sds = {k: load_dir(m[k]) for k in ("base", "model_0", "model_1", "model_2")}
    return fe.merge_state_dicts(sds, method, parameters=parameters, base="base")


@pytest.mark.parametrize("method", list(METHODS))
def test_yaml_merge_equals_merge_tensors(method):
    m = tiny_llamas()
    got = merge(config_text(m, method, METHODS[method]), method)
    expected = api_merge(m, method, METHODS[method])
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_lines_scales_each_layer_of_the_merged_task_vector():
    m = tiny_llamas()
    text = config_text(m, "tsv", {"lambda": 1.0}, "lines: {alpha: 0.2, beta: 0.6}\n")
    got = merge(text, "lines")
    base = load_dir(m["base"])
    expected = lines_state_dict(base, api_merge(m, "tsv", {"lambda": 1.0}), alpha=0.2, beta=0.6)
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)
    # 4 layers: factors 0.2, 0.4, 0.6, 0.8; embeddings, final norm and head get α
    for layer, scale in enumerate((0.2, 0.4, 0.6, 0.8)):
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        plain = api_merge(m, "tsv", {"lambda": 1.0})[name]
        torch.testing.assert_close(got[name] - base[name], scale * (plain - base[name]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["model.norm.weight"] - base["model.norm.weight"],
                               0.2 * (api_merge(m, "tsv", {})["model.norm.weight"] - base["model.norm.weight"]),
                               rtol=1e-5, atol=1e-7)


def test_dry_run_shows_the_lines_range(capsys):
    m = tiny_llamas()
    folder = scratch("lines_dry")
    text = config_text(m, "ties", {"density": 0.5, "weight": 1.0}, "lines: {alpha: 0.2, beta: 0.6}\n")
    assert run_cli("merge", write(folder, "c.yaml", text), os.path.join(folder, "out"), "--dry-run") == 0
    assert "LiNeS: task vectors scaled by 0.2 … 0.8" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(folder, "out"))


def test_lines_scale_and_helper():
    assert lines_scale(0, 4, 0.3, 0.6) == 0.3 and lines_scale(3, 4, 0.3, 0.6) == pytest.approx(0.9)
    assert lines_scale(None, 4, 0.3, 0.6) == 0.3 and lines_scale(0, 1, 0.3, 0.6) == 0.3
    base = {"model.layers.0.w": torch.zeros(2), "model.layers.1.w": torch.zeros(2), "head": torch.zeros(2),
            "steps": torch.tensor([3])}
    merged = {"model.layers.0.w": torch.ones(2), "model.layers.1.w": torch.ones(2), "head": torch.ones(2),
              "steps": torch.tensor([3])}
    out = lines_state_dict(base, merged, alpha=0.5, beta=0.25)
    assert out["model.layers.0.w"].tolist() == [0.5, 0.5] and out["model.layers.1.w"].tolist() == [0.75, 0.75]
    assert out["head"].tolist() == [0.5, 0.5] and out["steps"].tolist() == [3]
    with pytest.raises(ConfigError, match="lines.beta"):
        lines_state_dict(base, merged, alpha=0.5, beta=float("nan"))


@pytest.mark.parametrize("extra,match", [
    ("lines: {alpha: 0.3}\n", "beta"),
    ("lines: {alpha: x, beta: 0.5}\n", "lines.alpha"),
    ("lines: {alpha: 0.3, beta: 0.5, gamma: 1}\n", "gamma"),
    ("lines: 0.5\n", "lines"),
])
def test_bad_lines_settings(extra, match, capsys):
    m = tiny_llamas()
    folder = scratch("bad_lines")
    assert run_cli("merge", write(folder, "c.yaml", config_text(m, "tsv", "lambda: 1.0", extra)),
                   os.path.join(folder, "out"), "--quiet") != 0
    assert match in capsys.readouterr().err


def test_lines_needs_a_base(capsys):
    m = tiny_llamas()
    text = (f"merge_method: linear\nmodels:\n  - model: {m['model_0']}\n    parameters: {{weight: 1.0}}\n"
            f"  - model: {m['model_1']}\n    parameters: {{weight: 1.0}}\nlines: {{alpha: 0.3, beta: 0.5}}\n")
    folder = scratch("lines_base")
    assert run_cli("merge", write(folder, "c.yaml", text), os.path.join(folder, "out"), "--quiet") != 0
    err = capsys.readouterr().err
    assert "lines" in err and "base" in err


@pytest.mark.parametrize("params,match", [("ratio: 0", "ratio"), ("k: -2", "'k'|k ="), ("tall_lambda: -1", "tall_lambda")])
def test_bad_parameters_name_the_parameter(params, match, capsys):
    m = tiny_llamas()
    method = "pcb" if "ratio" in params else "consensus"
    folder = scratch("bad_param")
    assert run_cli("merge", write(folder, "c.yaml", config_text(m, method, params)),
                   os.path.join(folder, "out"), "--quiet") != 0
    import re

    assert re.search(match, capsys.readouterr().err)
