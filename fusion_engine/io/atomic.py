"""An output folder that appears complete or not at all, and never takes another folder's place unasked.

The output is built in a hidden sibling, ``.<name>.partial-<host>-<pid>-<token>``, and renamed into place
once every file is written and flushed. On an exception the sibling is removed. A process killed outright
(SIGKILL, power loss) cannot clean up, so its sibling stays behind under a dot-name that no tool takes for a
checkpoint, and the next run into the same parent folder removes siblings whose process (same host) is gone.

Claiming the final path (no ``allow_overwrite``) is one atomic step that fails if anything is there:
``renameat2(RENAME_NOREPLACE)`` (Linux >= 3.15 on ext4, xfs, btrfs, tmpfs, ...). Where the kernel, libc or
file system lacks it, ``mkdir(final)`` claims the name instead (atomic and exclusive: it fails if anything is
there) and ``rename(tmp, final)`` then replaces that empty folder of ours (rename(2) replaces an empty folder
only). Either way, of N concurrent merges into one absent folder exactly one wins; the others fail with a
CheckpointError and remove only their own temp folder. (A crash between the fallback's two steps can leave an
empty output folder; never a partial one.)

Replacing an existing folder (``allow_overwrite``) swaps the new folder and the old one atomically
(``renameat2(RENAME_EXCHANGE)``), then deletes the old one from the temp name. The fallback renames the old
folder aside to ``.<name>.old-...``, renames the new one in, then deletes the old one; if the process dies
between the two renames, the next run finds the old folder and puts it back. Either way the final path holds
the old checkpoint or the complete new one, never neither, and the old one is deleted only after the new one
is in place.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
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


_AT_FDCWD = -100  # <fcntl.h>
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # <linux/fs.h>


@functools.lru_cache(maxsize=None)
def _libc_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28 / not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _renameat2(src: str, dst: str, flags: int) -> bool:
    """``renameat2(src, dst, flags)``: True when done, False where the kernel, libc or file system does not
    support it; any other failure raises OSError (EEXIST: ``dst`` exists under RENAME_NOREPLACE)."""
    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), src, None, dst)


def _claim(tmp: str, final_dir: str) -> None:
    """Rename ``tmp`` to ``final_dir`` if nothing is there, atomically; FileExistsError (or ENOTEMPTY)
    otherwise, with whatever is there left untouched (see the module docstring)."""
    if _renameat2(tmp, final_dir, _RENAME_NOREPLACE):
        return
    os.mkdir(final_dir)  # the claim: raises FileExistsError if anything is there
    try:
        os.rename(tmp, final_dir)  # replaces the empty folder just made, nothing else
    except OSError:
        with contextlib.suppress(OSError):
            os.rmdir(final_dir)  # still ours only while empty
        raise


def _replace(tmp: str, final_dir: str) -> str | None:
    """Put ``tmp`` at ``final_dir``, replacing what is there; returns where the old folder now is (None if
    there was none), for the caller to delete once the rename is on disk."""
    try:
        if _renameat2(tmp, final_dir, _RENAME_EXCHANGE):
            return tmp  # swapped: tmp holds the old folder
    except FileNotFoundError:  # nothing there to replace
        _claim(tmp, final_dir)
        return None
    old = _sibling(final_dir, _OLD)
    try:
        os.rename(final_dir, old)
    except FileNotFoundError:
        old = None
    try:
        os.rename(tmp, final_dir)
    except OSError as exc:
        if old is not None:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                # another overwrite landed between the two renames: a complete new output is in place, and
                # the folder moved aside was being replaced either way
                shutil.rmtree(old, ignore_errors=True)
            else:  # the rename itself failed: the old folder goes back (clean_stale_siblings would, later)
                with contextlib.suppress(OSError):
                    os.rename(old, final_dir)
        raise
    return old


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_not_input(final_dir: str, inputs: dict[str, str]) -> None:
    """Refuse an output path that is, contains, or lies inside a path the merge reads.

    ``inputs`` maps a label ("input model 'a'", ...) to a file or folder read; paths are compared after
    resolving symlinks. Raises CheckpointError naming the input and the fix.
    """
    out = os.path.realpath(final_dir)
    for label, path in inputs.items():
        src = os.path.realpath(path)
        relation = ("is" if out == src else "contains" if _inside(src, out) else
                    "is inside" if os.path.isdir(src) and _inside(out, src) else None)
        if relation:
            raise CheckpointError(f"output folder {final_dir} {relation} {label} ({path}), which this merge "
                                  f"reads; choose an output folder outside every input (inputs are never modified)")


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
        if kind == _OLD:
            try:
                _claim(path, final_dir)  # the killed overwrite never renamed the new folder in: restore
            except OSError:  # it did (or another run has since written the folder): the old one is obsolete
                shutil.rmtree(path, ignore_errors=True)
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
    """Rename the finished ``tmp`` into ``final_dir`` and flush the rename. Without ``allow_overwrite`` the
    path is claimed atomically: if anything is there (another merge won the race), CheckpointError and
    nothing but ``tmp`` is touched. With it, the old folder is swapped out, then deleted."""
    final_dir = check_output_dir(final_dir, allow_overwrite)
    _fsync_dir(tmp)
    try:
        old = _replace(tmp, final_dir) if allow_overwrite else _claim(tmp, final_dir)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
            raise CheckpointError(f"output folder {final_dir} appeared while this merge ran (another merge into "
                                  f"the same folder?); it was left as it is and this output discarded: choose "
                                  f"another path, or pass --allow-overwrite to replace it") from None
        raise CheckpointError(f"cannot move the output into {final_dir} ({exc.strerror or exc})") from None
    _fsync_dir(os.path.dirname(final_dir))
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
