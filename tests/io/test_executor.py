"""run_plan: stream, merge, write; equals the in-memory merge; atomic, bounded, and loud on mistakes."""

from __future__ import annotations

import json
import os
import weakref

import pytest
import torch
from safetensors.torch import load_file

from fusion_engine.errors import CheckpointError, MissingTensorError, ShapeMismatchError
from fusion_engine.checkpoint.executor import run_plan
from fusion_engine.io import Checkpoint, open_checkpoint
from fusion_engine.checkpoint.plan import MergePlan, TensorRef, TensorTask

from io_testkit import SHAPES, expected_linear, linear_plan, state_dict, tree_digest, write_model

WEIGHTS = [0.5, 0.3, 0.2]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    sds = [state_dict(i) for i in range(3)]
    paths = {"single": write_model(root / "single", sds[0]),
             "sharded": write_model(root / "sharded", sds[1], shards=3),
             "bin": write_model(root / "bin", sds[2], fmt="bin")}
    return paths, sds


def _read_all(folder) -> dict[str, torch.Tensor]:
    with open_checkpoint(folder) as ck:
        return {n: ck.read(n) for n in ck.names()}


def test_linear_merge_matches_the_in_memory_merge(models, tmp_path):
    paths, sds = models
    before = {k: tree_digest(p) for k, p in paths.items()}
    summary = run_plan(linear_plan(paths, WEIGHTS), tmp_path / "out", quiet=True)
    got = _read_all(tmp_path / "out")
    want = expected_linear(sds, WEIGHTS)
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert summary["tensors"] == len(SHAPES) and summary["world_size"] == 1
    assert summary["bytes_written"] == sum(t.numel() * 2 for t in want.values())
    assert summary["bytes_read"] == 3 * summary["bytes_written"]
    assert {k: tree_digest(p) for k, p in paths.items()} == before  # inputs never change
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_sharded_output_and_read_ahead_depth_do_not_change_the_bytes(models, tmp_path):
    paths, _ = models
    digests = []
    for depth in (1, 2, 4):
        out = tmp_path / f"out{depth}"
        run_plan(linear_plan(paths, WEIGHTS), out, quiet=True, out_shard_size=1500, max_in_flight=depth)
        digests.append(tree_digest(out))
    assert digests[0] == digests[1] == digests[2]
    assert "model.safetensors.index.json" in digests[0] and "model-00001-of-00004.safetensors" in digests[0]
    index = json.loads((tmp_path / "out1" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(SHAPES)


def test_output_dtype_resolution(models, tmp_path):
    paths, sds = models
    run_plan(linear_plan(paths, WEIGHTS, out_dtype=torch.float32), tmp_path / "f32", quiet=True)
    got = load_file(tmp_path / "f32" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in got.values())
    plan = linear_plan(paths, WEIGHTS)
    plan.default_out_dtype = torch.float16
    run_plan(plan, tmp_path / "f16", quiet=True)
    assert all(t.dtype == torch.float16 for t in load_file(tmp_path / "f16" / "model.safetensors").values())


def test_passthrough_slices_copy_exact_bytes_and_side_files_follow_the_plan(models, tmp_path):
    paths, sds = models
    layer = "model.layers.{}.mlp.up_proj.weight"
    tasks = [TensorTask(layer.format(i), "passthrough", [TensorRef(src, layer.format(j))], None, {}, (24, 16))
             for i, (src, j) in enumerate([("single", 0), ("sharded", 1), ("bin", 0), ("single", 1)])]
    tok = os.path.join(paths["sharded"], "tokenizer.json")
    plan = MergePlan(models=dict(paths), tasks=tasks, config_json={"num_hidden_layers": 4},
                     extra_files={"tokenizer.json": tok})
    run_plan(plan, tmp_path / "out", quiet=True)
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(got[layer.format(0)], sds[0][layer.format(0)])
    assert torch.equal(got[layer.format(1)], sds[1][layer.format(1)])
    assert torch.equal(got[layer.format(2)], sds[2][layer.format(0)])
    assert torch.equal(got[layer.format(3)], sds[0][layer.format(1)])
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"num_hidden_layers": 4}
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_existing_output_needs_allow_overwrite(models, tmp_path):
    paths, _ = models
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    with pytest.raises(CheckpointError, match="already exists"):
        run_plan(linear_plan(paths, WEIGHTS), out, quiet=True)
    assert os.listdir(out) == ["stale.txt"]
    run_plan(linear_plan(paths, WEIGHTS), out, quiet=True, allow_overwrite=True)
    assert "stale.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)


def test_output_may_not_replace_an_input(models, tmp_path):
    paths, _ = models
    with pytest.raises(CheckpointError, match="input model 'single'"):
        run_plan(linear_plan(paths, WEIGHTS), paths["single"], quiet=True, allow_overwrite=True)
    with pytest.raises(CheckpointError, match="contains the input model"):
        run_plan(linear_plan(paths, WEIGHTS), os.path.dirname(paths["single"]), quiet=True, allow_overwrite=True)


@pytest.mark.parametrize("fault", ["missing_tensor", "wrong_shape", "missing_model"])
def test_errors_leave_no_output_behind(models, tmp_path, fault):
    paths, _ = models
    plan = linear_plan(paths, WEIGHTS)
    if fault == "missing_tensor":
        plan.tasks[-1].inputs[1] = TensorRef("sharded", "model.layers.9.mlp.up_proj.weight")
        error = MissingTensorError
    elif fault == "wrong_shape":  # found only when the merge of that tensor returns
        plan.tasks[-1].shape = (16, 37)
        error = ShapeMismatchError
    else:
        plan.models["bin"] = str(tmp_path / "nowhere")
        error = CheckpointError
    with pytest.raises(error):
        run_plan(plan, tmp_path / "out", quiet=True)
    assert os.listdir(tmp_path) == []


def test_progress_bar_reports_tensors_and_bytes(models, tmp_path, capsys):
    paths, _ = models
    run_plan(linear_plan(paths, WEIGHTS), tmp_path / "out")
    err = capsys.readouterr().err
    assert f"{len(SHAPES)}/{len(SHAPES)} tensors" in err and "B/s" in err
    run_plan(linear_plan(paths, WEIGHTS), tmp_path / "out2", quiet=True)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("max_in_flight", [1, 2])
def test_tensors_in_flight_are_bounded(models, tmp_path, monkeypatch, max_in_flight):
    """At most max_in_flight tasks' inputs are alive at once (+ the one just read by the reader thread)."""
    paths, _ = models
    live, peak = [0], [0]
    read = Checkpoint.read

    def counting_read(self, name, out=None):
        t = read(self, name, out)
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        weakref.finalize(t, lambda: live.__setitem__(0, live[0] - 1))
        return t

    monkeypatch.setattr(Checkpoint, "read", counting_read)
    many = {f"w{i}": (64, 64) for i in range(12)}
    folder_sds = [{n: torch.randn(s).to(torch.bfloat16) for n, s in many.items()} for _ in range(3)]
    folders = {f"m{i}": write_model(tmp_path / f"m{i}", sd) for i, sd in enumerate(folder_sds)}
    run_plan(linear_plan(folders, WEIGHTS, shapes=many), tmp_path / "out", quiet=True, max_in_flight=max_in_flight)
    assert 3 <= peak[0] <= 3 * max_in_flight
    assert live[0] == 0
