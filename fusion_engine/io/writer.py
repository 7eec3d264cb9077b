"""Write a Hugging Face-style sharded safetensors checkpoint, tensor by tensor, in any order.

The layout is fixed before the first byte is written, from the names, dtypes and shapes alone
(:func:`plan_shards`): tensors fill shards in the given order, a new shard starting when the next tensor
would push the current one past ``max_shard_bytes`` (a tensor larger than the limit gets a shard of its own),
like ``transformers``' ``save_pretrained``. Each shard's header is therefore known up front: the file is
created at its final size and every tensor is written with ``pwrite`` at its own offset. So

* tensors can arrive in any order, from any thread or process (distributed merges split them between ranks),
  and the bytes on disk depend only on the layout, never on who wrote what when;
* memory holds only the tensor being written.

Within a shard, tensors are stored by decreasing element size (stable), so every tensor starts at an offset
aligned to its element size, and the header is padded with spaces to a multiple of 8 bytes, as the reference
implementation does. One shard is written as ``model.safetensors``; several as
``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ..errors import CheckpointError, DTypeMismatchError, ShapeMismatchError, brief_repr
from .checkpoint import SAFETENSORS_INDEX, SAFETENSORS_SINGLE
from .safetensors_reader import DTYPE_CODES

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MiB"``, ``"1e9"`` or an int -> bytes (decimal units like HF: 1GB = 10^9 B)."""
    if isinstance(text, int):
        size = text
    else:
        s = str(text).strip().upper().replace(" ", "")
        units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
                 "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9,
                 "T": 10**12, "B": 1}
        factor = 1
        for unit, value in units.items():
            if s.endswith(unit):
                s, factor = s[: -len(unit)], value
                break
        try:
            size = int(float(s) * factor)
        except (ValueError, OverflowError):  # not a number, nan, inf, 1e400
            raise CheckpointError(f"shard size {brief_repr(text)} is not a finite size (examples: 5GB, 500MB, "
                                  f"2GiB)") from None
    if size <= 0:
        raise CheckpointError(f"shard size {brief_repr(text)} must be positive")
    return size


