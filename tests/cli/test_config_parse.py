"""Parsing mergekit YAML: the schema, line-numbered errors, gradients and filters (mergekit is the oracle)."""

from __future__ import annotations

import pytest
import torch
import yaml

from fusion_engine.checkpoint.config import Conditional, load_config, parse_config
from fusion_engine.checkpoint.planner import evaluate, interpolate, resolve
from fusion_engine.errors import ConfigError

FULL = """\
merge_method: ties
base_model: /models/base
models:
  - model: /models/a
    parameters:
      weight: [0.2, 0.5, 1.0]
      density:
        - filter: mlp
          value: 0.3
        - filter: self_attn
          value: [0.1, 0.9]
        - value: 0.5
  - /models/b
parameters:
  normalize: true
  weight: 0.7
dtype: bf16
out_dtype: torch.float16
tokenizer_source: base
"""


def test_full_schema_parses_with_lines():
    cfg = parse_config(FULL)
    assert cfg.merge_method == "ties" and cfg.base_model == "/models/base"
    assert [m.model for m in cfg.models] == ["/models/a", "/models/b"] and cfg.slices is None
    a = cfg.models[0]
    assert a.line == 4 and a.parameters["weight"].value == [0.2, 0.5, 1.0] and a.parameters["weight"].line == 6
    density = a.parameters["density"].value
    assert [c.filter for c in density] == ["mlp", "self_attn", None] and [c.line for c in density] == [8, 10, 12]
    assert cfg.models[1].parameters == {} and cfg.models[1].line == 13
    assert cfg.parameters["normalize"].value is True and cfg.parameters["weight"].value == 0.7
    assert cfg.dtype == torch.bfloat16 and cfg.out_dtype == torch.float16 and cfg.tokenizer_source == "base"
    assert cfg.referenced_models() == ["/models/base", "/models/a", "/models/b"]
    assert cfg.model_line("/models/b") == 13 and cfg.line_of("dtype") == 17


def test_slices_schema():
    cfg = parse_config("""\
merge_method: passthrough
slices:
  - sources:
      - model: /m/a
        layer_range: [0, 3]
  - sources:
      - model: /m/b
        layer_range: [1, 4]
        parameters: {scale: 0.5}
    parameters:
      scale: [1.0, 2.0]
""")
    assert cfg.models is None and len(cfg.slices) == 2
    assert cfg.slices[0].sources[0].layer_range == (0, 3) and cfg.slices[1].sources[0].layer_range == (1, 4)
    assert cfg.slices[1].sources[0].parameters["scale"].value == 0.5
    assert cfg.slices[1].parameters["scale"].value == [1.0, 2.0] and cfg.slices[1].line == 6


def test_model_long_form_and_load_config(tmp_path):
    path = tmp_path / "merge.yml"
    path.write_text("merge_method: linear\nmodels:\n  - model:\n      model:\n        path: /m/a\n"
                    "    parameters: {weight: 1}\n")
    cfg = load_config(path)
    assert cfg.models[0].model == "/m/a" and cfg.filename == "merge.yml" and cfg.base_dir == str(tmp_path)


# ----------------------------------------------------------------------------------------------- errors

