"""Planning a config against real (tiny) checkpoints: layout, slices, parameter resolution, validation."""

from __future__ import annotations

import os

import pytest

from cli_fixtures import scratch, tiny_llamas, write
from fusion_engine.checkpoint.config import load_config, parse_config
from fusion_engine.checkpoint.planner import build_plan, layout_of, plan_summary
from fusion_engine.errors import CheckpointError, ConfigError, MissingTensorError, ShapeMismatchError

SUFFIXES = ["input_layernorm.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
            "post_attention_layernorm.weight", "self_attn.k_proj.weight", "self_attn.o_proj.weight",
            "self_attn.q_proj.weight", "self_attn.v_proj.weight"]


def plan_of(text: str):
    folder = scratch("plan")
    return build_plan(load_config(write(folder, "config.yaml", text)))


def test_layout_sorts_pre_layers_post():
    names = ["lm_head.weight", "model.embed_tokens.weight", "model.layers.1.mlp.w", "model.layers.0.mlp.w",
             "model.layers.10.attn.q", "model.norm.weight", "transformer.h.0.attn.c_attn.weight"]
    layout = layout_of(names, num_layers_hint=11)
    assert layout.layer_prefix == "model.layers." and layout.num_layers == 11
    assert layout.layers[0] == ["mlp.w"] and layout.layers[10] == ["attn.q"] and layout.layers[5] == []
    assert layout.pre[0] == "model.embed_tokens.weight"
    assert layout.post == ["model.norm.weight", "lm_head.weight"]  # the head last, as mergekit writes it
    assert "transformer.h.0.attn.c_attn.weight" in layout.pre + layout.post  # a second stack: tensor by tensor


def test_models_plan_order_base_appended_and_gradients():
    m = tiny_llamas()
    plan = plan_of(f"""\
merge_method: ties
base_model: {m['base']}
models:
  - model: {m['model_0']}
    parameters:
      weight: 1.0
      density: [0.2, 0.8]
  - model: {m['model_1']}
    parameters:
      weight:
        - filter: mlp
          value: 0.3
        - value: 0.6
      density: 0.5
parameters:
  normalize: false
  lambda: [1.0, 2.0]
""")
    names = [t.out_name for t in plan.tasks]
    assert names[0] == "model.embed_tokens.weight" and names[-2:] == ["model.norm.weight", "lm_head.weight"]
    assert names[1:-2] == [f"model.layers.{i}.{s}" for i in range(4) for s in SUFFIXES]
    by_name = {t.out_name: t for t in plan.tasks}
    task = by_name["model.layers.1.mlp.up_proj.weight"]
    assert [r.model for r in task.inputs] == [m["model_0"], m["model_1"], m["base"]] and task.base_index == 2
    assert all(r.name == "model.layers.1.mlp.up_proj.weight" for r in task.inputs)
    # t = 1/3 at layer 1 of 4; per-input lists aligned with the inputs, None in the base's slot
    d = task.parameters["density"]
    assert d[0] == pytest.approx(0.4) and d[1] == 0.5 and d[2] is None
    assert task.parameters["weight"] == [1.0, 0.3, None]
    assert task.parameters["lambda"] == pytest.approx(1 + 1 / 3) and task.parameters["normalize"] is False
    assert by_name["model.layers.1.self_attn.q_proj.weight"].parameters["weight"] == [1.0, 0.6, None]
    assert by_name["model.layers.3.input_layernorm.weight"].parameters["density"][0] == pytest.approx(0.8)
    # pre and post tensors sit at t = 0
    assert by_name["lm_head.weight"].parameters["density"][0] == pytest.approx(0.2)
    assert by_name["model.embed_tokens.weight"].parameters["lambda"] == pytest.approx(1.0)
    assert task.shape == (128, 64) and plan.config_json["num_hidden_layers"] == 4
    assert set(plan.models) == {m["base"], m["model_0"], m["model_1"]}
    assert {"tokenizer.json", "tokenizer_config.json", "mergekit_config.yml"} <= set(plan.extra_files)
    summary = plan_summary(plan)
    assert "39 tensors" in summary and "ties" in summary


