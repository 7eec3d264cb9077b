"""mergekit's ``BASE+ADAPTER`` model references: a base checkpoint seen through a LoRA adapter.

``open_model("./base+./adapter")`` returns an :class:`AdaptedCheckpoint` with the base's names,
shapes, dtypes, config and tokenizer folder, whose :meth:`~AdaptedCheckpoint.read` returns
``W + s·B·A`` for the tensors the adapter touches (:mod:`fusion_engine.lora.adapter`). The sum is
formed per tensor as the executor streams it: no merged copy of the model exists on disk or in
memory, and the result equals PEFT's ``merge_and_unload()`` tensor for tensor.

A path that exists as written is never split, so folders with a ``+`` in their name still work.
"""

from __future__ import annotations

import os

from ..errors import CheckpointError
from ..io import Checkpoint, TensorInfo, open_checkpoint
from .adapter import LoraAdapter


def split_reference(ref: str) -> list[str]:
    """``"base+adapter"`` -> ``["base", "adapter"]``; a plain (or existing) path -> ``[path]``."""
    if "+" not in ref or os.path.exists(os.path.expanduser(ref)):
        return [ref]
    parts = ref.split("+")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise CheckpointError(f"model reference {ref!r}: write BASE+ADAPTER (one '+', a model and a LoRA folder)")
    return [p.strip() for p in parts]


class AdaptedCheckpoint:
    """A :class:`~fusion_engine.io.Checkpoint` with a LoRA adapter merged on read (same interface)."""

    def __init__(self, base: Checkpoint, adapter: LoraAdapter):
        self.base = base
        self.adapter = adapter
        self.path = f"{base.path}+{adapter.path}"
        adapter.check_against(base)

    def names(self) -> list[str]:
        return self.base.names()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def __len__(self) -> int:
        return len(self.base)

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def read(self, name: str, out=None):
        """``name`` with the adapter merged (into ``out``'s bytes when given, like :meth:`Checkpoint.read`)."""
        return self.adapter.apply(name, self.base.read(name, out))

    def load(self, name: str):
        return self.read(name) if self.adapter.touches(name) else self.base.load(name)

    def config(self) -> dict | None:
        return self.base.config()

    @property
    def directory(self) -> str | None:
        return self.base.directory

    def close(self) -> None:
        self.base.close()
        self.adapter.close()

    def __enter__(self) -> "AdaptedCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AdaptedCheckpoint({self.base.path!r} + {self.adapter.path!r})"


def open_model(path: str | os.PathLike) -> Checkpoint | AdaptedCheckpoint:
    """:func:`~fusion_engine.io.open_checkpoint`, or for ``BASE+ADAPTER`` the base with the adapter applied."""
    parts = split_reference(os.fspath(path))
    if len(parts) == 1:
        return open_checkpoint(parts[0])
    base = open_checkpoint(os.path.expanduser(parts[0]))
    try:
        adapter = LoraAdapter(os.path.expanduser(parts[1]))
    except BaseException:
        base.close()
        raise
    try:
        return AdaptedCheckpoint(base, adapter)
    except BaseException:
        base.close()
        adapter.close()
        raise


def open_model_into(checkpoints: dict, key: str, path: str | os.PathLike):
    """``checkpoints[key]`` (a run's :class:`~fusion_engine.io.Checkpoints`), opened with :func:`open_model`
    from ``path`` unless it already is."""
    if key not in checkpoints:
        checkpoints[key] = open_model(path)
    return checkpoints[key]
