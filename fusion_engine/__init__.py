"""fusion_engine: a model-merging engine whose hot paths are compiled kernels."""

from . import ops
from ._dispatch import BackendStatus, backends
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

__all__ = [
    "BackendStatus", "BackendUnavailableError", "CheckpointError", "ConfigError", "DTypeMismatchError",
    "DeviceMismatchError", "FusionEngineError", "MissingTensorError", "NonFiniteError",
    "ShapeMismatchError", "backends", "ops", "__version__",
]
