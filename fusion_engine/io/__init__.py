"""Checkpoint I/O: read any local checkpoint tensor by tensor, write sharded safetensors atomically.

* :func:`open_checkpoint` -> :class:`Checkpoint`: safetensors (one file, sharded with an index, or a
  folder of them) and PyTorch ``.bin`` / ``.pt`` files; names, shapes and dtypes from the headers
  (:func:`parse_header`, :class:`SafetensorsFile`), tensor data only on ``read`` / ``load``;
  :class:`Checkpoints` holds a run's open checkpoints by key and closes them together.
* :func:`plan_shards` fixes the output layout (which shard, which offset) from names, dtypes and shapes;
  :class:`ShardedWriter` then writes each tensor at its planned place, in any order;
  :func:`save_sharded` does both for an in-memory state dict; :func:`parse_size` reads ``"5GB"``.
* :func:`atomic_output_dir`: the output folder is built in a hidden sibling and renamed into place when
  complete (:func:`clean_stale_siblings` removes what a killed run left).
"""

from .atomic import atomic_output_dir, clean_stale_siblings
from .checkpoint import Checkpoint, Checkpoints, open_checkpoint
from .safetensors_reader import DTYPES, SafetensorsFile, TensorInfo, parse_header
from .writer import DEFAULT_MAX_SHARD_BYTES, ShardedWriter, ShardLayout, parse_size, plan_shards, save_sharded

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "DTYPES", "Checkpoint", "Checkpoints", "SafetensorsFile", "ShardLayout", "ShardedWriter",
           "TensorInfo", "atomic_output_dir", "clean_stale_siblings", "open_checkpoint", "parse_header",
           "parse_size", "plan_shards", "save_sharded"]
