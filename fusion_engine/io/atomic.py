"""An output folder that appears complete or not at all.

The output is built in a hidden sibling, ``.<name>.partial-<host>-<pid>-<token>``, and renamed into place
once every file is written and flushed. On an exception the sibling is removed. A process killed outright
(SIGKILL, power loss) cannot clean up, so its sibling stays behind under a dot-name that no tool takes for a
checkpoint, and the next run into the same parent folder removes siblings whose process (same host) is gone.

Replacing an existing folder (``allow_overwrite``) renames the old one aside to ``.<name>.old-...``, renames
the new one in, then deletes the old one; if the process dies between the two renames, the next run finds
the old folder and puts it back, so the final path always holds the old checkpoint or the new one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket

from ..errors import CheckpointError

_PARTIAL = "partial"
_OLD = "old"


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def _sibling(final_dir: str, kind: str) -> str:
    parent, base = os.path.split(final_dir)
    return os.path.join(parent, f".{base}.{kind}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clean_stale_siblings(final_dir: str) -> list[str]:
    """Remove the temp siblings of ``final_dir`` left by dead processes on this host; restore an old folder
    that a killed overwrite had renamed aside. Returns the paths removed or restored."""
    final_dir = os.path.abspath(final_dir)
    parent, base = os.path.split(final_dir)
    done = []
    try:
        names = os.listdir(parent)
    except OSError:
        return done
    prefix = f".{base}."
    for name in names:
        if not name.startswith(prefix):
            continue
        kind, _, rest = name[len(prefix):].partition("-")
        parts = rest.split("-")
        if kind not in (_PARTIAL, _OLD) or len(parts) != 3 or parts[0] != _host() or not parts[1].isdigit():
            continue
        if _pid_alive(int(parts[1])):
            continue
        path = os.path.join(parent, name)
        if kind == _OLD and not os.path.exists(final_dir):
            os.rename(path, final_dir)  # the killed overwrite never renamed the new folder in
        else:
            shutil.rmtree(path, ignore_errors=True)
        done.append(path)
    return done


def check_output_dir(final_dir: str, allow_overwrite: bool) -> str:
    """The absolute output path, after checking it may be (re)placed."""
    final_dir = os.path.abspath(os.fspath(final_dir))
    if os.path.lexists(final_dir):
        if not os.path.isdir(final_dir) or os.path.islink(final_dir):
            raise CheckpointError(f"output {final_dir} exists and is not a folder; choose another output path")
        if not allow_overwrite:
            raise CheckpointError(f"output folder {final_dir} already exists; remove it, choose another path, or "
                                  f"pass --allow-overwrite to replace it")
    return final_dir


def make_temp_dir(final_dir: str, allow_overwrite: bool = False) -> str:
    """Check ``final_dir``, clean stale siblings, and create the hidden sibling to build the output in."""
    final_dir = check_output_dir(final_dir, allow_overwrite)
    parent = os.path.dirname(final_dir)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create the parent folder of {final_dir} ({exc.strerror or exc})") from None
    clean_stale_siblings(final_dir)
    final_dir = check_output_dir(final_dir, allow_overwrite)  # a restored old folder counts as existing
    tmp = _sibling(final_dir, _PARTIAL)
    try:
        os.mkdir(tmp)
    except OSError as exc:
        raise CheckpointError(f"cannot create {tmp} ({exc.strerror or exc})") from None
    return tmp


def commit_temp_dir(tmp: str, final_dir: str, allow_overwrite: bool = False) -> None:
    """Rename the finished ``tmp`` into ``final_dir`` (replacing it when allowed) and flush the renames."""
    final_dir = check_output_dir(final_dir, allow_overwrite)
    parent = os.path.dirname(final_dir)
    _fsync_dir(tmp)
    old = None
    if os.path.exists(final_dir):
        old = _sibling(final_dir, _OLD)
        os.rename(final_dir, old)
    os.rename(tmp, final_dir)
    _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def discard_temp_dir(tmp: str) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(final_dir: str | os.PathLike, allow_overwrite: bool = False):
    """Yield a temp folder to fill; on success it becomes ``final_dir``, on any exception it is removed.

    Raises CheckpointError up front when ``final_dir`` exists and ``allow_overwrite`` is false.
    """
    final_dir = os.path.abspath(os.fspath(final_dir))
    tmp = make_temp_dir(final_dir, allow_overwrite)
    try:
        yield tmp
    except BaseException:
        discard_temp_dir(tmp)
        raise
    try:
        commit_temp_dir(tmp, final_dir, allow_overwrite)
    except BaseException:
        discard_temp_dir(tmp)
        raise
