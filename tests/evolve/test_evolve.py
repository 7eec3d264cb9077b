"""``fusion-engine evolve``: the search space, in-memory merges equal to `fusion-engine merge`, CMA-ES with
resumable state, callable and command evaluations, and the best recipe reproduced bit for bit."""

from __future__ import annotations

import glob
import os
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from fusion_engine.cli import main as cli_main
from fusion_engine.demo import build_tiny_llamas
from fusion_engine.errors import ConfigError
from fusion_engine.evolve import InMemoryMerger, SearchSpace, evolve

pytest.importorskip("cma")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_tiny_llamas(str(tmp_path_factory.mktemp("llamas")), n_models=2, num_layers=2, hidden=32,
                             tokenizer=False, seed=5)


def template(models, method="ties", extra=""):
    return textwrap.dedent(f"""\
        merge_method: {method}
        base_model: {models['base']}
        models:
          - model: {models['base']}
          - model: {models['model_0']}
            parameters: {{weight: 0.5, density: 0.5}}
          - model: {models['model_1']}
            parameters: {{weight: 0.25}}
        dtype: float32
        {extra}""")


def load_dir(path):
    out = {}
    for f in glob.glob(os.path.join(path, "*.safetensors")):
        out.update(load_file(f))
    return out


def test_search_space_maps_the_unit_cube_into_the_template(models):
    space = SearchSpace(template(models), points=2, bounds={"weight": (0.0, 2.0)})
    assert [(c.model, c.parameter) for c in space.coordinates] == [
        (models["model_0"], "weight"), (models["model_0"], "density"),
        (models["model_1"], "weight"), (models["model_1"], "density")]
    assert space.dimension == 8
    assert space.initial_point() == [0.25, 0.25, 0.4 / 0.9, 0.4 / 0.9, 0.125, 0.125, 0.5, 0.5]
    import yaml

    doc = yaml.safe_load(space.recipe([0.0, 1.0, 0.5, 2.0, 0.1, 0.2, 0.3, -1.0]))
    assert doc["models"][0] == {"model": models["base"]}  # the base is not searched
    assert doc["models"][1]["parameters"] == {"weight": [0.0, 2.0], "density": [0.55, 1.0]}  # clipped
    assert doc["models"][2]["parameters"] == {"weight": [0.2, 0.4], "density": [0.37, 0.1]}
    assert doc["merge_method"] == "ties" and doc["dtype"] == "float32"


def test_search_space_errors(models):
    with pytest.raises(ConfigError, match="no per-model number parameter"):
        SearchSpace(template(models), ["lambda"])
    with pytest.raises(ConfigError, match="finite bounds"):
        SearchSpace(template(models), ["weight"], bounds={"weight": (1.0, 0.0)})
    with pytest.raises(ConfigError, match="not `slices:`"):
        SearchSpace(f"merge_method: linear\nslices:\n  - sources:\n      - model: {models['base']}\n"
                    f"        layer_range: [0, 2]\n")


def test_in_memory_merge_equals_fusion_engine_merge(models, tmp_path):
    space = SearchSpace(template(models), points=2)
    recipe = space.recipe([0.3, 0.9, 0.2, 0.6, 0.7, 0.1, 0.8, 0.4])
    with InMemoryMerger() as merger:
        merged = merger.merge(recipe)
    (tmp_path / "r.yaml").write_text(recipe)
    assert cli_main(["merge", str(tmp_path / "r.yaml"), str(tmp_path / "out"), "--quiet"]) == 0
    written = load_dir(tmp_path / "out")
    assert sorted(merged) == sorted(written)
    for name, tensor in written.items():
        assert torch.equal(merged[name], tensor), name


def distance_to(target):
    def evaluate(state_dict):
        return -sum(float((state_dict[k] - v).pow(2).sum()) for k, v in target.items())
    return evaluate


