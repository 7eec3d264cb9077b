"""Input plumbing shared by the data-aware methods: models or state dicts, batches, validation."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from ..errors import ConfigError, MissingTensorError, ShapeMismatchError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 tensors, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def state_dict_of(where: str, model, index: int) -> dict[str, torch.Tensor]:
    """The tensors of an ``nn.Module`` (its state dict, detached) or a state-dict mapping as given."""
    if isinstance(model, nn.Module):
        return {k: v.detach() for k, v in model.state_dict().items()}
    if isinstance(model, Mapping):
        out = {}
        for k, v in model.items():
            if not isinstance(v, torch.Tensor):
                raise ConfigError(f"{where}: models[{index}][{k!r}] is a {type(v).__name__}, not a tensor")
            out[k] = v.detach()
        return out
    raise ConfigError(f"{where}: models[{index}] is a {type(model).__name__}; pass an nn.Module or a state dict")


def state_dicts_of(where: str, models) -> list[dict[str, torch.Tensor]]:
    """State dicts of K ≥ 1 models with the same keys and shapes (checked, errors name model and tensor)."""
    if isinstance(models, (nn.Module, Mapping)):
        raise ConfigError(f"{where}: pass a list of models or state dicts, not a single one")
    sds = [state_dict_of(where, m, i) for i, m in enumerate(models)]
    if not sds:
        raise ConfigError(f"{where}: got no models; pass at least one")
    ref = sds[0]
    for i, sd in enumerate(sds[1:], start=1):
        missing = [k for k in ref if k not in sd]
        extra = [k for k in sd if k not in ref]
        if missing or extra:
            what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which models[0] lacks"
            raise MissingTensorError(f"{where}: models[{i}] {what}; every model must have the same tensors "
                                     f"(the same architecture)")
        for k, v in sd.items():
            if v.shape != ref[k].shape:
                raise ShapeMismatchError(f"{where}: {k!r} has shape {tuple(v.shape)} in models[{i}] but "
                                         f"{tuple(ref[k].shape)} in models[0]; the models must share one architecture")
    return sds


def batch_inputs(where: str, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` or ``(x, y)`` (a 2-sequence) → ``(x, y or None)``."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
        y = batch[1]
        if y is not None and not isinstance(y, torch.Tensor):
            raise ConfigError(f"{where}: a batch's targets are a {type(y).__name__}; pass a tensor")
        return batch[0], y
    raise ConfigError(f"{where}: a batch must be a tensor x or a pair (x, y) of tensors, got {type(batch).__name__}")


def iterate_batches(where: str, batches: Iterable) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    if isinstance(batches, torch.Tensor) or (isinstance(batches, tuple) and len(batches) == 2
                                             and isinstance(batches[0], torch.Tensor)):
        raise ConfigError(f"{where}: batches must be an iterable of batches (a list, a DataLoader); "
                          f"wrap a single batch in a list: [batch]")
    count = 0
    for batch in batches:
        count += 1
        yield batch_inputs(where, batch)
    if count == 0:
        raise ConfigError(f"{where}: batches yielded nothing; pass at least one batch")


def module_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module):
    """Run ``model`` in eval mode (no dropout, running BatchNorm statistics) and restore its flags."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
