"""Claiming the output folder: exactly one of concurrent merges wins, a folder not ours is never removed,
an overwrite never loses the old folder early, and the output never overlaps an input."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from fusion_engine.errors import CheckpointError
from fusion_engine.io import atomic
from fusion_engine.io.atomic import check_output_not_input, commit_temp_dir, make_temp_dir

from io_testkit import tree_digest

N_RACERS = 4


@pytest.fixture(params=["renameat2", "fallback"])
def protocol(request, monkeypatch):
    """Each test runs with renameat2 and with the mkdir-claim fallback (as where renameat2 is missing)."""
    if request.param == "renameat2":
        if atomic._libc_renameat2() is None:
            pytest.skip("no renameat2 in this libc")
    else:
        monkeypatch.setattr(atomic, "_libc_renameat2", lambda: None)
    return request.param


def _racer(final: str, token: str, barrier, allow_overwrite: bool, results) -> None:
    tmp = make_temp_dir(final, allow_overwrite)
    with open(os.path.join(tmp, "who.txt"), "w") as fh:
        fh.write(token)
    barrier.wait()
    try:
        commit_temp_dir(tmp, final, allow_overwrite)
        results.put((token, "won"))
    except CheckpointError as exc:
        atomic.discard_temp_dir(tmp)
        results.put((token, str(exc)))


def _race(final: str, allow_overwrite: bool) -> list[tuple[str, str]]:
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(N_RACERS), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(final, f"racer{i}", barrier, allow_overwrite, results))
             for i in range(N_RACERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return [results.get(timeout=5) for _ in procs]


def test_concurrent_commits_into_one_absent_folder_one_wins(tmp_path, protocol):
    """All racers built their output before any committed; the commits race on the final name."""
    final = str(tmp_path / "out")
    outcome = _race(final, allow_overwrite=False)
    winners = [token for token, result in outcome if result == "won"]
    assert len(winners) == 1, outcome
    for token, result in outcome:
        assert result == "won" or "appeared while this merge ran" in result or "already exists" in result
    assert os.listdir(final) == ["who.txt"] and open(os.path.join(final, "who.txt")).read() == winners[0]
    assert os.listdir(tmp_path) == ["out"]  # no temp folder left behind


def test_a_folder_that_appears_before_the_commit_is_never_removed(tmp_path, protocol):
    final = tmp_path / "out"
    tmp = make_temp_dir(str(final))
    (final).mkdir()  # another process's output, or an empty folder someone made
    for i in range(2):
        (final / f"theirs{i}.txt").write_text("keep")
    before = tree_digest(final)
    with pytest.raises(CheckpointError, match="already exists"):
        commit_temp_dir(tmp, str(final))
    # past the first check (the folder appears between the check and the rename): still untouched
    original = atomic.check_output_dir
    atomic.check_output_dir = lambda path, allow: os.path.abspath(path)
    try:
        with pytest.raises(CheckpointError, match="appeared while this merge ran"):
            commit_temp_dir(tmp, str(final))
        empty = tmp_path / "empty"
        empty.mkdir()
        tmp2 = make_temp_dir(str(tmp_path / "other"))
        with pytest.raises(CheckpointError, match="appeared while this merge ran"):
            commit_temp_dir(tmp2, str(empty))  # not even an empty folder is replaced
    finally:
        atomic.check_output_dir = original
    assert tree_digest(final) == before and os.listdir(empty) == []


def test_concurrent_overwrites_leave_one_complete_folder(tmp_path, protocol):
    final = tmp_path / "out"
    final.mkdir()
    (final / "who.txt").write_text("old")
    outcome = _race(str(final), allow_overwrite=True)
    winners = [token for token, result in outcome if result == "won"]
    if protocol == "renameat2":  # RENAME_EXCHANGE: every overwrite lands, one after another
        assert len(winners) == len(outcome), outcome
    else:  # rename-aside then rename-in: a racer that finds the name taken in between gives up cleanly
        assert winners, outcome
        assert all(result == "won" or "appeared while this merge ran" in result for _, result in outcome), outcome
    assert os.listdir(final) == ["who.txt"] and (final / "who.txt").read_text() in winners
    assert os.listdir(tmp_path) == ["out"]


def test_an_overwrite_keeps_the_old_folder_until_the_new_one_is_in(tmp_path, protocol, monkeypatch):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp = make_temp_dir(str(final), allow_overwrite=True)
    (tmp_path / tmp / "new.txt").write_text("new")
    seen = []
    rmtree = atomic.shutil.rmtree
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda path, **kw: (seen.append(sorted(os.listdir(final))),
                                                                      rmtree(path, **kw)))
    commit_temp_dir(tmp, str(final), allow_overwrite=True)
    assert seen == [["new.txt"]]  # the old folder was deleted once the new one was in place
    assert os.listdir(final) == ["new.txt"] and os.listdir(tmp_path) == ["out"]


def _tree(root):
    (root / "model").mkdir(parents=True)
    (root / "model" / "model.safetensors").write_bytes(b"x")
    (root / "tok").mkdir()
    (root / "tok" / "tokenizer.json").write_text("{}")
    (root / "config.yml").write_text("merge_method: linear")
    os.symlink(root / "model", root / "link")
    return {"the input model 'm'": str(root / "model"),
            "the source of side file tokenizer.json": str(root / "tok" / "tokenizer.json"),
            "the source of side file mergekit_config.yml": str(root / "config.yml")}


@pytest.mark.parametrize("out, relation", [
    ("model", "is the input model"), ("link", "is the input model"), ("model/sub", "is inside the input model"),
    (".", "contains the input model"), ("tok", "contains the source of side file tokenizer.json"),
    ("tok/tokenizer.json", "is the source of side file tokenizer.json"),
])
def test_an_output_overlapping_an_input_is_refused(tmp_path, out, relation):
    inputs = _tree(tmp_path)
    with pytest.raises(CheckpointError, match=f"{relation}.*choose an output folder outside every input"):
        check_output_not_input(str(tmp_path / out), inputs)


def test_an_output_beside_the_inputs_is_fine(tmp_path):
    inputs = _tree(tmp_path)
    check_output_not_input(str(tmp_path / "merged"), inputs)  # beside the config file: a normal layout
    check_output_not_input(str(tmp_path / "modelx"), inputs)  # a name prefix is not a parent


def test_an_overwrite_that_loses_between_its_two_renames_leaves_nothing_behind(tmp_path, monkeypatch):
    """The fallback overwrite renames the old folder aside, then its own in; when another overwrite lands
    in between, it gives up and drops what it moved aside (that was being replaced either way): no
    ``.out.old-*`` folder is left, and the other output stays."""
    monkeypatch.setattr(atomic, "_libc_renameat2", lambda: None)
    final = tmp_path / "out"
    final.mkdir()
    (final / "who.txt").write_text("old")
    tmp = make_temp_dir(str(final), True)
    with open(os.path.join(tmp, "who.txt"), "w") as fh:
        fh.write("mine")
    real_rename = os.rename

    def rename(src, dst):
        real_rename(src, dst)
        if os.path.basename(dst).startswith(".out.old"):  # just moved aside: another merge lands now
            theirs = tmp_path / "theirs"
            theirs.mkdir()
            (theirs / "who.txt").write_text("theirs")
            real_rename(theirs, final)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(CheckpointError, match="appeared while this merge ran"):
        commit_temp_dir(tmp, str(final), allow_overwrite=True)
    monkeypatch.setattr(atomic.os, "rename", real_rename)
    atomic.discard_temp_dir(tmp)
    assert os.listdir(final) == ["who.txt"] and (final / "who.txt").read_text() == "theirs"
    assert os.listdir(tmp_path) == ["out"]
