"""`fusion-engine measure` and the statistics API: Fisher and Gram of a causal LM, checked by hand."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch.nn import functional as F

from fusion_engine.cli import main
from fusion_engine.data_aware.measure import measure_statistics
from fusion_engine.io.statistics import load_statistics, save_statistics
from fusion_engine.errors import CheckpointError, ConfigError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "cli"))
from cli_fixtures import tiny_llamas  # noqa: E402


@pytest.fixture(scope="module")
def lm():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llamas()["model_0"], dtype=torch.float32).eval()


def _ids(n=5, length=9, seed=0):
    return torch.randint(0, 100, (n, length), generator=torch.Generator().manual_seed(seed))


def test_lm_fisher_is_the_mean_of_per_sequence_squared_gradients(lm):
    ids = _ids()
    stats = measure_statistics(lm, [ids[:3], ids[3:]], fisher="empirical", gram=False, causal_lm=True)
    expected = {n: torch.zeros_like(p) for n, p in lm.named_parameters()}
    for i in range(len(ids)):
        lm.zero_grad()
        logits = lm(input_ids=ids[i:i + 1]).logits[:, :-1]
        F.cross_entropy(logits[0], ids[i, 1:]).backward()
        for n, p in lm.named_parameters():
            expected[n] += p.grad.square() / len(ids)
    lm.zero_grad()
    assert set(stats) == {f"fisher.{n}" for n in expected}
    for n, f in expected.items():
        torch.testing.assert_close(stats[f"fisher.{n}"], f, rtol=1e-4, atol=1e-10)


def test_lm_gram_is_xtx_of_each_linear_input(lm):
    ids = _ids(4)
    stats = measure_statistics(lm, [ids], fisher=None, gram=True, activations=True, causal_lm=True)
    seen = {}
    handle = lm.model.layers[1].mlp.down_proj.register_forward_pre_hook(
        lambda m, inp: seen.__setitem__("x", inp[0].detach().reshape(-1, inp[0].shape[-1])))
    out = {}
    h2 = lm.model.layers[1].mlp.down_proj.register_forward_hook(
        lambda m, inp, o: out.__setitem__("y", o.detach().reshape(-1, o.shape[-1])))
    with torch.no_grad():
        lm(input_ids=ids)
    handle.remove()
    h2.remove()
    x, y = seen["x"].double(), out["y"].double()
    torch.testing.assert_close(stats["gram.model.layers.1.mlp.down_proj"].double(), x.T @ x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["activation_mean.model.layers.1.mlp.down_proj"].double(), y.mean(0),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["activation_var.model.layers.1.mlp.down_proj"].double(), y.var(0, unbiased=False),
                               rtol=1e-4, atol=1e-6)


def test_sampled_fisher_is_seeded(lm):
    ids = _ids(3)
    a = measure_statistics(lm, [ids], fisher="sampled", gram=False, causal_lm=True, seed=3)
    b = measure_statistics(lm, [ids], fisher="sampled", gram=False, causal_lm=True, seed=3)
    c = measure_statistics(lm, [ids], fisher="empirical", gram=False, causal_lm=True)
    name = "fisher.model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])
    with pytest.raises(ConfigError, match="classifiers"):
        measure_statistics(lm, [ids], fisher="model", causal_lm=True)


def test_classifier_statistics_and_file_round_trip(tmp_path):
    from fusion_engine.data_aware import collect_gram, estimate_fisher

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    batches = [(torch.randn(6, 5), torch.randint(0, 3, (6,))) for _ in range(2)]
    stats = measure_statistics(model, batches)
    fisher, gram = estimate_fisher(model, batches), collect_gram(model, batches)
    for k, v in fisher.items():
        torch.testing.assert_close(stats[f"fisher.{k}"], v)
    for k, v in gram.items():
        torch.testing.assert_close(stats[f"gram.{k}"], v)
    path = save_statistics(stats, str(tmp_path / "s.safetensors"), metadata={"data": "digits"})
    loaded, meta = load_statistics(path)
    assert meta["data"] == "digits" and set(loaded) == set(stats)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary left behind
    with pytest.raises(ConfigError, match="unknown statistic"):
        save_statistics({"weight": torch.zeros(1)}, str(tmp_path / "t.safetensors"))
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(CheckpointError, match="not a fusion_engine statistics file"):
        load_statistics(str(other))


def test_cli_measure_writes_beside_the_model_and_reports_bad_input(tmp_path, capsys):
    import shutil

    model = shutil.copytree(tiny_llamas()["model_1"], tmp_path / "m")
    before = sorted(os.listdir(model))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "merging models is fun"}\n{"prompt": "the weights of two models"}\n')
    assert main(["measure", str(model), "--data", str(prompts), "--fisher", "sampled"]) == 0
    stats, meta = load_statistics(str(model) + ".stats.safetensors")
    assert meta["fisher"] == "sampled" and meta["sequences"] == "2"
    assert any(k.startswith("gram.") for k in stats) and any(k.startswith("fisher.") for k in stats)
    assert sorted(os.listdir(model)) == before  # the model folder is never written
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    assert main(["measure", str(model), "--data", str(bad)]) == 2
    assert "bad.jsonl line 1" in capsys.readouterr().err
    assert main(["measure", str(tmp_path / "nope"), "--data", str(prompts)]) == 2
