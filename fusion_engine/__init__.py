"""fusion_engine: a model-merging engine whose hot paths are compiled kernels.

The package imports lazily (PEP 562, :mod:`fusion_engine._lazy`): ``import fusion_engine`` loads only
the error classes, so the command line starts without torch; ``fusion_engine.ops``,
``fusion_engine.merge_tensors``, ``fusion_engine.backends()`` ... import their modules on first use.
"""

from ._lazy import lazy_exports
from .errors import (
    BackendUnavailableError,
    CheckpointError,
    ConfigError,
    DeviceMismatchError,
    DTypeMismatchError,
    FusionEngineError,
    MissingTensorError,
    NonFiniteError,
    ShapeMismatchError,
)

__version__ = "0.1.0"

# public name -> the module defining it ("" for a submodule), imported on first access
__getattr__, __dir__ = lazy_exports(__name__, {
    "BackendStatus": "._dispatch", "backends": "._dispatch", "merge_state_dicts": ".methods",
    "merge_tensors": ".methods", "methods": "", "ops": "",
})

__all__ = [
    "BackendStatus", "BackendUnavailableError", "CheckpointError", "ConfigError", "DTypeMismatchError",
    "DeviceMismatchError", "FusionEngineError", "MissingTensorError", "NonFiniteError",
    "ShapeMismatchError", "backends", "merge_state_dicts", "merge_tensors", "methods", "ops", "__version__",
]
