"""Reliability of ``fusion-engine merge`` (issue 15): no silent wrong merge, no lost or replaced folder, no
hang, exit 2 with the file named for every bad input; one regression test per class of input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusion_engine import merge_tensors
from fusion_engine.checkpoint.planner import ties_word_embeddings
from fusion_engine.errors import ConfigError

from cli_fixtures import load_dir, run_cli, scratch, time_bound, tiny_llamas, tree, write


def merge_expecting_error(capsys, config_text: str, *needles: str, config_name: str = "config.yaml",
                          extra_args: tuple = ()) -> str:
    folder = scratch("rel")
    config = write(folder, config_name, config_text)
    out = os.path.join(folder, "out")
    with time_bound(60):
        assert run_cli("merge", config, out, *extra_args) == 2
    err = capsys.readouterr().err
    assert err.startswith("fusion-engine: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    assert os.listdir(folder) == [config_name], "the failed merge left something behind"
    return err


def model_copy(src: str, edit=None) -> str:
    dest = os.path.join(scratch("model"), "m")
    shutil.copytree(src, dest)
    if edit is not None:
        edit(dest)
    return dest


def without_head(folder: str) -> None:
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    del tensors["lm_head.weight"]
    save_file(tensors, path, metadata={"format": "pt"})


def set_config(folder: str, **changes) -> None:
    import json

    path = os.path.join(folder, "config.json")
    with open(path) as fh:
        cfg = json.load(fh)
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    with open(path, "w") as fh:
        json.dump(cfg, fh)


def linear(*models: str, extra: str = "") -> str:
    return "merge_method: linear\nmodels:\n" + "".join(f"  - model: {m}\n    parameters: {{weight: 1.0}}\n"
                                                      for m in models) + extra


# ------------------------------------------------------------------------------------------ 1. tied heads


@pytest.mark.parametrize("config, tied", [
    ({"tie_word_embeddings": True, "model_type": "llama"}, True),
    ({"tie_word_embeddings": False, "model_type": "gpt2"}, False),
    ({"model_type": "gpt2"}, True),  # the architecture's default
    ({"model_type": "llama"}, False),
    ({"model_type": "gemma3", "text_config": {"tie_word_embeddings": False}}, False),
    ({"model_type": "no_such_architecture"}, False),
    ({}, False), (None, False),
])
def test_tie_word_embeddings_is_read_per_model(config, tied):
    assert ties_word_embeddings(config) is tied


@pytest.mark.parametrize("tie_setting", [False, None])  # false, or absent (Llama's default is untied)
def test_an_untied_model_without_its_head_is_an_error_not_its_embedding(capsys, tie_setting):
    m = tiny_llamas()
    headless = model_copy(m["model_0"], without_head)
    set_config(headless, tie_word_embeddings=tie_setting)
    merge_expecting_error(capsys, linear(m["model_1"], headless), f"model '{headless}'", "'lm_head.weight'",
                          "tie_word_embeddings")
    other = model_copy(m["model_1"], without_head)  # no model has a head at all
    merge_expecting_error(capsys, linear(headless, other), "'lm_head.weight'", "tie_word_embeddings")


def test_a_tied_model_without_its_head_feeds_its_embedding():
    m = tiny_llamas()
    headless = model_copy(m["model_0"], without_head)
    set_config(headless, tie_word_embeddings=True)
    out = os.path.join(scratch("tied"), "out")
    config = write(os.path.dirname(out), "c.yaml", linear(m["model_1"], headless))
    assert run_cli("merge", config, out, "--quiet") == 0
    a, b = load_dir(m["model_1"]), load_dir(m["model_0"])
    expected = (a["lm_head.weight"].float() + b["model.embed_tokens.weight"].float()) / 2
    assert torch.allclose(load_dir(out)["lm_head.weight"].float(), expected, atol=1e-2)


# ------------------------------------------------------------------------------------------ 3. outputs


def test_allow_overwrite_never_replaces_a_folder_the_config_reads(capsys):
    m = tiny_llamas()
    tok = os.path.join(scratch("tok"), "tokenizer")
    shutil.copytree(m["base"], tok)
    before = tree(tok)
    folder = scratch("cfg")
    config = write(folder, "c.yaml", linear(m["model_0"], m["model_1"], extra=f"tokenizer_source: {tok}\n"))
    for out in (tok, os.path.dirname(tok), m["model_0"], os.path.join(m["model_1"], "sub"), folder):
        assert run_cli("merge", config, out, "--allow-overwrite", "--quiet") == 2
        err = capsys.readouterr().err
        assert "which this merge reads" in err and "Traceback" not in err, err
    assert tree(tok) == before and os.listdir(folder) == ["c.yaml"]


# ------------------------------------------------------------------------------------------ 4. hangs


def test_a_yaml_alias_bomb_is_refused_at_once(capsys):
    anchors = ["a0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9]"] + [
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    m = tiny_llamas()
    for field in ("layer_range", "parameters"):
        use = (f"slices:\n  - sources:\n      - model: {m['model_0']}\n        layer_range: *a9\n"
               if field == "layer_range" else f"models:\n  - model: {m['model_0']}\n    parameters: {{weight: *a9}}\n")
        text = "x:\n" + "".join(f"  {a}\n" for a in anchors) + "merge_method: linear\n" + use
        merge_expecting_error(capsys, text, "config.yaml line", "aliases")
    nested = "merge_method: linear\nmodels: " + "[" * 20_000 + "]" * 20_000 + "\n"
    merge_expecting_error(capsys, nested, "config.yaml line 2", "nests more than")


def test_small_aliases_still_work():
    m = tiny_llamas()
    text = f"merge_method: linear\nmodels:\n  - model: {m['model_0']}\n    parameters: &p {{weight: 1.0}}\n" \
           f"  - model: {m['model_1']}\n    parameters: *p\n"
    out = os.path.join(scratch("alias"), "out")
    assert run_cli("merge", write(os.path.dirname(out), "c.yaml", text), out, "--quiet", "--dry-run") == 0


@pytest.mark.parametrize("victim", ["config.yaml", "model.safetensors", "config.json", "tokenizer.json"])
def test_a_named_pipe_in_place_of_an_input_fails_at_once(capsys, victim):
    m = tiny_llamas()
    model = model_copy(m["model_0"])
    folder = scratch("fifo")
    config = write(folder, "config.yaml", linear(model, m["model_1"]))
    if victim == "config.yaml":
        os.remove(config)
        os.mkfifo(config)
    else:
        os.remove(os.path.join(model, victim))
        os.mkfifo(os.path.join(model, victim))
    out = os.path.join(folder, "out")
    with time_bound(60):
        assert run_cli("merge", config, out, "--quiet") == 2
    err = capsys.readouterr().err
    assert "not a regular file" in err and (victim in err) and "Traceback" not in err, err
    assert not os.path.exists(out)


# ------------------------------------------------------------------------------------------ 6. exit 2


def test_deeply_nested_or_wrongly_typed_json_inputs_exit_2(capsys):
    m = tiny_llamas()
    for text, needle in (("[1, 2]", "must be a JSON object"), ("[" * 100_000 + "]" * 100_000, "nests too deeply")):
        model = model_copy(m["model_0"])
        with open(os.path.join(model, "config.json"), "w") as fh:
            fh.write(text)
        merge_expecting_error(capsys, linear(model, m["model_1"]), os.path.join(model, "config.json"), needle)
    model = model_copy(m["model_0"])
    deep = b'{"t":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with open(os.path.join(model, "model.safetensors"), "wb") as fh:
        fh.write(len(deep).to_bytes(8, "little") + deep)
    merge_expecting_error(capsys, linear(model, m["model_1"]), os.path.join(model, "model.safetensors"),
                          "nests too deeply")


def test_out_of_range_numbers_exit_2(capsys):
    m = tiny_llamas()
    huge = "9" * 401
    merge_expecting_error(capsys, linear(m["model_0"]).replace("weight: 1.0", f"weight: {huge}"),
                          "config.yaml line 4", "too large")
    merge_expecting_error(capsys, linear(m["model_0"]).replace("weight: 1.0", f"weight: [1.0, {huge}]"),
                          "config.yaml line 4", "too large")
    for size in ("inf", "1e400", "nan"):
        merge_expecting_error(capsys, linear(m["model_0"]), "shard size", "not a finite size",
                              extra_args=("--out-shard-size", size))


@pytest.mark.parametrize("parameters", [[1, 2], (0.5,), "weight", 3])
def test_merge_tensors_parameters_must_be_a_mapping(parameters):
    with pytest.raises(ConfigError, match="parameters must be a mapping"):
        merge_tensors([torch.ones(3), torch.ones(3)], "linear", parameters=parameters)


# ------------------------------------------------------------------------------------------ concurrency


def _assert_one_winner(folder: str, out: str, codes: list[int], errors: list[str], inputs: dict,
                       models: dict) -> None:
    assert sorted(codes) == [0] + [2] * (len(codes) - 1), (codes, errors)
    assert len(errors) == len(codes) - 1, errors
    for err in errors:
        assert "already exists" in err or "appeared while this merge ran" in err, err
        assert "Traceback" not in err
    assert [n for n in os.listdir(folder) if not n.endswith(".yaml")] == ["out"]  # no temp folder left
    assert "model.safetensors" in os.listdir(out) and {k: tree(v) for k, v in models.items()} == inputs


def _race_configs(n: int) -> tuple[dict, str, list[str], str]:
    m = tiny_llamas()
    folder = scratch("race")
    configs = [write(folder, f"c{i}.yaml", linear(m["model_0"], m[f"model_{1 + i % 2}"])) for i in range(n)]
    return m, folder, configs, os.path.join(folder, "out")


def test_concurrent_merges_into_one_folder_exactly_one_wins(capsys):
    """N merges (threads of one process) at once into one absent folder: one exits 0, the others exit 2,
    nothing else is touched, no temp folder is left. (Processes racing on the final rename itself:
    tests/io/test_output_claim.py; whole CLI processes: the slow test below.)"""
    import threading

    m, folder, configs, out = _race_configs(4)
    inputs = {k: tree(v) for k, v in m.items()}
    codes: list = [None] * len(configs)
    start = threading.Barrier(len(configs))

    def one(i: int) -> None:
        start.wait()
        codes[i] = run_cli("merge", configs[i], out, "--quiet")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(configs))]
    with time_bound(120):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    _assert_one_winner(folder, out, codes, capsys.readouterr().err.splitlines(), inputs, m)


@pytest.mark.slow
def test_concurrent_merge_processes_into_one_folder_exactly_one_wins():
    m, folder, configs, out = _race_configs(4)
    inputs = {k: tree(v) for k, v in m.items()}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    procs = [subprocess.Popen([sys.executable, "-m", "fusion_engine", "merge", c, out, "--quiet"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=folder)
             for c in configs]  # cwd outside the checkout: `-m` must import the installed package
    codes = [p.wait(300) for p in procs]
    errors = [line for p in procs for line in p.stderr.read().splitlines()]
    _assert_one_winner(folder, out, codes, errors, inputs, m)


def test_a_head_under_another_name_is_not_missing(capsys):
    """GPT-NeoX (Pythia) keeps its untied head as embed_out.weight: no lm_head.weight is expected."""
    folder = scratch("neox")
    g = torch.Generator().manual_seed(0)
    models = []
    for name in ("a", "b"):
        path = os.path.join(folder, name)
        os.makedirs(path)
        save_file({"gpt_neox.embed_in.weight": torch.randn(8, 4, generator=g),
                   "gpt_neox.layers.0.mlp.dense_h_to_4h.weight": torch.randn(4, 4, generator=g),
                   "gpt_neox.final_layer_norm.weight": torch.ones(4),
                   "embed_out.weight": torch.randn(8, 4, generator=g)},
                  os.path.join(path, "model.safetensors"))
        write(path, "config.json", '{"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", '
                                   '"tie_word_embeddings": false, "num_hidden_layers": 1}')
        models.append(path)
    config = write(folder, "c.yaml", linear(*models))
    assert run_cli("merge", config, os.path.join(folder, "out"), "--quiet") == 0, capsys.readouterr().err
    assert "embed_out.weight" in load_dir(os.path.join(folder, "out"))
