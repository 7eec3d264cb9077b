"""Backend registry and the one dispatch point of every op.

Each op (``fusion_engine/ops/<op>.py``) registers its torch reference and, per compiled backend, a
small loader: a function that imports the kernel's module on first use and returns the kernel
function (``launchers/cpp.py``, ``launchers/cuda.py``, ``triton_kernels/<op>.py``), so a missing
extension never breaks ``import fusion_engine``. All of an op's functions share one signature (flat
contiguous tensors, plain Python scalars). This module is the only one that reads
``FUSION_ENGINE_BACKEND`` or loads a launcher. The choice of backend:

* ``backend=`` on the call, else the ``FUSION_ENGINE_BACKEND`` environment variable: that backend
  or a :class:`BackendUnavailableError` saying why it cannot run. Helper ops (Philox words, inner
  products, the non-finite check: run inside a merge on its behalf) run their torch reference
  when the requested backend has no kernel for them, so ``backend="triton"`` on a merge works;
* otherwise automatic by the inputs' device: CUDA tensors try triton, then cuda, then torch, except
  for the ops of ``_CUDA_FIRST`` (cuda, then triton, then torch: the measured faster kernel first);
  CPU tensors try cpp, then torch. A skipped backend is logged at debug level; when a compiled
  backend cannot load at all (``fusion_engine._C`` missing, e.g. an unbuilt source tree on the path)
  and the automatic choice falls back to torch, a WARNING with the fix is logged once per backend.

:func:`backends_used` counts the calls each backend ran (the command line's summary names them).

Under ``TRITON_INTERPRET=1`` the triton backend also runs on CPU tensors (tests use this), but
it is never chosen automatically there: ask for it with ``backend="triton"``.
"""

from __future__ import annotations

import collections
import functools
import importlib
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import BackendUnavailableError, ConfigError
from .launchers._marshal import triton_interpret

log = logging.getLogger("fusion_engine")

BACKENDS = ("triton", "cuda", "cpp", "torch")
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}
# Ops whose CUDA kernel was measured faster than (or the only working one beside) the triton kernel,
# on one H200, 64M bf16 elements, K = 8 (issue 12; triton 3.6, before the local-histogram select):
#
#   op               triton      cuda     -> first
#   magnitude_mask   15.98 ms    0.62 ms     cuda
#   ties_merge ρ=0.2 123.8 ms    5.72 ms     cuda
#   ties_merge ρ=1    2.44 ms    1.55 ms     cuda
#   dare_merge       crashed     2.04 ms     cuda   (triton's `stream` parameter; renamed since)
#   linear_merge K=8  0.51 ms    0.55 ms     triton (the default order; K = 3: 0.49 vs 0.52 ms)
#
# The GPU suite (benchmarks/gpu_suite.sh) re-measures every op on both; change this table from its
# numbers (the triton select and the DARE fix are unmeasured yet).
_CUDA_FIRST = frozenset({"magnitude_mask", "ties_merge", "dare_merge"})

# dtypes each backend's kernels are compiled for (torch runs everything the reference does)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
BACKEND_DTYPES = {
    "torch": _FLOATS + (torch.float64,),
    "cpp": _FLOATS + (torch.float64,),
    "triton": _FLOATS,
    "cuda": _FLOATS,
}

Loader = Callable[[], Callable]


@dataclass(frozen=True, eq=False)  # hashed by identity: _load caches per registration
class OpKernels:
    """What an op registered: its torch reference and, per compiled backend, its kernel's loader."""

    torch: Callable
    loaders: dict[str, Loader]
    helper: bool = False

    def has(self, backend: str) -> bool:
        return backend == "torch" or backend in self.loaders