BAD = [
    ("", None, "empty"),
    ("merge_method: ties\nmodels:\n  - model: /a\n    parametrs: {weight: 1}\n", 4, "did you mean 'parameters'"),
    ("merge_method: ties\nmodels: []\n", 2, "'models' is empty"),
    ("merge_method: ties\nmodels:\n  - /a\nslices:\n  - sources: []\n", 4, "exactly one of"),
    ("models:\n  - /a\n", 1, "no 'merge_method'"),
    ("merge_method: ties\nmodels:\n  - model: /a\n   parameters: {}\n", 4, "not valid YAML"),
    ("merge_method: ties\nmerge_method: linear\nmodels: [/a]\n", 2, "appears twice"),
    ("merge_method: ties\nmodels: [/a]\ndtype: int8\n", 3, "not a floating dtype"),
    ("merge_method: ties\nmodels: [/a]\nmodules: {}\n", 3, "not supported"),
    ("merge_method: ties\nmodels: [/a]\ntokenizer:\n  pad_to_multiple_of: 0\n", 4, "pad_to_multiple_of"),
    ("merge_method: ties\nmodels: [/a]\ntokenizer:\n  tokens:\n    x:\n      source: {kind: model_token, "
     "model: /a}\n", 6, "exactly one of token and token_id"),
    ("merge_method: ties\nmodels: [/a]\ntokenizer_source: base\ntokenizer: {source: union}\n", 4, "both"),
    ("merge_method: ties\nmodels:\n  - model: /a\n    parameters:\n      weight:\n", 5, "has no value"),
    ("merge_method: ties\nmodels:\n  - model: /a\n    parameters:\n      weight: []\n", 5, "empty list"),
    ("merge_method: ties\nmodels:\n  - model: /a\n    parameters:\n      weight: [[1, 2]]\n", 5, "flat list"),
    ("merge_method: ties\nmodels:\n  - model: /a\n    parameters:\n      weight:\n        - 1\n"
     "        - filter: mlp\n          value: 2\n", 6, "mixes filter entries"),
    ("merge_method: ties\nmodels:\n  - model: /a\n    parameters:\n      weight:\n        - filter: mlp\n", 6,
     "has no 'value'"),
    ("merge_method: ties\nmodels:\n  - model: /a\n    parameters:\n      weight:\n        - filter: ''\n"
     "          value: 1\n", 6, "filter"),
    ("merge_method: passthrough\nslices:\n  - sources:\n      - model: /a\n        layer_range: [3, 1]\n", 5,
     "empty or negative"),
    ("merge_method: passthrough\nslices:\n  - sources:\n      - model: /a\n        layer_range: [0, 1.5]\n", 5,
     "two integers"),
    ("merge_method: passthrough\nslices:\n  - sources:\n      - model: /a\n", 4, "no 'layer_range'"),
    ("merge_method: linear\nslices:\n  - sources:\n      - model: /a\n        layer_range: [0, 2]\n"
     "      - model: /b\n        layer_range: [0, 3]\n", 3, "different numbers of layers"),
    ("merge_method: ties\nmodels:\n  - model:\n      path: org/x\n      revision: main\n", 5, "revisions"),
    ("merge_method: ties\nmodels:\n  - model: /a+/lora\n    parameters: {weight: 1}\n  - model: {lora: /l}\n",
     5, "has a 'lora' but no 'model'"),
    ("merge_method: 3\nmodels: [/a]\n", 1, "non-empty string"),
    ("- a\n- b\n", 1, "must be a mapping"),
]


@pytest.mark.parametrize("text,line,needle", BAD, ids=[b[2] for b in BAD])
def test_errors_name_the_line_and_the_fix(text, line, needle):
    with pytest.raises(ConfigError) as info:
        parse_config(text, filename="cfg.yaml")
    msg = str(info.value)
    assert needle in msg
    assert msg.startswith(f"cfg.yaml line {line}:" if line else "cfg.yaml:"), msg


def test_lora_references_in_both_spellings():
    cfg = parse_config("merge_method: linear\nbase_model: {model: /b, lora: /l}\nmodels:\n  - model: /a+/lora\n"
                       "  - model: {model: {path: /c}, lora: {path: /m}}\n")
    assert cfg.base_model == "/b+/l" and [m.model for m in cfg.models] == ["/a+/lora", "/c+/m"]


