"""Statistics files: the Fisher / Gram / activation tensors of one model, as one safetensors file.

Written by ``fusion-engine measure`` (:func:`fusion_engine.data_aware.measure.measure_statistics`), read by
the merge methods that need them (``fisher``, ``regmean``) when a config names the file as a per-model
parameter. Tensor names are ``fisher.<parameter>``, ``gram.<Linear module>``, ``activation_mean.<module>``
and ``activation_var.<module>``; the header's metadata has ``format`` = :data:`STATS_FORMAT` and says what
was measured on which data.
"""

from __future__ import annotations

import functools
import json
import os

import torch

from ..errors import CheckpointError, ConfigError, MissingTensorError
from .safetensors_reader import SafetensorsFile
from .writer import write_file_synced

STATS_FORMAT = "fusion_engine.statistics/1"
PREFIXES = ("fisher.", "gram.", "activation_mean.", "activation_var.")


def save_statistics(stats: dict[str, torch.Tensor], path: str, *, metadata: dict | None = None) -> str:
    """Write ``stats`` to ``path`` (safetensors), via a temporary sibling renamed into place."""
    from safetensors.torch import save as to_bytes

    bad = [k for k in stats if not k.startswith(PREFIXES)]
    if bad:
        raise ConfigError(f"save_statistics: unknown statistic names {bad[:3]}; names start with {PREFIXES}")
    meta = {"format": STATS_FORMAT, **{k: v if isinstance(v, str) else json.dumps(v)
                                       for k, v in (metadata or {}).items()}}
    data = to_bytes({k: v.detach().contiguous().cpu() for k, v in stats.items()}, metadata=meta)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"save_statistics: folder {folder} does not exist")
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        write_file_synced(tmp, data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class StatisticsFile:
    """An open statistics file: its metadata, and its tensors read on demand (:meth:`tensor`)."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no such statistics file; write one with `fusion-engine measure`")
        self._file = SafetensorsFile(path)
        self.metadata = dict(self._file.metadata or {})
        if self.metadata.get("format") != STATS_FORMAT:
            self._file.close()
            raise CheckpointError(f"{path}: not a fusion_engine statistics file (format "
                                  f"{self.metadata.get('format')!r}); write one with `fusion-engine measure`")
        self.names = set(self._file.names())

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (e.g. ``fisher.model.layers.0.mlp.up_proj.weight``)."""
        if name not in self.names:
            raise MissingTensorError(f"{self.path}: no statistic {name!r}; measure the model whose tensors are "
                                     f"merged (`fusion-engine measure MODEL --data ...`)")
        return self._file.read(name)

    def __repr__(self) -> str:
        return f"StatisticsFile({self.path!r})"


class TensorStatistics:
    """The statistics of one input tensor: a statistics file and the tensor's name in its model.

    ``fisher()`` is ``fisher.<name>``; ``gram()`` is ``gram.<module>`` for the weight ``<module>.weight``
    (None for a tensor that is not a Linear weight or was not measured).
    """

    def __init__(self, file: StatisticsFile, tensor_name: str):
        self.file, self.tensor_name = file, tensor_name

    def fisher(self) -> torch.Tensor:
        return self.file.tensor(f"fisher.{self.tensor_name}")

    def gram(self) -> torch.Tensor | None:
        if not self.tensor_name.endswith(".weight"):
            return None
        key = f"gram.{self.tensor_name[:-len('.weight')]}"
        return self.file.tensor(key) if key in self.file else None

    def __repr__(self) -> str:
        return f"TensorStatistics({self.file.path!r}, {self.tensor_name!r})"


def tensor_statistics(value, tensor_name: str | None, where: str) -> TensorStatistics:
    """``value`` (a :class:`StatisticsFile` or :class:`TensorStatistics`) as the statistics of one tensor."""
    if isinstance(value, TensorStatistics):
        return value
    if tensor_name is None:
        raise ConfigError(f"{where}: a statistics file needs the tensor's name; pass name= to merge_tensors")
    return TensorStatistics(value, tensor_name)


@functools.lru_cache(maxsize=64)
def _open_cached(path: str, mtime_ns: int, size: int) -> StatisticsFile:
    return StatisticsFile(path)


def open_statistics(path: str | os.PathLike) -> StatisticsFile:
    """The statistics file at ``path``, opened once per process while the file is unchanged."""
    path = os.path.abspath(os.fspath(path))
    try:
        st = os.stat(path)
    except OSError:
        raise CheckpointError(f"{path}: no such statistics file; write one with `fusion-engine measure`") from None
    return _open_cached(path, st.st_mtime_ns, st.st_size)


def load_statistics(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the metadata of a statistics file."""
    stats = StatisticsFile(path)
    return {name: stats.tensor(name) for name in sorted(stats.names)}, stats.metadata


__all__ = ["PREFIXES", "STATS_FORMAT", "StatisticsFile", "TensorStatistics", "load_statistics", "open_statistics",
           "save_statistics", "tensor_statistics"]