_REGISTRY: dict[str, OpKernels] = {}
_USED: collections.Counter = collections.Counter()  # backend name -> op calls it ran in this process


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run in this process, and if not, why."""

    usable: bool
    reason: str = ""

    def __repr__(self) -> str:
        return "usable" if self.usable else f"unusable ({self.reason})"


@functools.lru_cache(maxsize=None)
def _probe(name: str) -> BackendStatus:
    if name == "torch":
        return BackendStatus(True)
    if name == "cpp":
        try:
            importlib.import_module("fusion_engine.launchers.cpp")  # loads _C and checks its enum codes
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
            importlib.import_module("fusion_engine.launchers.cuda")  # loads _C_cuda and checks its codes
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


def backends_used() -> dict[str, int]:
    """How many op calls each backend has run in this process."""
    return dict(_USED)


@functools.lru_cache(maxsize=None)
def _warn_fallback(name: str, reason: str) -> None:
    """Once per backend: the automatic choice runs torch because a compiled backend cannot load."""
    log.warning("the %s backend cannot run (%s): falling back to the torch backend, several times slower "
                "on large tensors. Fix: install fusion_engine (pip install .) or build the extension in place "
                "(python setup.py build_ext --inplace), and do not run from a source checkout whose "
                "fusion_engine/ holds no compiled extension; fusion-engine backends shows the status.",
                name, reason)


def register(op: str, *, torch: Callable, helper: bool = False, **loaders: Loader) -> None:
    """Declare ``op``: its torch reference (``torch=``) and, for each compiled backend
    (``cpp=``, ``cuda=``, ``triton=``), a zero-argument loader returning the kernel function, e.g.
    ``cpp=lambda: cpp_launchers().ties_merge``.
    ``helper=True`` marks an op run on behalf of another (see the module docstring)."""
    unknown = set(loaders) - set(BACKENDS)
    if unknown:
        raise ValueError(f"register({op!r}): unknown backends {sorted(unknown)}")
    _REGISTRY[op] = OpKernels(torch, dict(loaders), helper)


def cpp_launchers():
    """``fusion_engine.launchers.cpp`` (it loads the ``_C`` extension), imported on first use."""
    from .launchers import cpp
    return cpp


def cuda_launchers():
    """``fusion_engine.launchers.cuda`` (it loads the ``_C_cuda`` extension), imported on first use."""
    from .launchers import cuda
    return cuda


def triton_kernels():
    """``fusion_engine.triton_kernels``, imported on first use; ``triton_kernels().<op>`` is the op's
    kernel module (its submodules import on attribute access)."""
    from . import triton_kernels as kernels
    return kernels


def registered() -> dict[str, OpKernels]:
    """Every registered op (name → :class:`OpKernels`)."""
    return dict(_REGISTRY)


@functools.lru_cache(maxsize=None)
def _load(kernels: OpKernels, name: str) -> Callable:
    return kernels.torch if name == "torch" else kernels.loaders[name]()


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "cpp":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpret())
    return True


def resolve(op: str, device: torch.device, dtype: torch.dtype | None,
            backend: str | None = None) -> tuple[str, Callable]:
    """Pick the backend for one call of ``op`` and return ``(name, kernel_function)``.
    ``dtype=None``: the op's inputs are not floating tensors (every backend's kernel takes them)."""
    requested = backend or os.environ.get("FUSION_ENGINE_BACKEND") or None
    table = _REGISTRY[op]
    if requested is not None and table.helper and requested.lower() in BACKENDS and not table.has(requested.lower()):
        log.debug("%s: no %s kernel; running the torch reference", op, requested)
        return "torch", table.torch
    if requested is not None:
        requested = requested.lower()
        if requested not in BACKENDS:
            raise ConfigError(f"unknown backend {requested!r} for {op}; choose one of {', '.join(BACKENDS)}")
        status = _probe(requested)
        why = None
        if not table.has(requested):
            why = f"{op} has no {requested} kernel"
        elif not status.usable:
            why = status.reason
        elif not _runs_on(requested, device):
            why = f"it does not run on {device.type} tensors"
        elif dtype is not None and dtype not in BACKEND_DTYPES[requested]:
            why = f"it has no kernel for {dtype}"
        if not why:
            try:
                kernel = _load(table, requested)
                _USED[requested] += 1
                return requested, kernel
            except (ImportError, AttributeError) as exc:
                why = f"its kernel module failed to load: {exc}"
        raise BackendUnavailableError(
            f"backend {requested!r} was requested for {op} but cannot run: {why}. "
            f"Use backend=None for the automatic choice (fusion_engine.backends() shows what is usable)."
        )
    unloadable = []  # compiled backends skipped because they cannot load here
    order = _AUTO_ORDER.get(device.type, ("torch",))
    if device.type == "cuda" and op in _CUDA_FIRST:
        order = ("cuda", "triton", "torch")
    for name in order:
        if name == "torch" or not table.has(name):
            continue
        status = _probe(name)
        if not status.usable:
            log.debug("%s: skipping backend %s: %s", op, name, status.reason)
            unloadable.append((name, status.reason))
            continue
        if dtype is not None and dtype not in BACKEND_DTYPES[name]:
            log.debug("%s: skipping backend %s: no kernel for %s", op, name, dtype)
            continue
        try:
            kernel = _load(table, name)
        except (ImportError, AttributeError) as exc:  # an auto choice that fails to load falls back
            log.debug("%s: skipping backend %s: %s", op, name, exc)
            unloadable.append((name, str(exc)))
            continue
        _USED[name] += 1
        return name, kernel
    for name, reason in unloadable:
        if name in ("cpp", "cuda"):  # triton is optional; the compiled extensions are the package's hot paths
            _warn_fallback(name, reason)
    _USED["torch"] += 1
    return "torch", table.torch
