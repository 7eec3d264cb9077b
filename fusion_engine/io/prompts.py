"""Local datasets of prompts for causal LMs: a text file (one prompt per line) or JSONL, or token ids.

:func:`read_prompts` reads the text; :func:`load_token_ids` turns a file into a [n, length] tensor of token
ids for a causal LM — text and JSONL through the model's tokenizer (every prompt truncated to the shortest
one's length, at most ``max_tokens``, so no padding enters a loss or a statistic), a ``.safetensors`` / ``.pt``
file holding an ``input_ids`` tensor as it is.
"""

from __future__ import annotations

import json
import os

import torch

from ..errors import CheckpointError, ConfigError
from .files import open_input

TEXT_SUFFIXES = (".txt", ".jsonl")
TENSOR_SUFFIXES = (".safetensors", ".pt")


def read_prompts(path: str, limit: int | None = None) -> list[str]:
    """Prompts from a ``.txt`` (one per non-empty line) or ``.jsonl`` file (a "text" or "prompt" field per line)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such file (a .txt with one prompt per line, or .jsonl with a 'text' or "
                          f"'prompt' field)")
    prompts: list[str] = []
    with open_input(path, "r", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if path.endswith(".jsonl"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{path} line {number}: not JSON ({exc.msg})") from None
                text = record.get("text", record.get("prompt")) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise ConfigError(f"{path} line {number}: needs a string 'text' or 'prompt' field")
                line = text
            prompts.append(line)
            if limit is not None and len(prompts) >= limit:
                break
    if not prompts:
        raise ConfigError(f"{path}: no prompt found")
    return prompts


def load_token_ids(path: str, tokenizer_dir: str | None, *, max_prompts: int | None = None,
                   max_tokens: int = 256) -> torch.Tensor:
    """Token ids [n, length] (int64) from a prompts file (tokenized) or a tensor file (``input_ids``)."""
    if path.endswith(TENSOR_SUFFIXES):
        ids = _tensor_file_ids(path)
    elif path.endswith(TEXT_SUFFIXES):
        ids = _tokenized(path, tokenizer_dir, max_prompts, max_tokens)
    else:
        raise ConfigError(f"{path}: unknown data format; use a .txt / .jsonl file of prompts or a .safetensors / "
                          f".pt file with an 'input_ids' tensor")
    if max_prompts is not None:
        ids = ids[:max_prompts]
    return ids[:, :max_tokens]


def _tensor_file_ids(path: str) -> torch.Tensor:
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        from .checkpoint import open_checkpoint

        with open_checkpoint(path) as ckpt:
            if "input_ids" not in ckpt:
                raise CheckpointError(f"{path}: no 'input_ids' tensor (found {ckpt.names()[:5]})")
            ids = ckpt.load("input_ids")
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
        ids = data.get("input_ids") if isinstance(data, dict) else data
        if not isinstance(ids, torch.Tensor):
            raise CheckpointError(f"{path}: expected a tensor or a dict with an 'input_ids' tensor")
    if ids.dim() != 2 or ids.shape[1] < 2 or ids.is_floating_point():
        raise CheckpointError(f"{path}: input_ids must be integer token ids shaped [n, length >= 2], got "
                              f"{ids.dtype} {tuple(ids.shape)}")
    return ids.long()


def _tokenized(path: str, tokenizer_dir: str | None, max_prompts: int | None, max_tokens: int) -> torch.Tensor:
    prompts = read_prompts(path, max_prompts)
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers comes with the demo extra
        raise ConfigError(f"{path}: tokenizing prompts needs transformers (pip install transformers)") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{tokenizer_dir}: no tokenizer to encode {path} ({exc}); put the tokenizer files "
                              f"in the model's folder") from exc
    rows = [tokenizer(p, add_special_tokens=True)["input_ids"][:max_tokens] for p in prompts]
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        raise ConfigError(f"{path}: no prompt has two or more tokens")
    width = min(len(r) for r in rows)
    return torch.tensor([r[:width] for r in rows], dtype=torch.int64)


__all__ = ["load_token_ids", "read_prompts"]
