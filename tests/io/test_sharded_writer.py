"""ShardedWriter and plan_shards: HF layout, any write order, byte-identical output, loud mistakes."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fusion_engine.errors import CheckpointError, DTypeMismatchError, ShapeMismatchError
from fusion_engine.io import ShardedWriter, open_checkpoint, parse_size, plan_shards, save_sharded

from io_testkit import state_dict, tree_digest


def _mixed():
    sd = state_dict(3)
    sd["counts"] = torch.arange(7, dtype=torch.int64)
    sd["mask"] = torch.tensor([True, False, True])
    sd["f32"] = torch.randn(5)
    sd["empty"] = torch.zeros(0, 3, dtype=torch.float16)
    return sd


def _entries(sd):
    return [(n, t.dtype, tuple(t.shape)) for n, t in sd.items()]


def test_single_shard_is_model_safetensors_readable_by_the_reference_library(tmp_path):
    sd = _mixed()
    files = save_sharded(sd, str(tmp_path))
    assert files == ["model.safetensors"] and os.listdir(tmp_path) == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    assert set(loaded) == set(sd) and all(torch.equal(loaded[n], sd[n]) for n in sd)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_sharding_follows_the_limit_and_writes_an_index(tmp_path):
    sd = state_dict(4)  # bf16: embed 1184 B, up_proj 768 B, norms 32 B
    files = save_sharded(sd, str(tmp_path), max_shard_bytes=1500)
    n = len(files) - 1
    assert files[-1] == "model.safetensors.index.json"
    assert files[:-1] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert set(index["weight_map"]) == set(sd)
    for fname in files[:-1]:
        part = load_file(tmp_path / fname)
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= 1500 or len(part) == 1
        assert all(index["weight_map"][k] == fname for k in part)
    with open_checkpoint(tmp_path) as ck:
        assert all(torch.equal(ck.read(k), v) for k, v in sd.items())


def test_layout_is_greedy_in_order_and_oversized_tensors_stand_alone():
    f32 = torch.float32
    layout = plan_shards([("a", f32, (10,)), ("b", f32, (10,)), ("big", f32, (100,)), ("c", f32, (5,))], 80)
    shard_of = {n: s.shard for n, s in layout.slots.items()}
    assert shard_of == {"a": 0, "b": 0, "big": 1, "c": 2}
    assert layout.filenames == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def test_alignment_and_header_padding():
    layout = plan_shards([("h", torch.bfloat16, (3,)), ("d", torch.float64, (2,)), ("m", torch.bool, (1,)),
                          ("f", torch.float32, (3,))])
    assert (len(layout.headers[0]) - 8) % 8 == 0
    for slot in layout.slots.values():
        assert slot.offset % torch.empty((), dtype=slot.dtype).element_size() == 0


def test_any_write_order_gives_identical_bytes(tmp_path):
    sd = _mixed()
    digests = []
    for seed in range(3):
        out = tmp_path / f"o{seed}"
        os.makedirs(out)
        names = list(sd)
        random.Random(seed).shuffle(names)
        with ShardedWriter.for_tensors(str(out), _entries(sd), 600) as w:
            for n in names:
                w.add(n, sd[n])
            w.finish()
        digests.append(tree_digest(out))
    assert digests[0] == digests[1] == digests[2]


def test_non_contiguous_input_is_written_by_value(tmp_path):
    t = torch.randn(6, 4).t()
    save_sharded({"t": t}, str(tmp_path))
    assert torch.equal(load_file(tmp_path / "model.safetensors")["t"], t)


def test_writer_mistakes_are_loud(tmp_path):
    sd = state_dict(5)
    with ShardedWriter.for_tensors(str(tmp_path), _entries(sd)) as w:
        with pytest.raises(CheckpointError, match="not in the planned output"):
            w.add("other", torch.zeros(1))
        with pytest.raises(DTypeMismatchError, match="lm_head.weight"):
            w.add("lm_head.weight", sd["lm_head.weight"].float())
        with pytest.raises(ShapeMismatchError, match="lm_head.weight"):
            w.add("lm_head.weight", sd["lm_head.weight"][:3])
        w.add("lm_head.weight", sd["lm_head.weight"])
        with pytest.raises(CheckpointError, match="twice"):
            w.add("lm_head.weight", sd["lm_head.weight"])
        with pytest.raises(CheckpointError, match="never written"):
            w.finish()
    with pytest.raises(CheckpointError, match="planned twice"):
        plan_shards([("a", torch.float32, (1,)), ("a", torch.float32, (1,))])
    with pytest.raises(CheckpointError, match="cannot create"):
        ShardedWriter.for_tensors(str(tmp_path), _entries(sd))  # the shard exists already


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 1024**3),
                                        ("1e6", 10**6), (1234, 1234), ("0.5 GB", 5 * 10**8)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "-1GB", "0", ""])
def test_parse_size_rejects(text):
    with pytest.raises(CheckpointError, match="size"):
        parse_size(text)
