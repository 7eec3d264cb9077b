"""The exception hierarchy of fusion_engine.

Every error a user can trigger is a :class:`FusionEngineError`; the subclass says what kind of
mistake it is, the message says which tensor or parameter and what to do about it.
"""


class FusionEngineError(Exception):
    """Root of every error raised by fusion_engine."""


class ConfigError(FusionEngineError, ValueError):
    """A parameter or configuration value is invalid (out of range, wrong count, unknown name)."""


class ShapeMismatchError(FusionEngineError, ValueError):
    """Tensors that must have the same shape do not."""


class DTypeMismatchError(FusionEngineError, TypeError):
    """Tensors that must share a dtype do not, or a dtype is not supported."""


class DeviceMismatchError(FusionEngineError, ValueError):
    """Tensors that must live on one device do not."""


class MissingTensorError(FusionEngineError, KeyError):
    """A tensor the merge needs is absent from a model or checkpoint."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(FusionEngineError):
    """A checkpoint file or folder is missing, truncated or malformed."""


class NonFiniteError(FusionEngineError, ValueError):
    """An input tensor holds NaN or Inf values."""


class BackendUnavailableError(FusionEngineError, RuntimeError):
    """A backend was requested explicitly but cannot run here."""
