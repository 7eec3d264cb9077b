"""Multi-process merges (gloo): the same bytes as one process; a failure on any rank leaves no output."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest

import torch

from fusion_engine.checkpoint import distributed
from fusion_engine.checkpoint.distributed import group_backend, rank_device, split_by_bytes
from fusion_engine.errors import CheckpointError
from fusion_engine.checkpoint.executor import run_plan

from io_testkit import linear_plan, state_dict, tree_digest, write_model
from utils import launch_ranks

WEIGHTS = [0.5, 0.3, 0.2]

RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {testdir!r})
    from fusion_engine.checkpoint.executor import run_plan
    from io_testkit import linear_plan
    plan = linear_plan({models!r}, {weights!r})
    if {bad_task} is not None:
        plan.tasks[{bad_task}].shape = (1, 2, 3)
    summary = run_plan(plan, {out!r}, quiet=True, out_shard_size={shard}, device={device!r})
    print("SUMMARY " + json.dumps(summary), flush=True)
""")


def _run_ranks(world, models, out, shard, bad_task=None, device="cpu"):
    script = RANK_SCRIPT.format(testdir=os.path.dirname(__file__), models=models, weights=WEIGHTS, out=str(out),
                                shard=shard, bad_task=bad_task, device=device)
    results = []
    for rc, stdout, stderr in launch_ranks([sys.executable, "-c", script], world):
        summary = next((json.loads(line[8:]) for line in stdout.splitlines() if line.startswith("SUMMARY ")), None)
        results.append((rc, summary, stderr))
    return results


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_models")
    return {f"m{i}": write_model(root / f"m{i}", state_dict(10 + i), shards=1 + i % 2) for i in range(3)}


# one file is the same protocol as several (the writer's layouts are tested in test_sharded_writer.py):
# that case runs with the slow tests
@pytest.mark.parametrize("shard", [1500, pytest.param(10**9, marks=pytest.mark.slow)], ids=["sharded", "single_file"])
def test_two_process_gloo_merge_equals_single_process_byte_for_byte(models, tmp_path, shard):
    run_plan(linear_plan(models, WEIGHTS), tmp_path / "single", quiet=True, out_shard_size=shard)
    results = _run_ranks(2, models, tmp_path / "dist", shard)
    for rc, summary, stderr in results:
        assert rc == 0, stderr
        assert summary["world_size"] == 2
    assert sum(s["rank_tensors"] for _, s, _ in results) == 6
    assert all(s["rank_tensors"] > 0 for _, s, _ in results)
    assert tree_digest(tmp_path / "dist") == tree_digest(tmp_path / "single")
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


@pytest.mark.gpu
def test_two_ranks_on_cuda_equal_one_process_on_cuda_byte_for_byte(models, tmp_path):
    """torchrun on one GPU or several: each rank on cuda:LOCAL_RANK (modulo the GPUs), NCCL or gloo."""
    run_plan(linear_plan(models, WEIGHTS), tmp_path / "single", quiet=True, out_shard_size=1500, device="cuda")
    results = _run_ranks(2, models, tmp_path / "dist", 1500, device="cuda")
    for rc, summary, stderr in results:
        assert rc == 0, stderr
        assert summary["device"].startswith("cuda")
    assert tree_digest(tmp_path / "dist") == tree_digest(tmp_path / "single")


def test_a_failing_rank_leaves_no_output(models, tmp_path):
    results = _run_ranks(2, models, tmp_path / "dist", 1500, bad_task=5)  # the last task: rank 1's share
    assert all(rc != 0 for rc, _, _ in results)
    assert "ShapeMismatchError" in results[1][2]
    assert "failed while merging on rank 1" in results[0][2]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("costs, world, want", [
    ([10] * 4, 2, [(0, 2), (2, 4)]),
    ([100, 1, 1, 1], 2, [(0, 1), (1, 4)]),
    ([1, 1, 1, 100], 2, [(0, 3), (3, 4)]),
    ([5], 3, [(0, 0), (0, 1), (1, 1)]),  # the midpoint of the one task lies in the middle share
    ([], 2, [(0, 0), (0, 0)]),
    ([3, 3, 3, 3, 3, 3], 3, [(0, 2), (2, 4), (4, 6)]),
])
def test_split_by_bytes(costs, world, want):
    ranges = split_by_bytes(costs, world)
    assert [(r.start, r.stop) for r in ranges] == want


@pytest.mark.parametrize("device, local_rank, count, want", [
    ("cuda", 1, 2, "cuda:1"), ("cuda", 3, 2, "cuda:1"), ("cuda", 1, 1, "cuda:0"),  # N ranks may share one GPU
    ("cuda:0", 1, 2, "cuda:0"), ("cpu", 1, 0, "cpu"),
])
def test_rank_device_is_local_rank_modulo_the_gpus(device, local_rank, count, want):
    assert rank_device(device, local_rank, count) == torch.device(want)


def test_rank_device_without_a_gpu_is_a_clear_error():
    with pytest.raises(CheckpointError, match="no CUDA GPU"):
        rank_device("cuda", 0, 0)


@pytest.mark.parametrize("device, local_world, count, want", [
    ("cuda:1", 2, 2, "nccl"), ("cuda:0", 2, 1, "gloo"), ("cpu", 2, 0, "gloo"), ("cuda:0", 8, 8, "nccl"),
])
def test_group_backend_nccl_only_when_each_rank_has_its_own_gpu(device, local_world, count, want):
    assert group_backend(torch.device(device), local_world, count) == want


def test_init_group_pins_the_rank_to_its_gpu_and_joins_nccl(monkeypatch):
    import torch.distributed as dist

    calls = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(("init", kw)))
    created, device = distributed.init_group("cuda")
    assert created and device == torch.device("cuda:1")
    assert calls == [("set_device", torch.device("cuda:1")),
                     ("init", {"backend": "nccl", "device_id": torch.device("cuda:1")})]