def test_evolve_improves_resumes_identically_and_its_yaml_reproduces(models, tmp_path):
    space = SearchSpace(template(models, "task_arithmetic"), ["weight"], points=2)
    with InMemoryMerger() as merger:  # a target recipe the search has to find: weights 0.8 -> 0.3 and 0.1
        target = merger.merge(space.recipe([0.8, 0.3, 0.1, 0.1]))
    evaluate = distance_to(target)
    full = evolve(space, evaluate, generations=4, seed=3, log=None)
    start = evaluate(InMemoryMerger().merge(space.recipe(space.initial_point())))
    assert full.best_score > start and len(full.history) == 4

    state, out = str(tmp_path / "s.pkl"), str(tmp_path / "best.yaml")
    evolve(space, evaluate, generations=2, seed=3, state_path=state, out_path=out, log=None)
    resumed = evolve(space, evaluate, generations=4, seed=3, state_path=state, out_path=out, resume=True,
                     log=None)
    untimed = lambda history: [{k: v for k, v in row.items() if k != "seconds"} for row in history]  # noqa: E731
    assert resumed.best_recipe == full.best_recipe and untimed(resumed.history) == untimed(full.history)

    assert cli_main(["merge", out, str(tmp_path / "merged"), "--quiet"]) == 0
    written = load_dir(tmp_path / "merged")
    with InMemoryMerger() as merger:
        best = merger.merge(resumed.best_recipe)
    assert all(torch.equal(best[k], written[k]) for k in written)
    assert evaluate(written) == resumed.best_score

    with pytest.raises(ConfigError, match="different template"):
        evolve(SearchSpace(template(models, "task_arithmetic"), ["weight"], points=3), evaluate,
               generations=5, state_path=state, resume=True, log=None)


def test_cli_with_a_python_function_and_with_a_command(models, tmp_path, monkeypatch, capsys):
    (tmp_path / "t.yaml").write_text(template(models, "linear").replace(f"  - model: {models['base']}\n", "")
                                    .replace(", density: 0.5", "").replace(f"base_model: {models['base']}\n", ""))
    (tmp_path / "my_eval.py").write_text(
        "def score(sd):\n    return -float(sum(v.float().abs().sum() for v in sd.values()))\n")
    monkeypatch.chdir(tmp_path)
    code = cli_main(["evolve", "t.yaml", "--evaluate", "my_eval:score", "--generations", "2", "--population", "3",
                     "--out", "best.yaml"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "generation 2/2" in printed and "best so far" in printed and "best.yaml" in printed
    assert os.path.isfile("best.yaml") and os.path.isfile("best.yaml.state")
    assert cli_main(["evolve", "t.yaml", "--evaluate", "my_eval:score", "--generations", "3", "--population", "3",
                     "--out", "best.yaml", "--resume", "-q"]) == 0
    assert "generation 3/3" not in capsys.readouterr().out

    score = (f"{sys.executable} -c \"import sys, os; print('log line'); "
             f"print(int(os.path.isfile(os.path.join(sys.argv[1], 'model.safetensors'))))\" {{model}}")
    assert cli_main(["evolve", "t.yaml", "--evaluate-command", score, "--generations", "1", "--population", "2",
                     "--out", "cmd.yaml", "-q"]) == 0
    assert "best score 1 after 3 recipes" in capsys.readouterr().out  # the candidate was written
    assert cli_main(["evolve", "t.yaml", "--evaluate", "my_eval:nothing", "--out", "x.yaml"]) == 2
    assert cli_main(["evolve", "t.yaml", "--evaluate-command", "exit 3", "--generations", "1", "--out", "y.yaml"]) == 1


@pytest.mark.slow
def test_digits_example_beats_the_tables_task_arithmetic(tmp_path):
    from fusion_engine.evolve import run_digits_example

    summary = run_digits_example(str(tmp_path), log=None)
    avg = lambda accs: sum(accs) / len(accs)  # noqa: E731
    assert avg(summary["evolved"]) > avg(summary["task_arithmetic"]) + 3.0  # test split, held out of the search
    assert summary["lambda"] == 0.5
    recipe = open(summary["recipe"]).read()
    assert cli_main(["merge", summary["recipe"], str(tmp_path / "merged"), "--quiet"]) == 0
    with InMemoryMerger() as merger:
        best = merger.merge(recipe)
    written = load_dir(tmp_path / "merged")
    assert sorted(best) == sorted(written) and all(torch.equal(best[k], written[k]) for k in written)
