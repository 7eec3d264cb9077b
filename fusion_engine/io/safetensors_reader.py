"""A safetensors reader that treats every file as untrusted input.

File layout (https://github.com/huggingface/safetensors)::

    [8 bytes: N, little-endian u64][N bytes: UTF-8 JSON header][data section]

The header maps each tensor name to ``{"dtype": "BF16", "shape": [d0, d1, ...], "data_offsets": [begin, end]}``
with offsets relative to the start of the data section, plus an optional ``"__metadata__"`` map of strings.
Every field is checked before any byte of data is touched: the header length against the file size, the JSON,
each dtype against :data:`DTYPES`, each shape (non-negative integers), each byte range against
``numel * itemsize`` and the data section, and ranges against each other (no two tensors share a byte).
Anything wrong raises :class:`~fusion_engine.errors.CheckpointError` naming the file, the tensor and the fault.

Tensors are read two ways:

* :meth:`SafetensorsFile.read` — ``pread`` into a fresh (or caller-given) buffer: no mapping, so the resident
  set holds only the tensors still alive. The executor uses this.
* :meth:`SafetensorsFile.mmap` — a zero-copy view of a private (copy-on-write) mapping: a caller that writes
  into it changes its own pages, never the file.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass

import torch

from ..errors import CheckpointError, MissingTensorError

# safetensors dtype code -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
for _code, _torch_name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                           ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _torch_name):
        DTYPES[_code] = (getattr(torch, _torch_name), torch.empty((), dtype=getattr(torch, _torch_name)).element_size())

DTYPE_CODES: dict[torch.dtype, str] = {dtype: code for code, (dtype, _) in DTYPES.items()}

# The largest header accepted: the safetensors crate's MAX_HEADER_SIZE. The C reader states the same
# number as kMaxHeaderBytes in csrc/safetensors/header.h (tests/io/test_safetensors_reader.py checks they agree).
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its shape, dtype, file, and absolute byte range in that file."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str
    begin: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _fail(path: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}; the file is truncated, corrupted or not a safetensors file "
                           f"(re-download or re-save it)")


def parse_header(path: str, fh=None) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and validate the header of the safetensors file at ``path``.

    Returns ``(tensors, metadata)``: name -> :class:`TensorInfo` in data-offset order, and the
    ``__metadata__`` strings (empty when absent). Raises CheckpointError on any inconsistency.
    """
    path = os.fspath(path)
    own = fh is None
    try:
        if own:
            fh = open(path, "rb")
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open ({exc.strerror or exc})") from exc
    try:
        file_size = os.fstat(fh.fileno()).st_size
        if file_size < 8:
            raise _fail(path, f"the file has {file_size} bytes, fewer than the 8-byte header length")
        fh.seek(0)
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > file_size - 8:
            raise _fail(path, f"the header length {header_len} exceeds the {file_size - 8} bytes after it")
        if header_len > MAX_HEADER_BYTES:
            raise _fail(path, f"the header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
        raw = fh.read(header_len)
        if len(raw) != header_len:
            raise _fail(path, "the header could not be read in full")
    finally:
        if own:
            fh.close()
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail(path, f"the header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _fail(path, f"the header is a JSON {type(header).__name__}, not an object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise _fail(path, "__metadata__ must map strings to strings")

    data_start = 8 + header_len
    data_size = file_size - data_start
    entries = []
    for name, entry in header.items():
        where = f"tensor {name!r}"
        if not isinstance(entry, dict):
            raise _fail(path, f"{where}: entry is not an object")
        code = entry.get("dtype")
        if not isinstance(code, str) or code not in DTYPES:
            raise _fail(path, f"{where}: unknown dtype {code!r} (supported: {', '.join(DTYPES)})")
        dtype, itemsize = DTYPES[code]
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise _fail(path, f"{where}: shape {shape!r} is not a list of non-negative integers")
        offsets = entry.get("data_offsets")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and o >= 0 for o in offsets)):
            raise _fail(path, f"{where}: data_offsets {offsets!r} is not a pair of non-negative integers")
        begin, end = offsets
        numel = 1
        for s in shape:
            numel *= s
        if end < begin or end - begin != numel * itemsize:
            raise _fail(path, f"{where}: data_offsets {offsets} span {end - begin} bytes but shape {shape} "
                              f"of {code} needs {numel * itemsize}")
        if end > data_size:
            raise _fail(path, f"{where}: data_offsets end at byte {end} of the data section, which has only "
                              f"{data_size} bytes")
        entries.append((begin, end, name, tuple(shape), dtype))

    entries.sort(key=lambda e: (e[0], e[1]))
    previous_end, previous_name = 0, None
    for begin, end, name, _, _ in entries:
        if begin < previous_end and end > begin:
            raise _fail(path, f"tensors {previous_name!r} and {name!r} overlap (bytes {begin}..{previous_end})")
        if end > begin:
            previous_end, previous_name = end, name
    tensors = {name: TensorInfo(shape, dtype, path, data_start + begin, data_start + end)
               for begin, end, name, shape, dtype in entries}
    return tensors, metadata


def _pread_into(fd: int, view: memoryview, offset: int, path: str) -> None:
    """Fill ``view`` from ``fd`` at ``offset``; short reads are retried, end of file is an error."""
    done = 0
    total = len(view)
    while done < total:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{path}: unexpected end of file at byte {offset + done} (the file shrank "
                                  f"while being read?)")
        done += n


class SafetensorsFile:
    """One open safetensors file: validated header, ``pread`` reads, optional copy-on-write mapping."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot open ({exc.strerror or exc})") from exc
        try:
            self.tensors, self.metadata = parse_header(self.path, self._fh)
        except BaseException:
            self._fh.close()
            raise
        self._mmap: mmap.mmap | None = None

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise MissingTensorError(f"{self.path}: no tensor named {name!r}") from None

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``name``, read with ``pread`` into ``out`` (any contiguous CPU tensor of at least
        ``nbytes`` bytes, e.g. a pinned buffer; reused as raw bytes) or into a new tensor."""
        info = self.info(name)
        if out is None:
            raw = torch.empty(info.nbytes, dtype=torch.uint8)
        else:
            if out.device.type != "cpu" or not out.is_contiguous():
                raise ValueError("out must be a contiguous CPU tensor")
            flat = out.view(-1).view(torch.uint8) if out.element_size() != 1 else out.view(-1)
            if flat.numel() < info.nbytes:
                raise ValueError(f"out holds {flat.numel()} bytes, {name!r} needs {info.nbytes}")
            raw = flat[: info.nbytes]
        if info.nbytes:
            _pread_into(self._fileno(), memoryview(raw.numpy()).cast("B"), info.begin, self.path)
        return raw.view(info.dtype).view(info.shape) if info.nbytes else torch.empty(info.shape, dtype=info.dtype)

    def mmap(self, name: str) -> torch.Tensor:
        """A zero-copy view of ``name`` in a private copy-on-write mapping: writes never reach the file."""
        info = self.info(name)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        if self._mmap is None:
            self._mmap = mmap.mmap(self._fileno(), 0, access=mmap.ACCESS_COPY)
        flat = torch.frombuffer(self._mmap, dtype=torch.uint8, count=info.nbytes, offset=info.begin)
        return flat.view(info.dtype).view(info.shape)

    def _fileno(self) -> int:
        if self._fh is None:
            raise CheckpointError(f"{self.path}: read after close")
        return self._fh.fileno()

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # tensors still view it: the mapping lives until they are freed
                pass
            self._mmap = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
