"""The safetensors reader and open_checkpoint: every layout, every dtype, and untrusted (broken) files."""

from __future__ import annotations

import json
import os
import re
import struct

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from fusion_engine.errors import CheckpointError, MissingTensorError
from fusion_engine.io import DTYPES, open_checkpoint, parse_header

from io_testkit import state_dict, tree_digest, write_model
from utils import SAFETENSORS_CORPUS, corpus_case

ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool]


def _sample(dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g).to(dtype)


def test_dtype_table_covers_the_issue_list():
    for code in ("BF16", "F16", "F32", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL"):
        assert code in DTYPES


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_round_trips_by_read_and_mmap(tmp_path, dtype):
    tensors = {"a": _sample(dtype, (3, 5)), "odd": _sample(dtype, (7,), 1), "empty": _sample(dtype, (0, 4)),
               "scalar": _sample(dtype, (), 2)}
    save_file(tensors, tmp_path / "m.safetensors")
    with open_checkpoint(tmp_path / "m.safetensors") as ck:
        assert sorted(ck.names()) == sorted(tensors)
        for name, t in tensors.items():
            info = ck.info(name)
            assert info.shape == tuple(t.shape) and info.dtype == dtype
            assert torch.equal(ck.read(name), t)
            assert torch.equal(ck.load(name), t)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_read_into_a_reused_buffer(tmp_path, fmt):
    sd = state_dict(0)
    folder = write_model(tmp_path / "m", sd, fmt=fmt)
    buf = torch.empty(10_000, dtype=torch.uint8)
    with open_checkpoint(folder) as ck:
        for name, t in sd.items():
            got = ck.read(name, buf)
            assert torch.equal(got, t) and got.data_ptr() == buf.data_ptr()
        with pytest.raises(ValueError, match="needs"):
            ck.read("lm_head.weight", torch.empty(3, dtype=torch.uint8))


def test_load_is_copy_on_write_and_inputs_never_change(tmp_path):
    sd = state_dict(1)
    folder = write_model(tmp_path / "m", sd)
    before = tree_digest(folder)
    with open_checkpoint(folder) as ck:
        t = ck.load("lm_head.weight")
        t.mul_(0).add_(7)  # writes land in private pages
        assert torch.equal(ck.read("lm_head.weight"), sd["lm_head.weight"])
    with open_checkpoint(folder) as ck:
        assert torch.equal(ck.load("lm_head.weight"), sd["lm_head.weight"])
    assert tree_digest(folder) == before


@pytest.mark.parametrize("layout", ["single", "sharded", "bin", "loose"])
def test_open_checkpoint_layouts(tmp_path, layout):
    sd = state_dict(2)
    if layout == "loose":  # several safetensors files without an index
        os.makedirs(tmp_path / "m")
        names = list(sd)
        save_file({n: sd[n] for n in names[:3]}, tmp_path / "m" / "a.safetensors")
        save_file({n: sd[n] for n in names[3:]}, tmp_path / "m" / "b.safetensors")
        folder = str(tmp_path / "m")
    else:
        folder = write_model(tmp_path / "m", sd, shards=3 if layout == "sharded" else 1,
                             fmt="bin" if layout == "bin" else "safetensors")
    with open_checkpoint(folder) as ck:
        assert sorted(ck.names()) == sorted(sd)
        assert ck.config() == ({"model_type": "llama", "hidden_size": 16} if layout != "loose" else None)
        for name, t in sd.items():
            assert ck.info(name).shape == tuple(t.shape) and ck.info(name).dtype == t.dtype
            assert torch.equal(ck.read(name), t) and torch.equal(ck.load(name), t)
        with pytest.raises(MissingTensorError, match="nope"):
            ck.info("nope")
    if layout == "sharded":  # the index file itself also opens the checkpoint
        with open_checkpoint(os.path.join(folder, "model.safetensors.index.json")) as ck:
            assert sorted(ck.names()) == sorted(sd)


def test_missing_paths_and_shards_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "absent")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no weights found"):
        open_checkpoint(tmp_path / "empty")
    folder = write_model(tmp_path / "m", state_dict(0), shards=2)
    os.remove(os.path.join(folder, "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*does not exist"):
        open_checkpoint(folder)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
        json.dump({"weight_map": {"x": "../../etc/passwd"}}, fh)
    with pytest.raises(CheckpointError, match="leaves the checkpoint folder"):
        open_checkpoint(folder)
    (tmp_path / "junk.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match="junk.bin"):
        open_checkpoint(tmp_path / "junk.bin")


def _raw_file(path, header, data=b"", header_len=None):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize("case, match", [
    ("tiny", "fewer than the 8-byte header length"),
    ("header_too_long", "header length .* exceeds"),
    ("not_json", "not valid UTF-8 JSON"),
    ("not_object", "JSON list"),
    ("unknown_dtype", "unknown dtype 'F128'"),
    ("bad_shape", "shape"),
    ("offsets_vs_shape", "needs 8"),
    ("out_of_range", "data section, which has only 8 bytes"),
    ("overlap", "overlap"),
    ("bad_metadata", "__metadata__"),
    ("truncated", "data section"),
])
def test_corrupted_files_raise_checkpoint_error_naming_the_file(tmp_path, case, match):
    p = tmp_path / f"{case}.safetensors"
    if case == "tiny":
        p.write_bytes(b"\x01\x02")
    elif case == "header_too_long":
        _raw_file(p, {"a": _entry()}, b"\0" * 8, header_len=10**6)
    elif case == "not_json":
        _raw_file(p, b"{not json", b"")
    elif case == "not_object":
        _raw_file(p, [1, 2])
    elif case == "unknown_dtype":
        _raw_file(p, {"a": _entry("F128")}, b"\0" * 8)
    elif case == "bad_shape":
        _raw_file(p, {"a": _entry(shape=(-2,))}, b"\0" * 8)
    elif case == "offsets_vs_shape":
        _raw_file(p, {"a": _entry(offsets=(0, 6))}, b"\0" * 8)
    elif case == "out_of_range":
        _raw_file(p, {"a": _entry(offsets=(8, 16))}, b"\0" * 8)
    elif case == "overlap":
        _raw_file(p, {"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(4, 12))}, b"\0" * 12)
    elif case == "bad_metadata":
        _raw_file(p, {"__metadata__": {"k": 1}, "a": _entry()}, b"\0" * 8)
    elif case == "truncated":
        save_file(state_dict(0), p)
        p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=match) as info:
        open_checkpoint(p)
    assert str(p) in str(info.value)


def test_python_and_c_readers_share_one_header_limit():
    from fusion_engine.io.safetensors_reader import MAX_HEADER_BYTES

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "csrc", "safetensors", "header.h"), encoding="utf-8") as fh:
        c_limit = re.search(r"kMaxHeaderBytes\s*=\s*([\d']+)", fh.read())[1]
    assert MAX_HEADER_BYTES == int(c_limit.replace("'", "")) == 100_000_000  # the safetensors crate's limit


def test_valid_raw_file_parses(tmp_path):
    p = _raw_file(tmp_path / "ok.safetensors", {"__metadata__": {"k": "v"}, "b": _entry(offsets=(8, 16)),
                                                "a": _entry()}, struct.pack("<4f", 1, 2, 3, 4))
    tensors, metadata = parse_header(str(p))
    assert list(tensors) == ["a", "b"] and metadata == {"k": "v"}
    with open_checkpoint(p) as ck:
        assert ck.read("b").tolist() == [3.0, 4.0]


@given(st.data())
def test_fuzzed_headers_never_escape_as_other_errors(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("fuzz")
    p = folder / "f.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(2, 3, dtype=torch.bfloat16)}, p)
    raw = bytearray(p.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, min(len(raw) - 1, 120)))
        raw[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    p.write_bytes(bytes(raw))
    try:
        with open_checkpoint(p) as ck:
            for name in ck.names():
                info = ck.info(name)
                assert info.end <= os.path.getsize(p)
                ck.read(name)
    except CheckpointError as exc:
        assert str(p) in str(exc)


@pytest.mark.parametrize("path, opens", [corpus_case(p) for p in SAFETENSORS_CORPUS])
def test_corpus_verdicts_are_the_c_readers(path, opens):
    """One list of cases for both readers (fuzz/corpus; the C side runs in tests/test_c_api.py)."""
    if opens:
        tensors, _ = parse_header(str(path))
        assert sum(t.nbytes for t in tensors.values()) == os.path.getsize(path) - 8 - struct.unpack(
            "<Q", path.read_bytes()[:8])[0]
    else:
        with pytest.raises(CheckpointError) as info:
            parse_header(str(path))
        assert str(path) in str(info.value)


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_non_regular_file_is_rejected_without_blocking(tmp_path, kind):
    """A named pipe in place of any input file fails at once (opened non-blocking, then fstat), as in C."""
    folder = write_model(tmp_path / "m", state_dict(0), shards=2)
    victims = ["model-00001-of-00002.safetensors", "model.safetensors.index.json", "config.json"]
    for name in victims:
        path = os.path.join(folder, name)
        saved = path + ".saved"
        os.rename(path, saved)
        os.mkfifo(path) if kind == "fifo" else os.mkdir(path)
        try:
            with pytest.raises(CheckpointError, match=f"{name}.*not a regular file"):
                with open_checkpoint(folder) as ck:
                    ck.config()
                    for tensor in ck.names():
                        ck.info(tensor)
        finally:
            os.rmdir(path) if kind == "folder" else os.remove(path)
            os.rename(saved, path)
    if kind == "fifo":  # named directly (a folder named so is opened as a checkpoint folder)
        for name in ("model.safetensors", "w.bin"):
            os.mkfifo(tmp_path / name)
            with pytest.raises(CheckpointError, match=f"{name}.*not a regular file"):
                open_checkpoint(tmp_path / name)


@pytest.mark.parametrize("text, match", [("[1, 2]", "must be a JSON object"), ("[" * 100_000 + "]" * 100_000,
                                                                              "nests too deeply"),
                                         ("{", "not valid JSON")])
def test_bad_config_json_is_a_checkpoint_error(tmp_path, text, match):
    folder = write_model(tmp_path / "m", state_dict(0))
    (tmp_path / "m" / "config.json").write_text(text)
    with open_checkpoint(folder) as ck, pytest.raises(CheckpointError, match=match) as info:
        ck.config()
    assert "config.json" in str(info.value)
