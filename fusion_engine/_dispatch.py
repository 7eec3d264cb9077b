"""Backend registry and the one dispatch point of every op.

Each op registers, per backend, the dotted path of a kernel-level function; all of an op's
functions share one signature (flat contiguous tensors, plain Python scalars) and return
``(out, nonfinite)``. The choice of backend:

* ``backend=`` on the call, else the ``FUSION_ENGINE_BACKEND`` environment variable: that backend
  or a :class:`BackendUnavailableError` saying why it cannot run;
* otherwise automatic by the inputs' device: CUDA tensors try triton, then cuda, then torch;
  CPU tensors try cpp, then torch. A skipped backend is logged at debug level.

Under ``TRITON_INTERPRET=1`` the triton backend also runs on CPU tensors (tests use this), but
it is never chosen automatically there: ask for it with ``backend="triton"``.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import BackendUnavailableError, ConfigError

log = logging.getLogger("fusion_engine")

BACKENDS = ("triton", "cuda", "cpp", "torch")
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}

# dtypes each backend's kernels are compiled for (torch runs everything the reference does)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
BACKEND_DTYPES = {
    "torch": _FLOATS + (torch.float64,),
    "cpp": _FLOATS + (torch.float64,),
    "triton": _FLOATS,
    "cuda": _FLOATS,
}

_REGISTRY: dict[str, dict[str, str]] = {}


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run in this process, and if not, why."""

    usable: bool
    reason: str = ""

    def __repr__(self) -> str:
        return "usable" if self.usable else f"unusable ({self.reason})"


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _probe(name: str) -> BackendStatus:
    if name == "torch":
        return BackendStatus(True)
    if name == "cpp":
        try:
            importlib.import_module("fusion_engine._C")
        except ImportError as exc:
            return BackendStatus(False, f"extension fusion_engine._C not built or not loadable: {exc}")
        return BackendStatus(True)
    if name == "triton":
        try:
            importlib.import_module("triton")
        except ImportError as exc:
            return BackendStatus(False, f"triton not importable: {exc}")
        if not torch.cuda.is_available() and not triton_interpret():
            return BackendStatus(False, "no CUDA GPU (set TRITON_INTERPRET=1 to run it on CPU)")
        return BackendStatus(True)
    if name == "cuda":
        try:
            importlib.import_module("fusion_engine._C_cuda")
        except ImportError as exc:
            return BackendStatus(
                False, f"CUDA extension not built (install with FUSION_ENGINE_CUDA=1): {exc}"
            )
        if not torch.cuda.is_available():
            return BackendStatus(False, "no CUDA GPU")
        return BackendStatus(True)
    raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def backends() -> dict[str, BackendStatus]:
    """Per backend (triton, cuda, cpp, torch): whether it is usable here and, if not, why."""
    return {name: _probe(name) for name in BACKENDS}


def register(op: str, **paths: str) -> None:
    """Declare the kernel-level function of ``op`` for each backend, as ``"module:function"``."""
    _REGISTRY[op] = dict(paths)


@functools.lru_cache(maxsize=None)
def _load(path: str) -> Callable:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "cpp":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpret())
    return True


def resolve(op: str, device: torch.device, dtype: torch.dtype, backend: str | None = None) -> tuple[str, Callable]:
    """Pick the backend for one call of ``op`` and return ``(name, kernel_function)``."""
    requested = backend or os.environ.get("FUSION_ENGINE_BACKEND") or None
    table = _REGISTRY[op]
    if requested is not None:
        requested = requested.lower()
        if requested not in BACKENDS:
            raise ConfigError(f"unknown backend {requested!r} for {op}; choose one of {', '.join(BACKENDS)}")
        status = _probe(requested)
        why = None
        if requested not in table:
            why = f"{op} has no {requested} kernel"
        elif not status.usable:
            why = status.reason
        elif not _runs_on(requested, device):
            why = f"it does not run on {device.type} tensors"
        elif dtype not in BACKEND_DTYPES[requested]:
            why = f"it has no kernel for {dtype}"
        if not why:
            try:
                return requested, _load(table[requested])
            except ImportError as exc:
                why = f"its kernel module failed to load: {exc}"
        raise BackendUnavailableError(
            f"backend {requested!r} was requested for {op} but cannot run: {why}. "
            f"Use backend=None for the automatic choice (fusion_engine.backends() shows what is usable)."
        )
    for name in _AUTO_ORDER.get(device.type, ("torch",)):
        if name not in table:
            continue
        status = _probe(name)
        if not status.usable:
            log.debug("%s: skipping backend %s: %s", op, name, status.reason)
            continue
        if dtype not in BACKEND_DTYPES[name]:
            log.debug("%s: skipping backend %s: no kernel for %s", op, name, dtype)
            continue
        try:
            return name, _load(table[name])
        except ImportError as exc:  # an auto choice that fails to load falls back
            log.debug("%s: skipping backend %s: %s", op, name, exc)
    return "torch", _load(table["torch"])
