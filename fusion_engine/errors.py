"""The exception hierarchy of fusion_engine.

Every error a user can trigger is a :class:`FusionEngineError`; the subclass says what kind of
mistake it is, the message says which tensor or parameter and what to do about it.
"""

import reprlib


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


class _BriefRepr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:  # also avoids int -> str past Python's digit limit
            return f"<an integer of {int(x.bit_length() * 0.30103) + 1} digits>"
        return repr(x)


_REPR = _BriefRepr()
_REPR.maxlevel, _REPR.maxtuple, _REPR.maxlist, _REPR.maxdict, _REPR.maxset = 3, 6, 6, 6, 6
_REPR.maxstring, _REPR.maxother = 80, 80


def brief_repr(value: object, limit: int = 120) -> str:
    """``repr(value)`` for an error message, in bounded time and at most ``limit`` characters.

    Containers are cut after a few items and levels (a YAML alias bomb or a huge list prints as
    ``[[[...], ...], ...]``), long strings and numbers are shortened; never raises.
    """
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails (e.g. an int past the digit limit)
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