@dataclass(frozen=True)
class TensorSlot:
    """Where one output tensor goes: shard index, absolute byte offset in that file, dtype, shape."""

    name: str
    shard: int
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class ShardLayout:
    """Every output file's name, header bytes and size, and every tensor's slot."""

    filenames: list[str]
    headers: list[bytes]
    file_sizes: list[int]
    slots: dict[str, TensorSlot]  # in write order: by shard, then offset

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.slots.values())

    def index_json(self) -> str:
        weight_map = {name: self.filenames[slot.shard] for name, slot in self.slots.items()}
        return json.dumps({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
                          indent=2, sort_keys=True) + "\n"


def _nbytes(dtype: torch.dtype, shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def plan_shards(entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                metadata: dict[str, str] | None = None) -> ShardLayout:
    """The deterministic layout of ``entries`` = [(name, dtype, shape), ...] in shards of at most
    ``max_shard_bytes`` data bytes (a single larger tensor gets its own shard)."""
    if max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    groups: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
    filled = 0
    seen = set()
    for name, dtype, shape in entries:
        if name in seen:
            raise CheckpointError(f"output tensor {name!r} is planned twice")
        seen.add(name)
        if dtype not in DTYPE_CODES:
            raise DTypeMismatchError(f"output tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        shape = tuple(int(s) for s in shape)
        size = _nbytes(dtype, shape)
        if groups[-1] and filled + size > max_shard_bytes:
            groups.append([])
            filled = 0
        groups[-1].append((name, dtype, shape, size))
        filled += size

    n = len(groups)
    filenames = ([SAFETENSORS_SINGLE] if n == 1 else
                 [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    headers, sizes, slots = [], [], {}
    meta = {"format": "pt", **(metadata or {})}
    for shard, group in enumerate(groups):
        ordered = sorted(group, key=lambda e: -torch.empty((), dtype=e[1]).element_size())  # stable
        header: dict = {"__metadata__": meta}
        offset = 0
        for name, dtype, shape, size in ordered:
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        data_start = 8 + len(raw)
        headers.append(len(raw).to_bytes(8, "little") + raw)
        sizes.append(data_start + offset)
        for name, dtype, shape, size in ordered:
            begin = header[name]["data_offsets"][0]
            slots[name] = TensorSlot(name, shard, data_start + begin, size, dtype, shape)
    return ShardLayout(filenames, headers, sizes, slots)


def _pwrite_all(fd: int, view: memoryview, offset: int, path: str) -> None:
    done, total = 0, len(view)
    while done < total:
        try:
            n = os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            raise CheckpointError(f"{path}: write failed ({exc.strerror or exc}; is the disk full?)") from None
        done += n


class ShardedWriter:
    """Writes the tensors of ``layout`` into ``out_dir``.

    ``create=True`` creates every shard file (header written, data region allocated); a process that joins
    an existing output (another rank of a distributed merge) passes ``create=False``. :meth:`add` may be
    called from several threads; :meth:`finish` checks that this writer wrote ``expected`` (default: all)
    tensors, flushes the files to disk and, with ``write_index``, writes the index of a multi-shard layout.
    """

    def __init__(self, out_dir: str, layout: ShardLayout, *, create: bool = True):
        self.out_dir = os.fspath(out_dir)
        self.layout = layout
        self.paths = [os.path.join(self.out_dir, f) for f in layout.filenames]
        self._fds: list[int] = []
        self.written: set[str] = set()
        try:
            for path, header, size in zip(self.paths, layout.headers, layout.file_sizes):
                fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o644)
                self._fds.append(fd)
                if create:
                    _pwrite_all(fd, memoryview(header), 0, path)
                    os.ftruncate(fd, size)
        except OSError as exc:
            self.close()
            raise CheckpointError(f"{self.out_dir}: cannot create the output shards ({exc.strerror or exc})") from None

    @classmethod
    def for_tensors(cls, out_dir: str, entries, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> "ShardedWriter":
        """A writer for [(name, dtype, shape), ...]: :func:`plan_shards` then create the files."""
        return cls(out_dir, plan_shards(entries, max_shard_bytes))

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (CPU; made contiguous) as ``name`` at its planned place."""
        slot = self.layout.slots.get(name)
        if slot is None:
            raise CheckpointError(f"tensor {name!r} is not in the planned output")
        if name in self.written:
            raise CheckpointError(f"tensor {name!r} written twice")
        if tensor.dtype != slot.dtype:
            raise DTypeMismatchError(f"tensor {name!r}: planned as {slot.dtype}, got {tensor.dtype}")
        if tuple(tensor.shape) != slot.shape:
            raise ShapeMismatchError(f"tensor {name!r}: planned shape {list(slot.shape)}, got {list(tensor.shape)}")
        if tensor.device.type != "cpu":
            raise CheckpointError(f"tensor {name!r}: copy it to the CPU before writing")
        if slot.nbytes:
            raw = tensor.detach().contiguous().view(-1).view(torch.uint8)
            _pwrite_all(self._fds[slot.shard], memoryview(raw.numpy()).cast("B"), slot.offset,
                        self.paths[slot.shard])
        self.written.add(name)

    def finish(self, *, expected=None, write_index: bool = True) -> list[str]:
        """Check completeness, fsync, close; write the index (several shards). Returns the file names."""
        expected = set(self.layout.slots) if expected is None else set(expected)
        missing = expected - self.written
        if missing:
            raise CheckpointError(f"{len(missing)} planned tensors were never written, e.g. {sorted(missing)[:3]}")
        for fd in self._fds:
            os.fsync(fd)
        self.close()
        names = list(self.layout.filenames)
        if write_index and len(names) > 1:
            write_file_synced(os.path.join(self.out_dir, SAFETENSORS_INDEX), self.layout.index_json().encode())
            names.append(SAFETENSORS_INDEX)
        return names

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_file_synced(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def save_sharded(state_dict: dict[str, torch.Tensor], out_dir: str,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write a whole state dict into ``out_dir`` (an existing folder) as sharded safetensors."""
    writer = ShardedWriter.for_tensors(out_dir, [(n, t.dtype, tuple(t.shape)) for n, t in state_dict.items()],
                                       max_shard_bytes)
    with writer:
        for name, tensor in state_dict.items():
            writer.add(name, tensor)
        return writer.finish()
