"""Opening input files: regular files only, never blocking, every failure a message naming the file.

Every reader of an input file (safetensors files, index and ``config.json`` JSON, ``.bin`` weights, the
YAML config, tokenizer and other side files) opens it with :func:`open_input`: ``open(O_NONBLOCK)``, so a
named pipe, a socket or a device in place of a file cannot block the process, then ``fstat`` must report a
regular file (as the C reader, ``csrc/safetensors/reader.cpp``, checks), then the descriptor is switched
back to blocking reads. :func:`read_json_object` reads a JSON object file through it.
"""

from __future__ import annotations

import errno
import json
import os
import stat

from ..errors import CheckpointError

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def open_input(path: str | os.PathLike, mode: str = "rb", encoding: str | None = None):
    """Open the regular file ``path`` for reading (``mode`` "rb" or "r"); raises OSError otherwise.

    A path that is not a regular file raises ``OSError(EINVAL)`` whose ``strerror`` says what it is,
    without blocking (a FIFO is opened non-blocking and rejected).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode_bits = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode_bits):
            kind = next((name for test, name in _KINDS if test(mode_bits)), "not a file")
            raise OSError(errno.EINVAL, f"not a regular file ({kind})", os.fspath(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode, encoding=encoding)
    except BaseException:
        os.close(fd)
        raise


def read_json_object(path: str, what: str) -> dict:
    """The JSON object in the file ``path`` (``what`` names it for messages, e.g. "a model config").

    Raises CheckpointError naming the file for a missing or non-regular file, bad UTF-8 or JSON,
    nesting too deep to parse, or a top-level value that is not an object.
    """
    try:
        with open_input(path, "r", encoding="utf-8") as fh:
            value = json.load(fh)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: {what} nests too deeply to parse; the file is corrupted "
                              f"(re-download or re-save it)") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({exc}); fix or re-download the file") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object ({{...}}), not a JSON "
                              f"{'list' if isinstance(value, list) else type(value).__name__}; fix or re-download "
                              f"the file")
    return value