def test_slices_frankenmerge_renumbers_layers_and_updates_config():
    m = tiny_llamas()
    plan = plan_of(f"""\
merge_method: passthrough
slices:
  - sources:
      - model: {m['model_0']}
        layer_range: [0, 3]
  - sources:
      - model: {m['model_1']}
        layer_range: [1, 4]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
dtype: float32
out_dtype: bfloat16
""")
    by_name = {t.out_name: t for t in plan.tasks}
    assert len(plan.tasks) == 6 * 9 + 3
    first = by_name["model.layers.2.mlp.up_proj.weight"]
    assert first.inputs[0].model == m["model_0"] and first.inputs[0].name == "model.layers.2.mlp.up_proj.weight"
    second = by_name["model.layers.3.self_attn.o_proj.weight"]  # output layer 3 = layer 1 of model_1
    assert second.inputs[0].model == m["model_1"] and second.inputs[0].name == "model.layers.1.self_attn.o_proj.weight"
    assert second.parameters == {"scale": [0.5]} and "scale" not in by_name["model.layers.3.mlp.up_proj.weight"].parameters
    assert by_name["model.embed_tokens.weight"].inputs[0].model == m["model_0"]  # pre: first slice
    assert by_name["lm_head.weight"].inputs[0].model == m["model_1"]  # post: last slice
    assert plan.config_json["num_hidden_layers"] == 6 and plan.config_json["dtype"] == "bfloat16"
    assert all(t.method == "passthrough" and t.base_index is None for t in plan.tasks)


def test_slice_parameter_precedence_source_over_slice_over_global():
    m = tiny_llamas()
    plan = plan_of(f"""\
merge_method: linear
slices:
  - sources:
      - model: {m['model_0']}
        layer_range: [0, 2]
        parameters: {{weight: 3.0}}
      - model: {m['model_1']}
        layer_range: [2, 4]
    parameters:
      weight: [1.0, 2.0]
  - sources:
      - model: {m['model_0']}
        layer_range: [2, 4]
      - model: {m['model_1']}
        layer_range: [0, 2]
parameters:
  weight: 0.25
  normalize: false
""")
    by_name = {t.out_name: t for t in plan.tasks}
    l0, l1 = by_name["model.layers.0.mlp.up_proj.weight"], by_name["model.layers.1.mlp.up_proj.weight"]
    assert l0.parameters["weight"] == [3.0, 1.0] and l1.parameters["weight"] == [3.0, 2.0]
    assert l1.inputs[1].name == "model.layers.3.mlp.up_proj.weight"
    l3 = by_name["model.layers.3.mlp.up_proj.weight"]
    assert l3.parameters["weight"] == [0.25, 0.25] and l3.inputs[0].name == "model.layers.3.mlp.up_proj.weight"
    assert l3.inputs[1].name == "model.layers.1.mlp.up_proj.weight"
    assert l3.parameters["normalize"] is False


def test_tied_embeddings_feed_the_head():
    tied = tiny_llamas(tie=True)
    untied = tiny_llamas()
    plan = plan_of(f"""\
merge_method: linear
models:
  - model: {tied['model_0']}
    parameters: {{weight: 1.0}}
  - model: {untied['model_0']}
    parameters: {{weight: 1.0}}
""")
    head = {t.out_name: t for t in plan.tasks}["lm_head.weight"]
    assert [(r.model, r.name) for r in head.inputs] == [(tied["model_0"], "model.embed_tokens.weight"),
                                                        (untied["model_0"], "lm_head.weight")]
    plan = plan_of(f"merge_method: linear\nmodels:\n  - model: {tied['model_0']}\n    parameters: {{weight: 1.0}}\n")
    assert "lm_head.weight" not in [t.out_name for t in plan.tasks]


# --------------------------------------------------------------------------------------- validation


def _error(text: str, kind=ConfigError):
    with pytest.raises(kind) as info:
        plan_of(text)
    return str(info.value)


def test_unknown_method_suggests():
    m = tiny_llamas()
    msg = _error(f"merge_method: tie\nbase_model: {m['base']}\nmodels:\n  - {m['model_0']}\n")
    assert msg.startswith("config.yaml line 1: unknown merge_method 'tie'") and "did you mean 'ties'" in msg


def test_unknown_parameter_names_its_line():
    m = tiny_llamas()
    msg = _error(f"merge_method: ties\nbase_model: {m['base']}\nmodels:\n  - model: {m['model_0']}\n"
                 f"    parameters: {{weight: 1, desnity: 0.5}}\n")
    assert msg.startswith("config.yaml line 5:") and "'desnity'" in msg and "did you mean 'density'" in msg


