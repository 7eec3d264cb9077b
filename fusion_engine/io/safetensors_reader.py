"""A safetensors reader that treats every file as untrusted input.

File layout (https://github.com/huggingface/safetensors)::

    [8 bytes: N, little-endian u64][N bytes: UTF-8 JSON header][data section]

The header maps each tensor name to ``{"dtype": "BF16", "shape": [d0, d1, ...], "data_offsets": [begin, end]}``
with offsets relative to the start of the data section, plus an optional ``"__metadata__"`` map of strings.
Every field is checked before any byte of data is touched, by exactly the rules of the C reader
(``csrc/safetensors/header.cpp``; both run over the cases of ``fuzz/corpus``): the header length against the
file size, strict JSON (no key twice, integers only), each entry's fields, dtype, shape and byte range, and
the ranges against each other: they tile the data section, with no gap, no overlap and no trailing byte.
Anything wrong raises :class:`~fusion_engine.errors.CheckpointError` naming the file, the tensor and the fault.
Only regular files are opened (:func:`fusion_engine.io.files.open_input`): a named pipe cannot block.

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

from ..errors import CheckpointError, MissingTensorError, brief_repr
from .files import open_input

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
MAX_DIMS = 8  # FE_MAX_DIMS of the C library
INT64_MAX = 2**63 - 1
TENSOR_FIELDS = frozenset(("dtype", "shape", "data_offsets"))


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


class _Reject(Exception):
    """A header rule broken while decoding the JSON (turned into a CheckpointError naming the file)."""


def _object_without_duplicates(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _Reject(f"the key {brief_repr(key)} appears twice in one object")
        out[key] = value
    return out


def _non_negative_int(text: str) -> int:
    if text.startswith("-") or len(text) > len(str(INT64_MAX)) or int(text) > INT64_MAX:
        raise _Reject(f"the number {brief_repr(text)} is not an integer in [0, 2^63)")
    return int(text)


def _not_an_integer(text: str):
    raise _Reject(f"the number {brief_repr(text)} is not an integer (headers hold only integers)")


def _check_string(path: str, what: str, text: str) -> None:
    if "\x00" in text:
        raise _fail(path, f"{what} {brief_repr(text)} holds a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(path, f"{what} {brief_repr(text)} holds a lone UTF-16 surrogate") from None


def _decode_header(path: str, raw: bytes) -> dict:
    """The header's JSON object under the rules of the C reader (``csrc/safetensors/json.cpp``): strict
    UTF-8 without NUL or lone surrogates, no key twice in an object, numbers only as integers in
    [0, 2^63), and the object starting at the first byte (trailing whitespace is the padding)."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_object_without_duplicates,
                            parse_int=_non_negative_int, parse_float=_not_an_integer,
                            parse_constant=_not_an_integer)
    except _Reject as exc:
        raise _fail(path, f"bad header: {exc}") from None
    except RecursionError:
        raise _fail(path, "the header nests too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail(path, f"the header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _fail(path, f"the header is a JSON {'list' if isinstance(header, list) else type(header).__name__}, "
                          "not an object")
    if not raw.startswith(b"{"):
        raise _fail(path, "the header must start with '{' (no leading whitespace)")
    return header


def _tensor_entry(path: str, name: str, entry, data_size: int) -> tuple[int, int, tuple[int, ...], torch.dtype]:
    """``(begin, end, shape, dtype)`` of one header entry, checked as the C reader does
    (``csrc/safetensors/header.cpp``): exactly the fields dtype, shape and data_offsets; a known dtype;
    at most :data:`MAX_DIMS` dims; a byte size below 2^63; ``end - begin`` equal to it, inside the data."""
    where = f"tensor {brief_repr(name)}"
    _check_string(path, "the tensor name", name)
    if not isinstance(entry, dict):
        raise _fail(path, f"{where}: entry is not an object")
    if set(entry) != TENSOR_FIELDS:
        extra, missing = sorted(set(entry) - TENSOR_FIELDS), sorted(TENSOR_FIELDS - set(entry))
        raise _fail(path, f"{where}: " + (f"unknown field(s) {brief_repr(extra)}" if extra else
                                          f"missing field(s) {missing}") + " (it needs exactly dtype, shape "
                                          "and data_offsets)")
    code = entry["dtype"]
    if not isinstance(code, str) or code not in DTYPES:
        raise _fail(path, f"{where}: unknown dtype {brief_repr(code)} (supported: {', '.join(DTYPES)})")
    dtype, itemsize = DTYPES[code]
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(type(s) is int for s in shape) or len(shape) > MAX_DIMS:
        raise _fail(path, f"{where}: shape {brief_repr(shape)} is not a list of at most {MAX_DIMS} non-negative "
                          "integers")
    offsets = entry["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        raise _fail(path, f"{where}: data_offsets {brief_repr(offsets)} is not a pair of non-negative integers")
    nbytes = itemsize
    for s in shape:
        nbytes *= max(s, 1)
    if nbytes > INT64_MAX:
        raise _fail(path, f"{where}: shape {shape} of {code} is too large (2^63 bytes or more)")
    nbytes = 0 if 0 in shape else nbytes
    begin, end = offsets
    if end < begin or end - begin != nbytes:
        raise _fail(path, f"{where}: data_offsets {offsets} span {end - begin} bytes but shape {shape} "
                          f"of {code} needs {nbytes}")
    if end > data_size:
        raise _fail(path, f"{where}: data_offsets end at byte {end} of the data section, which has only "
                          f"{data_size} bytes")
    return begin, end, tuple(shape), dtype


def parse_header(path: str, fh=None) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and validate the header of the safetensors file at ``path``.

    Returns ``(tensors, metadata)``: name -> :class:`TensorInfo` in data-offset order, and the
    ``__metadata__`` strings (empty when absent). Raises CheckpointError on any inconsistency; the rules
    are exactly those of the C reader (``csrc/safetensors/header.cpp``), which ``fuzz/corpus`` checks.
    """
    path = os.fspath(path)
    own = fh is None
    try:
        if own:
            fh = open_input(path)
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
    header = _decode_header(path, raw)

    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(path, "__metadata__ must map strings to strings")
    for key, value in metadata.items():
        _check_string(path, "a __metadata__ key", key)
        _check_string(path, "a __metadata__ value", value)

    data_start = 8 + header_len
    data_size = file_size - data_start
    entries = sorted(((*_tensor_entry(path, name, entry, data_size), name) for name, entry in header.items()),
                     key=lambda e: (e[0], e[1]))
    expected, previous = 0, None  # the byte ranges must tile the data section: no gap, no overlap
    for begin, end, _, _, name in entries:
        if begin != expected:
            raise _fail(path, f"tensor {brief_repr(name)} starts at byte {begin} of the data section, expected "
                              f"{expected}: " + (f"it overlaps tensor {brief_repr(previous)}" if begin < expected
                                                 else "a gap of unused bytes"))
        expected, previous = end, name
    if expected != data_size:
        raise _fail(path, f"the tensors cover {expected} bytes but the data section has {data_size} "
                          f"(trailing bytes)")
    tensors = {name: TensorInfo(shape, dtype, path, data_start + begin, data_start + end)
               for begin, end, shape, dtype, name in entries}
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
            self._fh = open_input(self.path)
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
