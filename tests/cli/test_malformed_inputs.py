"""Property: whatever malformed config or checkpoint ``fusion-engine merge`` is given, it either merges or
exits 2 with one line naming the file; never a traceback, never a hang, inputs unchanged, and no output
folder (or temp folder) left behind by a failed run."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_fixtures import run_cli, scratch, time_bound, tiny_llamas, tree

SCALARS = (st.none() | st.booleans() | st.integers(-3, 40) | st.integers(-(10**500), 10**500)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["linear", "ties", "slerp", "passthrough", "bfloat16", "base", "mlp", "*", "model_0"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(["weight", "density", "t", "filter", "value", "model", "layer_range", "parameters",
                     "normalize", "x"]), inner, max_size=3), max_leaves=10)
INSERTS = ["", ":", "- ", "  ", "\n", "[", "]", "{", "}", "&a ", "*a", "!!python/name:os.system ", "\t", "'", "\x00",
           "\x85"]
TEXT_EDITS = st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(INSERTS)), max_size=3)


def _valid_config(models: dict, base: str) -> dict:
    return {"merge_method": "ties", "base_model": base,
            "models": [{"model": models["model_0"], "parameters": {"weight": 0.5, "density": 0.5}},
                       {"model": models["model_1"], "parameters": {"weight": [0.2, 0.8], "density": 0.7}}],
            "parameters": {"normalize": True}, "dtype": "float32"}


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _set(node, path, value):
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


@st.composite
def config_texts(draw, models: dict, base: str) -> str:
    config = _valid_config(models, base)
    for _ in range(draw(st.integers(0, 3))):
        paths = [p for p in _paths(config) if p]
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete":
            parent = config
            for key in path[:-1]:
                parent = parent[key]
            del parent[path[-1]]
        elif action == "add" and isinstance(config, dict):
            config[draw(st.sampled_from(["slices", "tokenizer_source", "out_dtype", "unknown"]))] = draw(VALUES)
        else:
            _set(config, path, draw(VALUES))
    text = yaml.safe_dump(config, allow_unicode=True)
    for position, insert in draw(TEXT_EDITS):
        position %= len(text) + 1
        text = text[:position] + insert + text[position:]
    return text


@st.composite
def checkpoint_damage(draw):
    """(file, edit) applied to a copy of model_1: byte edits in the safetensors header, truncation,
    trailing bytes, or a config.json replaced by other JSON."""
    kind = draw(st.sampled_from(["header_bytes", "truncate", "append", "config_json", "none"]))
    if kind == "header_bytes":
        return kind, draw(st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=4))
    if kind == "truncate":
        return kind, draw(st.integers(0, 2000))
    if kind == "append":
        return kind, draw(st.binary(min_size=1, max_size=16))
    if kind == "config_json":
        return kind, draw(st.sampled_from(["[1]", "null", "{", '{"model_type": 7}', '{"architectures": "x"}',
                                           '{"num_hidden_layers": 1e999}', '"text"', "[" * 3000 + "]" * 3000]))
    return kind, None


def _damage(folder: str, kind: str, arg) -> None:
    weights = os.path.join(folder, "model.safetensors")
    if kind == "header_bytes":
        raw = bytearray(open(weights, "rb").read())
        for i, b in arg:
            raw[i] = b
        open(weights, "wb").write(bytes(raw))
    elif kind == "truncate":
        raw = open(weights, "rb").read()
        open(weights, "wb").write(raw[:arg])
    elif kind == "append":
        open(weights, "ab").write(arg)
    elif kind == "config_json":
        open(os.path.join(folder, "config.json"), "w").write(arg)


@settings(max_examples=20, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(data=st.data())
def test_malformed_configs_and_checkpoints_merge_or_exit_2_cleanly(data):
    models = dict(tiny_llamas())
    work = scratch("prop")
    kind, arg = data.draw(checkpoint_damage())
    damaged = os.path.join(work, "damaged")
    shutil.copytree(models["model_1"], damaged)
    _damage(damaged, kind, arg)
    models["model_1"] = damaged
    text = data.draw(config_texts(models, models["base"]))
    config = os.path.join(work, "config.yaml")
    with open(config, "w", encoding="utf-8", errors="surrogatepass") as fh:
        fh.write(text)
    before = {key: tree(path) for key, path in models.items()} | {"config": tree(work)}
    out = os.path.join(work, "out")
    err = io.StringIO()
    with time_bound(30), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = run_cli("merge", config, out, "--quiet")
    err = err.getvalue()
    assert code in (0, 2), f"exit {code}: {err}\nconfig:\n{text}"
    assert "Traceback" not in err and err.count("\n") <= 1, err
    if code == 2:
        assert err.startswith("fusion-engine: error: "), err
        assert "config.yaml" in err or any(path in err for path in models.values()), err
        assert sorted(os.listdir(work)) == ["config.yaml", "damaged"], "a failed run left something behind"
    else:
        assert sorted(os.listdir(work)) == ["config.yaml", "damaged", "out"]
        shutil.rmtree(out)
    assert {key: tree(path) for key, path in models.items()} | {"config": tree(work)} == before
    shutil.rmtree(work)
