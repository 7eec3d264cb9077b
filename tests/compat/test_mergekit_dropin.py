"""fusion_engine.compat.mergekit: install() routes mergekit's merge_tensors and a mergekit-yaml merge
through fusion_engine (counted), with the same tensors; uninstall() restores mergekit exactly."""

import os

import pytest
import torch

import fusion_engine.compat.mergekit as fe_mergekit
import fusion_engine.methods.api as fe_api
from fusion_engine.errors import ConfigError

pytest.importorskip("mergekit")
from mergekit.merge_methods import merge_tensors as mk_merge_tensors  # noqa: E402
from mergekit.merge_methods import registry  # noqa: E402


@pytest.fixture
def calls(monkeypatch):
    """Counts fusion_engine.methods.api.merge_tensors calls by method name; always uninstalls."""
    counted = []
    real = fe_api.merge_tensors

    def counting(tensors, method, **kw):
        counted.append(method if isinstance(method, str) else method.name)
        return real(tensors, method, **kw)

    monkeypatch.setattr(fe_api, "merge_tensors", counting)
    yield counted
    fe_mergekit.uninstall()


def _inputs(k=3, shape=(24, 16)):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=gen)
    return [base] + [base + torch.randn(shape, generator=gen) for _ in range(k - 1)]


CASES = [
    ("ties", 3, 0, {"weight": [0.5, 1.0], "density": 0.4}),
    ("task_arithmetic", 3, 0, {"weight": [0.5, 1.0]}),
    ("linear", 3, None, {"weight": [0.5, 1.0, 2.0]}),
    ("slerp", 2, 0, {"t": 0.3}),
    ("breadcrumbs_ties", 3, 0, {"weight": [0.5, 1.0], "density": 0.5}),
    ("model_stock", 3, 0, {}),
    ("dare_ties", 3, 0, {"weight": [0.5, 1.0], "density": 1.0}),
]


def test_install_routes_merge_tensors_and_uninstall_restores(calls):
    before = dict(registry._METHODS)
    expected = {}
    for method, k, base_index, params in CASES:
        expected[method] = mk_merge_tensors(_inputs(k), method, parameters=params, base_index=base_index)
    assert calls == []
    replaced = fe_mergekit.install()
    assert set(replaced) == set(before) and fe_mergekit.installed() == replaced
    for method, k, base_index, params in CASES:
        got = mk_merge_tensors(_inputs(k), method, parameters=params, base_index=base_index)
        torch.testing.assert_close(got, expected[method], rtol=1e-5, atol=1e-5)
    assert calls == [c[0] for c in CASES]
    fe_mergekit.uninstall()
    assert registry._METHODS.keys() == before.keys()
    assert all(registry._METHODS[name] is before[name] for name in before)
    mk_merge_tensors(_inputs(), "ties", parameters={"weight": 1.0, "density": 0.5}, base_index=0)
    assert len(calls) == len(CASES)  # mergekit's own method again
    assert fe_mergekit.installed() == []


def test_install_subset_seed_and_errors(calls):
    assert fe_mergekit.install(["ties"], seed=7) == ["ties"]
    assert type(registry.get("slerp")).__name__ != "FusionEngineMethod"
    fe_mergekit.install(["dare_linear"], seed=7)  # re-install replaces the previous selection
    assert fe_mergekit.installed() == ["dare_linear"]
    a = mk_merge_tensors(_inputs(), "dare_linear", parameters={"weight": 1.0, "density": 0.5}, base_index=0,
                         name="x")
    b = mk_merge_tensors(_inputs(), "dare_linear", parameters={"weight": 1.0, "density": 0.5}, base_index=0,
                         name="x")
    assert torch.equal(a, b) and calls == ["dare_linear", "dare_linear"]
    with pytest.raises(ConfigError, match="not a method of both"):
        fe_mergekit.install(["fisher"])
    with pytest.raises(ConfigError, match="seed"):
        fe_mergekit.install(seed=-3)


def _tiny_llama(path, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def _run_yaml(config, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    run_merge(MergeConfiguration.model_validate(config), str(out),
              options=MergeOptions(lazy_unpickle=False, copy_tokenizer=False, write_model_card=False))
    return load_file(os.path.join(out, "model.safetensors"))


@pytest.mark.parametrize("method,parameters", [
    ("ties", [{"weight": 0.7, "density": 0.4}, {"weight": [0.2, 0.9], "density": 0.6}]),
    ("slerp", None),
])
def test_mergekit_yaml_merge_runs_on_fusion_engine(tmp_path, calls, method, parameters):
    models = [_tiny_llama(tmp_path / f"m{i}", i) for i in range(3)]
    if method == "slerp":
        config = {"merge_method": "slerp", "base_model": models[0], "dtype": "float32",
                  "parameters": {"t": [0.0, 0.3, 1.0]},
                  "slices": [{"sources": [{"model": models[0], "layer_range": [0, 2]},
                                          {"model": models[1], "layer_range": [0, 2]}]}]}
    else:
        config = {"merge_method": method, "base_model": models[0], "dtype": "float32",
                  "models": [{"model": m, "parameters": p} for m, p in zip(models[1:], parameters)]}
    expected = _run_yaml(config, tmp_path / "mergekit")
    assert calls == []
    fe_mergekit.install()
    got = _run_yaml(config, tmp_path / "fusion_engine")
    fe_mergekit.uninstall()
    assert len(calls) == len(expected) and set(calls) == {method}
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
