"""Write a PEFT adapter folder atomically: ``adapter_model.safetensors`` and ``adapter_config.json``."""

from __future__ import annotations

import json
import os

from ..io import atomic_output_dir
from ..io.writer import ShardedWriter, plan_shards, write_file_synced
from .adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS


def write_adapter(out_path: str, entries: list[tuple[str, object]], config: dict, *, source=None,
                  allow_overwrite: bool = False) -> None:
    """Write ``entries`` = ``[(key, tensor or name)]`` (a name is read from the checkpoint ``source`` as it is
    written, so whole modules are streamed) and ``config`` into ``out_path``, which appears only when complete."""
    def spec(value):
        info = source.info(value) if isinstance(value, str) else value
        return info.dtype, tuple(info.shape)

    layout = plan_shards([(key, *spec(value)) for key, value in entries], max_shard_bytes=2**62)
    with atomic_output_dir(out_path, allow_overwrite) as tmp:
        with ShardedWriter(tmp, layout) as writer:
            for key, value in entries:
                writer.add(key, source.read(value) if isinstance(value, str) else value.contiguous())
            writer.finish()
        os.replace(os.path.join(tmp, layout.filenames[0]), os.path.join(tmp, ADAPTER_WEIGHTS[0]))
        write_file_synced(os.path.join(tmp, ADAPTER_CONFIG), (json.dumps(config, indent=2) + "\n").encode())


def rank_config(ranks: dict[str, int]) -> dict:
    """``r`` = the largest rank with ``lora_alpha = r`` (scaling 1), other ranks in ``rank_pattern`` and
    ``alpha_pattern`` (mergekit's convention)."""
    r = max(ranks.values())
    other = {m: k for m, k in ranks.items() if k != r}
    return {"r": r, "lora_alpha": r, "rank_pattern": other, "alpha_pattern": dict(other), "use_rslora": False}

