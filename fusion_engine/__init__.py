"""fusion_engine: a model-merging engine whose hot paths are compiled kernels."""

from . import methods, ops
from ._dispatch import BackendStatus, backends
from .methods import merge_state_dicts, merge_tensors
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
    "ShapeMismatchError", "backends", "merge_state_dicts", "merge_tensors", "methods", "ops", "__version__",
]
