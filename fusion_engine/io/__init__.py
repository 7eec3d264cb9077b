"""Checkpoint I/O: memory-mapped safetensors (single and sharded), .bin, sharded atomic output (issue 4).

* :func:`open_checkpoint` — read any local checkpoint layout tensor by tensor (headers first, data on demand).
* :class:`ShardedWriter` — write HF-style sharded safetensors with an index, tensor by tensor, in any order.
* :func:`atomic_output_dir` — build an output folder beside its final place and rename it in when complete.
"""

from .atomic import atomic_output_dir, clean_stale_siblings
from .checkpoint import Checkpoint, open_checkpoint
from .safetensors_reader import DTYPES, SafetensorsFile, TensorInfo, parse_header
from .writer import DEFAULT_MAX_SHARD_BYTES, ShardedWriter, ShardLayout, parse_size, plan_shards, save_sharded

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "DTYPES", "Checkpoint", "SafetensorsFile", "ShardLayout", "ShardedWriter",
           "TensorInfo", "atomic_output_dir", "clean_stale_siblings", "open_checkpoint", "parse_header",
           "parse_size", "plan_shards", "save_sharded"]
