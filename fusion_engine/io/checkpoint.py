"""Open a checkpoint whatever its layout, and read its tensors one at a time.

:func:`open_checkpoint` accepts

* a ``.safetensors`` file;
* a ``model.safetensors.index.json`` (sharded: ``weight_map`` name -> shard file), or the directory holding it;
* a directory with ``model.safetensors``, or with any ``*.safetensors`` files (their union; a name in two
  files is an error);
* a PyTorch ``.bin`` / ``.pt`` file, ``pytorch_model.bin.index.json``, or a directory with them, loaded
  with ``torch.load(weights_only=True, mmap=True)`` (no pickled code runs).

Names, shapes and dtypes come from headers only; no tensor data is read until :meth:`Checkpoint.load` or
:meth:`Checkpoint.read`. Files are opened read-only and never modified.
"""

from __future__ import annotations

import contextlib
import os
import torch

from ..errors import CheckpointError, MissingTensorError
from .files import open_input, read_json_object
from .safetensors_reader import SafetensorsFile, TensorInfo

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

__all__ = ["Checkpoint", "Checkpoints", "TensorInfo", "open_checkpoint"]


class Checkpoint:
    """A set of tensors spread over one or more files. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str, files: dict[str, str], config_dir: str | None,
                 loaded_bins: dict[str, dict[str, torch.Tensor]] | None = None,
                 opened: dict[str, SafetensorsFile] | None = None):
        self.path = path
        self._weight_map = files  # tensor name -> file path
        self._config_dir = config_dir
        self._safetensors: dict[str, SafetensorsFile] = dict(opened or {})  # headers parsed once per file
        self._bin: dict[str, dict[str, torch.Tensor]] = dict(loaded_bins or {})

    # ------------------------------------------------------------------ lookup
    def names(self) -> list[str]:
        """Every tensor name, in file order (index order for sharded checkpoints)."""
        return list(self._weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def __len__(self) -> int:
        return len(self._weight_map)

    def info(self, name: str) -> TensorInfo:
        """Shape, dtype and file of ``name`` (headers only)."""
        file = self._file_of(name)
        if file.endswith(".safetensors"):
            return self._open_safetensors(file).info(name)
        tensor = self._open_bin(file)[name]
        return TensorInfo(tuple(tensor.shape), tensor.dtype, file, 0, tensor.numel() * tensor.element_size())

    # ------------------------------------------------------------------ data
    def load(self, name: str) -> torch.Tensor:
        """``name`` as a zero-copy view of a private copy-on-write mapping (writes never reach the file).

        Touched pages count in the resident set while the tensor lives; use :meth:`read` to stream.
        """
        file = self._file_of(name)
        if file.endswith(".safetensors"):
            return self._open_safetensors(file).mmap(name)
        return self._open_bin(file)[name]

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """``name`` read into ``out`` (raw bytes reused, e.g. a pinned buffer) or into new memory."""
        file = self._file_of(name)
        if file.endswith(".safetensors"):
            return self._open_safetensors(file).read(name, out)
        tensor = self._open_bin(file)[name]
        if out is None:
            return tensor.clone()
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0:
            return torch.empty(tensor.shape, dtype=tensor.dtype)
        raw = out.view(-1).view(torch.uint8)[:nbytes]
        if raw.numel() < nbytes:
            raise ValueError(f"out holds {raw.numel()} bytes, {name!r} needs {nbytes}")
        raw.copy_(tensor.contiguous().view(-1).view(torch.uint8))
        return raw.view(tensor.dtype).view(tensor.shape)

    def config(self) -> dict | None:
        """The ``config.json`` beside the weights, or None when there is none."""
        if self._config_dir is None:
            return None
        path = os.path.join(self._config_dir, "config.json")
        if not os.path.lexists(path):
            return None
        return read_json_object(path, "the model config")

    @property
    def directory(self) -> str | None:
        """The folder holding config and tokenizer files (None for a bare weights file outside one)."""
        return self._config_dir

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        for f in self._safetensors.values():
            f.close()
        self._safetensors.clear()
        self._bin.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.path!r}, {len(self)} tensors)"

    # ------------------------------------------------------------------ internals
    def _file_of(self, name: str) -> str:
        try:
            return self._weight_map[name]
        except KeyError:
            raise MissingTensorError(f"checkpoint {self.path}: no tensor named {name!r}") from None

    def _open_safetensors(self, file: str) -> SafetensorsFile:
        f = self._safetensors.get(file)
        if f is None:
            f = self._safetensors[file] = SafetensorsFile(file)
        return f

    def _open_bin(self, file: str) -> dict[str, torch.Tensor]:
        sd = self._bin.get(file)
        if sd is None:
            sd = self._bin[file] = _load_bin(file)
        return sd


def _load_bin(file: str) -> dict[str, torch.Tensor]:
    try:
        with open_input(file):  # a regular file: torch.load must not block on a pipe
            try:
                obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # legacy (non-zip) format cannot be mapped
                if "mmap" not in str(exc):
                    raise
                obj = torch.load(file, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot open ({exc.strerror or exc})") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        raise CheckpointError(f"{file}: cannot load as a PyTorch weights file ({exc})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{file}: not a state dict (a mapping of names to tensors)")
    return obj


def _weight_map_from_index(index_path: str) -> dict[str, str]:
    weight_map = read_json_object(index_path, "the shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise CheckpointError(f"{index_path}: missing or malformed 'weight_map' (name -> shard file)")
    folder = os.path.dirname(os.path.abspath(index_path))
    files = {}
    for name, shard in weight_map.items():
        if os.path.isabs(shard) or os.path.normpath(shard).startswith(".."):
            raise CheckpointError(f"{index_path}: shard path {shard!r} of {name!r} leaves the checkpoint folder")
        full = os.path.join(folder, shard)
        if not os.path.lexists(full):
            raise CheckpointError(f"{index_path}: shard {shard!r} (holding {name!r}) does not exist")
        files[name] = full
    return files


def _union_of_safetensors(paths: list[str], where: str, folder: str) -> Checkpoint:
    """The checkpoint made of the safetensors ``paths``, which stay open (their headers parsed once)."""
    files: dict[str, str] = {}
    opened: dict[str, SafetensorsFile] = {}
    try:
        for path in paths:
            f = opened[path] = SafetensorsFile(path)
            for name in f.names():
                if name in files:
                    raise CheckpointError(f"{where}: tensor {name!r} is in both {files[name]} and {path}")
                files[name] = path
    except BaseException:
        for f in opened.values():
            f.close()
        raise
    return Checkpoint(where, files, folder, opened=opened)


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open the checkpoint at ``path`` (file, index or directory; see the module docstring)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory (give a local checkpoint folder or file)")
    if os.path.isdir(path):
        folder = path
        if os.path.lexists(os.path.join(folder, SAFETENSORS_INDEX)):
            files = _weight_map_from_index(os.path.join(folder, SAFETENSORS_INDEX))
        elif os.path.lexists(os.path.join(folder, SAFETENSORS_SINGLE)):
            return _union_of_safetensors([os.path.join(folder, SAFETENSORS_SINGLE)], path, folder)
        elif any(n.endswith(".safetensors") for n in os.listdir(folder)):
            shards = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".safetensors"))
            return _union_of_safetensors(shards, path, folder)
        elif os.path.lexists(os.path.join(folder, BIN_INDEX)):
            files = _weight_map_from_index(os.path.join(folder, BIN_INDEX))
        elif os.path.lexists(os.path.join(folder, BIN_SINGLE)):
            return _open_bin_file(path, os.path.join(folder, BIN_SINGLE), folder)
        else:
            raise CheckpointError(f"{path}: no weights found (expected {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, "
                                  f"*.safetensors, {BIN_INDEX} or {BIN_SINGLE})")
        return Checkpoint(path, files, folder)
    folder = os.path.dirname(path)
    if path.endswith(".index.json"):
        files = _weight_map_from_index(path)
    elif path.endswith(".safetensors"):
        return _union_of_safetensors([path], path, folder)
    elif path.endswith((".bin", ".pt", ".pth")):
        return _open_bin_file(path, path, folder)
    else:
        raise CheckpointError(f"{path}: unknown checkpoint format (expected .safetensors, .bin, .pt or an "
                              f".index.json)")
    return Checkpoint(path, files, folder)


def _open_bin_file(path: str, file: str, folder: str) -> Checkpoint:
    state_dict = _load_bin(file)
    return Checkpoint(path, {name: file for name in state_dict}, folder, {file: state_dict})


class Checkpoints(dict):
    """Open checkpoints by key (a model as the config names it), closed together.

    One run opens each input once and shares it: the planner reads the headers, the dry-run summary and
    the executor reuse the same :class:`Checkpoint` objects (no header is parsed twice).
    """

    def open(self, key: str, path: str | os.PathLike) -> Checkpoint:
        """The checkpoint ``key``, opened from ``path`` unless it already is."""
        if key not in self:
            self[key] = open_checkpoint(path)
        return self[key]

    def close(self) -> None:
        for ckpt in self.values():
            ckpt.close()
        self.clear()

    def __enter__(self) -> "Checkpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    @contextlib.contextmanager
    def borrow(checkpoints: "Checkpoints | None"):
        """``checkpoints`` itself, left open (its owner closes it), or a new set closed on exit."""
        if checkpoints is not None:
            yield checkpoints
            return
        with Checkpoints() as own:
            yield own
