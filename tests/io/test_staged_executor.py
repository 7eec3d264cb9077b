"""The staged (device) pipeline of run_plan on an asynchronous fake device: the same bytes as the CPU merge,
bounded pinned memory, and every missing wait caught (the fake leaves garbage until a copy lands)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fusion_engine.checkpoint import executor
from fusion_engine.checkpoint.executor import run_plan

from fake_device import FakeTransfer
from io_testkit import SHAPES, linear_plan, state_dict, tree_digest, write_model

WEIGHTS = [0.5, 0.3, 0.2]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("staged_models")
    return {f"m{i}": write_model(root / f"m{i}", state_dict(20 + i), shards=1 + i % 2,
                                 fmt="bin" if i == 2 else "safetensors") for i in range(3)}


@pytest.fixture(scope="module")
def cpu_digest(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("staged_cpu") / "out"
    run_plan(linear_plan(models, WEIGHTS), out, quiet=True, out_shard_size=1500)
    return tree_digest(out)


def _staged(monkeypatch, models, out, fake, **kwargs):
    monkeypatch.setattr(executor, "transfer_for", lambda device: fake)
    try:
        run_plan(linear_plan(models, WEIGHTS), out, quiet=True, out_shard_size=1500, **kwargs)
    finally:
        fake.close()
    return tree_digest(out)


@pytest.mark.parametrize("max_in_flight", [1, 2, 4])
def test_staged_merge_writes_the_cpu_bytes_with_four_largest_tensors_of_pinned_memory(
        models, cpu_digest, tmp_path, monkeypatch, max_in_flight):
    fake = FakeTransfer()
    assert _staged(monkeypatch, models, tmp_path / "out", fake, max_in_flight=max_in_flight) == cpu_digest
    largest = max(r * c * 2 for r, c in (s if len(s) == 2 else (s[0], 1) for s in SHAPES.values()))
    assert fake.pinned_bytes == 4 * (-(-largest // 64) * 64)  # 2 input + 2 output slots, whatever the depth
    assert fake.consumed == len(SHAPES)


class _MergesBeforeInputsLand(FakeTransfer):
    def consume(self, event, tensors):
        self.consumed += 1


class _NeverWaitsOnTheHost(FakeTransfer):  # writes before D2H landed, refills slots before H2D read them
    def synchronize(self, event):
        pass


@pytest.mark.parametrize("broken", [_MergesBeforeInputsLand, _NeverWaitsOnTheHost])
def test_the_fake_device_catches_a_missing_wait(models, cpu_digest, tmp_path, monkeypatch, broken):
    assert _staged(monkeypatch, models, tmp_path / "out", broken(delay=0.02)) != cpu_digest


@pytest.mark.gpu
def test_cuda_merge_is_the_same_at_every_read_ahead_depth_and_close_to_the_cpu(models, cpu_digest, tmp_path):
    digests = set()
    for depth in (1, 2, 4):
        run_plan(linear_plan(models, WEIGHTS), tmp_path / f"cuda{depth}", quiet=True, device="cuda",
                 max_in_flight=depth)
        digests.add(tree_digest(tmp_path / f"cuda{depth}"))
    assert len(digests) == 1
    run_plan(linear_plan(models, WEIGHTS), tmp_path / "cpu", quiet=True)
    cpu, gpu = load_file(tmp_path / "cpu" / "model.safetensors"), load_file(tmp_path / "cuda1" / "model.safetensors")
    for k, v in cpu.items():
        torch.testing.assert_close(gpu[k], v, atol=1e-2, rtol=1e-2)  # bf16 outputs: at most one rounding apart
