"""``fusion-engine demo`` (the README's first command) and ``fusion-engine selftest``."""

from __future__ import annotations

import os

import pytest
import torch

from cli_fixtures import load_dir, run_cli, scratch
from fusion_engine.checkpoint.config import load_config


def test_demo_builds_merges_loads_and_generates(capsys):
    workdir = scratch("demo")
    assert run_cli("demo", "--workdir", workdir) == 0
    out = capsys.readouterr().out
    assert "token ids [" in out  # 12 greedy tokens from the merged model
    assert "built a tiny seeded Llama" in out and "ties: 39 tensors" in out and "greedy generation" in out
    # the demo went through the same config path as real checkpoints
    config = load_config(os.path.join(workdir, "merge.yaml"))
    assert config.merge_method == "ties" and len(config.models) == 3
    merged = load_dir(os.path.join(workdir, "merged"))
    assert len(merged) == 39 and all(t.dtype == torch.bfloat16 for t in merged.values())
    sizes = [os.path.getsize(os.path.join(workdir, "models", m, "model.safetensors"))
             for m in ("base", "model_0", "model_1", "model_2")]
    assert all(s < 2**20 for s in sizes)
    base = load_dir(os.path.join(workdir, "models", "base"))
    name = "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal(merged[name], base[name].to(torch.bfloat16))  # it merged something


@pytest.mark.slow  # the torch reference of every op on every backend: ~5-10 s on 2 cores
def test_selftest_runs_every_op(capsys):
    assert run_cli("selftest", "--models", "2") == 0
    out = capsys.readouterr().out
    for op in ("linear_merge", "task_arithmetic", "ties_merge", "dare_merge", "fisher_merge"):
        assert op in out
    assert "agree with the reference" in out
