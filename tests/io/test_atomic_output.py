"""atomic_output_dir: complete output or none, on success, exceptions, existing folders and SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fusion_engine.errors import CheckpointError
from fusion_engine.io import atomic_output_dir, clean_stale_siblings
from fusion_engine.io.atomic import _host

from io_testkit import state_dict, write_model


def _siblings(parent):
    return sorted(n for n in os.listdir(parent) if n.startswith("."))


def test_success_renames_into_place(tmp_path):
    final = tmp_path / "out"
    with atomic_output_dir(final) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and os.path.basename(tmp).startswith(".out.partial-")
        assert not final.exists()
        (tmp_path / tmp / "f.txt").write_text("x")
    assert (final / "f.txt").read_text() == "x" and _siblings(tmp_path) == []


def test_exception_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp_path / tmp / "f.txt").write_text("partial")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_existing_output_needs_allow_overwrite(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(CheckpointError, match="already exists.*--allow-overwrite"):
        with atomic_output_dir(final):
            pass
    with pytest.raises(RuntimeError):  # a failed overwrite keeps the old folder
        with atomic_output_dir(final, allow_overwrite=True):
            raise RuntimeError("boom")
    assert (final / "old.txt").read_text() == "old"
    with atomic_output_dir(final, allow_overwrite=True) as tmp:
        (tmp_path / tmp / "new.txt").write_text("new")
    assert os.listdir(final) == ["new.txt"] and _siblings(tmp_path) == []
    (tmp_path / "afile").write_text("")
    with pytest.raises(CheckpointError, match="not a folder"):
        with atomic_output_dir(tmp_path / "afile", allow_overwrite=True):
            pass


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_siblings_of_dead_processes_are_cleaned_and_old_output_restored(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".out.partial-{_host()}-{dead}-abcd1234"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    alive = tmp_path / f".out.partial-{_host()}-{os.getpid()}-abcd1234"
    alive.mkdir()
    old = tmp_path / f".out.old-{_host()}-{dead}-abcd1234"  # killed between the two renames of an overwrite
    old.mkdir()
    (old / "keep.txt").write_text("previous output")
    unrelated = tmp_path / ".other.partial-x-1-y"
    unrelated.mkdir()
    cleaned = clean_stale_siblings(str(tmp_path / "out"))
    assert sorted(map(os.path.basename, cleaned)) == sorted([stale.name, old.name])
    assert not stale.exists() and alive.exists() and unrelated.exists()
    assert (tmp_path / "out" / "keep.txt").read_text() == "previous output"


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {testdir!r})
    import fusion_engine.checkpoint.executor as ex
    from io_testkit import linear_plan
    merge = ex.merge_job
    def slow_merge(job, inputs):
        print("MERGING", flush=True)
        time.sleep(0.3)
        return merge(job, inputs)
    ex.merge_job = slow_merge
    plan = linear_plan({{"a": {a!r}, "b": {b!r}}}, [1.0, 1.0])
    ex.run_plan(plan, {out!r}, quiet=True, out_shard_size=1000)
    print("DONE", flush=True)
""")


def test_sigkill_mid_merge_leaves_no_partial_output(tmp_path):
    from fusion_engine.checkpoint.executor import run_plan

    from io_testkit import linear_plan

    a = write_model(tmp_path / "a", state_dict(0))
    b = write_model(tmp_path / "b", state_dict(1))
    out = tmp_path / "merged"
    script = KILL_SCRIPT.format(testdir=os.path.dirname(__file__), a=a, b=b, out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        seen = 0
        while seen < 3:  # a few tensors in: shard files exist in the temp folder
            line = proc.stdout.readline()
            assert line, "the merge process ended early"
            seen += line.startswith("MERGING")
        partial = [n for n in os.listdir(tmp_path) if n.startswith(".merged.partial-")]
        assert partial and os.listdir(tmp_path / partial[0])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert not out.exists()
    # the leftover is hidden and is swept by the next run into the same place
    summary = run_plan(linear_plan({"a": a, "b": b}, [1.0, 1.0]), out, quiet=True, out_shard_size=1000)
    assert summary["tensors"] == 6 and out.exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []
