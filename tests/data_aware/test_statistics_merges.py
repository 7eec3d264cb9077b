"""`measure` → `merge` with the YAML methods `fisher` and `regmean` equals the in-memory merges."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import fusion_engine as fe
from fusion_engine.cli import main
from fusion_engine.data_aware import fisher_merge_models, regmean_merge
from fusion_engine.io.statistics import load_statistics

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "cli"))
from cli_fixtures import load_dir, tiny_llamas  # noqa: E402

PROMPTS = "merging models is fun\nthe weights of two models\nhello world again and again\nabcdefghij klmnop\n"


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Statistics of two tiny Llamas on the same prompts, via the CLI."""
    root = tmp_path_factory.mktemp("stats")
    (root / "p.txt").write_text(PROMPTS)
    models = tiny_llamas()
    paths = {}
    for name in ("model_0", "model_1"):
        out = root / f"{name}.stats.safetensors"
        assert main(["measure", models[name], "--data", str(root / "p.txt"), "--out", str(out)]) == 0
        paths[name] = str(out)
    return models, paths, root


def _run_yaml(root, text: str, name: str):
    cfg = root / f"{name}.yaml"
    cfg.write_text(text)
    out = root / name
    assert main(["merge", str(cfg), str(out), "--quiet"]) == 0
    return load_dir(str(out))


def test_yaml_fisher_equals_fisher_merge_models(measured):
    models, stats, root = measured
    merged = _run_yaml(root, f"""merge_method: fisher
dtype: float32
models:
  - model: {models['model_0']}
    parameters: {{fisher: {stats['model_0']}, weight: 1.0}}
  - model: {models['model_1']}
    parameters: {{fisher: {stats['model_1']}, weight: 0.5}}
""", "fisher_out")
    sds = [load_dir(models[n]) for n in ("model_0", "model_1")]
    fishers = [{k[len("fisher."):]: v for k, v in load_statistics(stats[n])[0].items() if k.startswith("fisher.")}
               for n in ("model_0", "model_1")]
    fishers = [{k: v for k, v in f.items() if k in sds[0]} for f in fishers]  # tied/untied heads alike
    expected = fisher_merge_models(sds, fishers, weights=[1.0, 0.5])
    assert set(merged) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(merged[k].float(), v.float(), rtol=1e-5, atol=1e-6, msg=k)


def test_yaml_regmean_equals_regmean_merge(measured):
    models, stats, root = measured
    merged = _run_yaml(root, f"""merge_method: regmean
dtype: float32
parameters: {{alpha: 0.9}}
models:
  - model: {models['model_0']}
    parameters: {{gram: {stats['model_0']}}}
  - model: {models['model_1']}
    parameters: {{gram: {stats['model_1']}}}
""", "regmean_out")
    sds = [load_dir(models[n]) for n in ("model_0", "model_1")]
    grams = [{k[len("gram."):]: v for k, v in load_statistics(stats[n])[0].items() if k.startswith("gram.")}
             for n in ("model_0", "model_1")]
    grams = [{k: v for k, v in g.items() if f"{k}.weight" in sds[0]} for g in grams]
    expected = regmean_merge(sds, grams, alpha=0.9)
    assert set(merged) == set(expected)
    linear = {f"{k}.weight" for k in grams[0]}
    assert linear and any(not torch.allclose(merged[k], 0.5 * (sds[0][k] + sds[1][k])) for k in linear)
    for k, v in expected.items():
        torch.testing.assert_close(merged[k].float(), v.float(), rtol=1e-4, atol=1e-5, msg=k)


def test_statistics_of_another_architecture_name_the_file(measured, capsys):
    models, stats, root = measured
    (root / "bad.yaml").write_text(f"""merge_method: fisher
models:
  - model: {models['model_0']}
    parameters: {{fisher: {root / 'nope.safetensors'}}}
  - model: {models['model_1']}
    parameters: {{fisher: {stats['model_1']}}}
""")
    assert main(["merge", str(root / "bad.yaml"), str(root / "bad_out")]) == 2
    assert "nope.safetensors" in capsys.readouterr().err
    assert not os.path.exists(root / "bad_out")


def test_python_api_takes_statistics_files(measured):
    models, stats, _ = measured
    sds = [load_dir(models[n]) for n in ("model_0", "model_1")]
    name = "model.layers.0.mlp.up_proj.weight"
    out = fe.merge_tensors([sds[0][name], sds[1][name]], "fisher", name=name,
                           parameters={"fisher": [stats["model_0"], stats["model_1"]]})
    f = [load_statistics(stats[n])[0][f"fisher.{name}"] for n in ("model_0", "model_1")]
    torch.testing.assert_close(out, fe.ops.fisher_merge([sds[0][name], sds[1][name]], f, [1.0, 1.0], eps=1e-8))