def test_parameter_out_of_range_names_its_line():
    m = tiny_llamas()
    msg = _error(f"merge_method: ties\nbase_model: {m['base']}\nmodels:\n  - model: {m['model_0']}\n"
                 f"    parameters:\n      weight: 1\n      density: [0.5, 1.5]\n")
    assert msg.startswith("config.yaml line 7:") and "density" in msg


def test_required_parameter_missing():
    m = tiny_llamas()
    msg = _error(f"merge_method: ties\nbase_model: {m['base']}\nmodels:\n  - model: {m['model_0']}\n")
    assert msg.startswith("config.yaml line 4:") and "needs parameter 'weight'" in msg


def test_method_contract_violations():
    m = tiny_llamas()
    msg = _error(f"merge_method: ties\nmodels:\n  - model: {m['model_0']}\n    parameters: {{weight: 1}}\n")
    assert "base" in msg and msg.startswith("config.yaml line")
    msg = _error(f"merge_method: slerp\nbase_model: {m['base']}\nmodels:\n  - {m['model_0']}\n  - {m['model_1']}\n"
                 f"parameters: {{t: 0.5}}\n")
    assert "2" in msg and "inputs" in msg
    msg = _error(f"merge_method: ties\nbase_model: {m['base']}\nslices:\n  - sources:\n      - model: {m['model_0']}\n"
                 f"        layer_range: [0, 4]\n        parameters: {{weight: 1}}\n")
    assert msg.startswith("config.yaml line 4:") and "not among this slice's sources" in msg


def test_layer_range_past_the_end():
    m = tiny_llamas()
    msg = _error(f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {m['model_0']}\n"
                 f"        layer_range: [2, 9]\n")
    assert msg.startswith("config.yaml line 4:") and "it has 4 layers" in msg


def test_models_must_exist_locally():
    msg = _error("merge_method: linear\nmodels:\n  - model: meta-llama/Llama-3-8B\n    parameters: {weight: 1}\n",
                 CheckpointError)
    assert msg.startswith("config.yaml line 3:") and "no network" in msg and "local path" in msg
    msg = _error("merge_method: linear\nmodels:\n  - model: ./no/such/dir\n    parameters: {weight: 1}\n",
                 CheckpointError)
    assert "no such file or directory" in msg


def test_shape_and_depth_mismatches():
    small = tiny_llamas(hidden=32)
    deep = tiny_llamas(num_layers=2)
    m = tiny_llamas()
    msg = _error(f"merge_method: linear\nmodels:\n  - model: {m['model_0']}\n    parameters: {{weight: 1}}\n"
                 f"  - model: {small['model_0']}\n    parameters: {{weight: 1}}\n", ShapeMismatchError)
    assert msg.startswith("config.yaml line 5:") and "model.embed_tokens.weight" in msg and "(128, 32)" in msg
    msg = _error(f"merge_method: linear\nmodels:\n  - model: {m['model_0']}\n    parameters: {{weight: 1}}\n"
                 f"  - model: {deep['model_0']}\n    parameters: {{weight: 1}}\n", ShapeMismatchError)
    assert "different numbers of layers" in msg


def test_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    m = tiny_llamas()
    broken = scratch("missing")
    for name in os.listdir(m["model_1"]):
        if name != "model.safetensors":
            os.link(os.path.join(m["model_1"], name), os.path.join(broken, name))
    tensors = load_file(os.path.join(m["model_1"], "model.safetensors"))
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, os.path.join(broken, "model.safetensors"), metadata={"format": "pt"})
    msg = _error(f"merge_method: linear\nmodels:\n  - model: {m['model_0']}\n    parameters: {{weight: 1}}\n"
                 f"  - model: {broken}\n    parameters: {{weight: 1}}\n", MissingTensorError)
    assert msg.startswith("config.yaml line 5:") and "model.layers.2.mlp.up_proj.weight" in msg


def test_parse_only_config_plans_without_file():
    m = tiny_llamas()
    plan = build_plan(parse_config(f"merge_method: linear\nmodels:\n  - model: {m['model_0']}\n"
                                   f"    parameters: {{weight: 1}}\n"))
    assert "mergekit_config.yml" not in plan.extra_files and len(plan.tasks) == 39