def test_tokenizer_block_and_chat_template():
    cfg = parse_config("merge_method: linear\nmodels: [/a, /b]\nchat_template: chatml\ntokenizer:\n  source: model:/b\n"
                       "  pad_to_multiple_of: 8\n  tokens:\n    <x>: {source: /a, force: true}\n"
                       "    <y>: {source: {kind: zero}}\n    <z>: {source: {kind: model_token, model: /b, token_id: 3}}\n")
    assert cfg.chat_template == "chatml" and cfg.tokenizer.source == "/b" and cfg.tokenizer.pad_to_multiple_of == 8
    tokens = cfg.tokenizer.tokens
    assert (tokens["<x>"].source.kind, tokens["<x>"].source.model, tokens["<x>"].force) == ("model", "/a", True)
    assert tokens["<y>"].source.kind == "zero" and tokens["<z>"].source.token_id == 3
    assert parse_config("merge_method: linear\nmodels: [/a]\ntokenizer_source: union\n").tokenizer_source == "union"


def test_errors_carry_a_fix():
    with pytest.raises(ConfigError, match=r"fix: did you mean 'parameters'"):
        parse_config("merge_method: ties\nmodels:\n  - model: /a\n    paramters: {}\n")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------- gradients and filters


def _mergekit_eval(setting_yaml: str, tensor_name: str, t: float):
    from mergekit.config import InputModelDefinition, evaluate_setting

    setting = InputModelDefinition.model_validate(
        {"model": "x", "parameters": {"p": yaml.safe_load(setting_yaml)}}).parameters["p"]
    return evaluate_setting(tensor_name, setting, t, validate=lambda v: v)


SETTINGS = [
    "0.5",
    "[0.2, 0.8]",
    "[0.0, 1.0, 0.25, 0.5]",
    "[1, 3, 10]",
    "[true, false, true]",
    "[0.7]",
    "[{filter: mlp, value: 0.3}, {filter: self_attn, value: [0.1, 0.9]}, {value: [1.0, 0.0, 0.5]}]",
    "[{filter: '*', value: 2.0}]",
    "{filter: up_proj, value: 0.4}",
    "[{filter: q_proj, value: [0.0, 1.0]}]",
]
NAMES = ["model.layers.0.mlp.up_proj.weight", "model.layers.3.self_attn.q_proj.weight", "model.norm.weight"]


@pytest.mark.parametrize("setting_yaml", SETTINGS)
def test_gradients_and_filters_match_mergekit(setting_yaml):
    cfg = parse_config(f"merge_method: x\nmodels:\n  - model: /a\n    parameters:\n      p: {setting_yaml}\n")
    setting = cfg.models[0].parameters["p"]
    for name in NAMES:
        for t in (0.0, 0.1, 1 / 3, 0.5, 2 / 3, 0.9, 1.0):
            expected = _mergekit_eval(setting_yaml, name, t)
            found, value, _ = evaluate(setting, name, t)
            assert found == (expected is not None), (name, t)
            if found:
                assert value == pytest.approx(expected, abs=1e-12), (setting_yaml, name, t)


def test_interpolate_formula():
    assert interpolate([0.0, 1.0], 0.25) == pytest.approx(0.25)
    assert interpolate([0.0, 1.0, 0.0], 0.75) == pytest.approx(0.5)
    assert interpolate([2.0, 4.0], 1.0) == 4.0
    assert interpolate(["a", "b", "c"], 0.6) == "b"


def test_resolve_most_specific_level_first():
    cfg = parse_config("""\
merge_method: x
models:
  - model: /a
    parameters:
      weight:
        - filter: mlp
          value: 0.9
parameters:
  weight: 0.1
  density: [0.0, 1.0]
""")
    levels = [cfg.models[0].parameters, cfg.parameters]
    assert resolve("weight", levels, "model.layers.0.mlp.up_proj.weight", 0.0)[:2] == (True, 0.9)
    # the model-level filter does not match: the global value applies
    found, value, line = resolve("weight", levels, "model.norm.weight", 0.0)
    assert (found, value, line) == (True, 0.1, 9)
    assert resolve("density", levels, "x", 0.5)[1] == pytest.approx(0.5)
    assert resolve("lambda", levels, "x", 0.5) == (False, None, None)
    assert isinstance(cfg.models[0].parameters["weight"].value[0], Conditional)
