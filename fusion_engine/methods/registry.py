"""The merge-method registry: each method's name, input contract and parameter specs.

A :class:`Method` says which inputs it takes (a base required, optional, forbidden or ignored;
how many inputs) and its :class:`Parameter` specs. A parameter is *shared* (one value per output
tensor), *per input* (one value per input tensor) or *per non-base input* (one per input other
than the base), exactly as in mergekit 0.1.5 (``ParameterScope.SHARED / INPUT / NON_BASE``).

:func:`validate_parameters` binds user values to a method before any tensor is read: it fills
defaults, broadcasts scalars, aligns sequences and id-keyed mappings with the inputs, checks each
value's type and range, and raises :class:`~fusion_engine.errors.ConfigError` naming the method,
the parameter, the offending value and the valid range.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import ConfigError, brief_repr

SHARED, INPUT, NON_BASE = "shared", "input", "non_base"
BASE_REQUIRED, BASE_OPTIONAL, BASE_FORBIDDEN, BASE_IGNORED = "required", "optional", "forbidden", "ignored"


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()


@dataclass(frozen=True)
class Parameter:
    """One parameter of a method.

    ``kind`` is ``float``, ``int``, ``bool`` or ``torch.Tensor``. ``low``/``high`` bound numbers
    (closed unless ``low_open``/``high_open``); ``optional`` lets the value be None. A tensor parameter
    with ``statistics=True`` also takes the path of a statistics file (``fusion-engine measure``): it is
    opened when checked, and the method reads the statistic of each tensor from it.
    """

    name: str
    kind: type
    scope: str = SHARED
    default: Any = REQUIRED
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    statistics: bool = False
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def range_text(self) -> str:
        if self.kind is bool:
            return "true or false"
        if self.kind is torch.Tensor:
            return "a tensor shaped like the inputs" + (" or a statistics file" if self.statistics else "")
        what = "an integer" if self.kind is int else "a finite number"
        if self.low is None and self.high is None:
            text = what
        else:
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            left = "(" if self.low_open or self.low is None else "["
            right = ")" if self.high_open or self.high is None else "]"
            text = f"{what} in {left}{lo}, {hi}{right}"
        return text + (" or null" if self.optional else "")

    def bind_to_tensor(self, value: Any, tensor_name: str) -> Any:
        """A statistics-file path bound to the input tensor it is read for (any other value unchanged): the
        planner calls this with each input's own tensor name, which can differ from the output's."""
        if self.statistics and isinstance(value, (str, os.PathLike)):
            from ..io.statistics import TensorStatistics, open_statistics

            return TensorStatistics(open_statistics(value), tensor_name)
        return value

    def check(self, method: str, value: Any, where: str = "") -> Any:
        """The value converted to ``kind``, or a ConfigError naming it and the valid range."""
        label = f"{method}: parameter {self.name}{where}"
        if value is None:
            if self.optional:
                return None
            raise ConfigError(f"{label} is null; it must be {self.range_text()}")
        if self.kind is torch.Tensor:
            if self.statistics and isinstance(value, (str, os.PathLike)):
                from ..io.statistics import open_statistics

                return open_statistics(value)
            if self.statistics and type(value).__name__ in ("StatisticsFile", "TensorStatistics"):
                return value
            if not isinstance(value, torch.Tensor):
                raise ConfigError(f"{label} is a {type(value).__name__}; it must be {self.range_text()}")
            return value
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ConfigError(f"{label} = {brief_repr(value)}; it must be {self.range_text()}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{label} = {brief_repr(value)} is not a number; it must be {self.range_text()}")
        if self.kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"{label} = {brief_repr(value)}; it must be {self.range_text()}")
            value = int(value)
        else:
            try:
                value = float(value)
            except OverflowError:  # an integer beyond the float range (e.g. 401 digits from a YAML config)
                raise ConfigError(f"{label} = {brief_repr(value)} is too large; it must be "
                                  f"{self.range_text()}") from None
            if not math.isfinite(value):
                raise ConfigError(f"{label} = {brief_repr(value)}; it must be {self.range_text()}")
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            raise ConfigError(f"{label} = {brief_repr(value)} is out of range; it must be {self.range_text()}")
        return value


@dataclass
class Group:
    """The inputs of one output tensor, as a method's ``merge`` function receives them.

    ``tensors`` are in input order and already in the working dtype; ``base_index`` is None when
    there is no base or the method ignores it. ``out_dtype`` is the dtype of the result.
    """

    tensors: list[torch.Tensor]
    base_index: int | None
    name: str | None
    out_dtype: torch.dtype
    backend: str | None = None
    check_finite: bool = True
    grad: bool = False  # an input requires grad: take the method's exact differentiable torch path

    @property
    def base(self) -> torch.Tensor | None:
        return None if self.base_index is None else self.tensors[self.base_index]

    @property
    def non_base(self) -> list[torch.Tensor]:
        return [t for i, t in enumerate(self.tensors) if i != self.base_index]

    @property
    def ops_kwargs(self) -> dict[str, Any]:
        """Keywords every fused op takes: output dtype, NaN check, backend."""
        return dict(out_dtype=self.out_dtype, check_finite=self.check_finite, backend=self.backend)


@dataclass(frozen=True)
class Method:
    """A merge method: contract, parameters and the function computing one output tensor.

    ``merge(group, **parameters)`` receives shared values as scalars and per-input values as
    lists aligned with ``group.tensors`` (scope ``input``) or ``group.non_base`` (``non_base``).
    ``check`` validates combinations of bound parameters (e.g. DELLA's density ± epsilon).
    ``differentiable``: when an input requires grad (and grad mode is on), ``merge`` receives
    ``group.grad = True`` and computes the result with torch operations autograd differentiates
    (mergekit's derivatives; masks and elections are piecewise constant), instead of the fused ops.
    """

    name: str
    merge: Callable[..., torch.Tensor]
    parameters: tuple[Parameter, ...] = ()
    base: str = BASE_IGNORED
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int | None = None
    max_non_base: int | None = None
    randomized: bool = False
    check: Callable[[str, dict[str, Any]], None] | None = None
    summary: str = ""
    reference: str = ""
    differentiable: bool = False  # ``merge`` has a torch path autograd differentiates (``group.grad``)
    @property
    def parameter_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)

    def check_inputs(self, n_inputs: int, base_index: int | None, label: str = "") -> int | None:
        """Validate the input count and base against the contract; return the effective base index."""
        where = f" for {label}" if label else ""
        if n_inputs < 0:
            raise ConfigError(f"{self.name}: n_inputs={n_inputs} must be >= 0")
        if base_index is not None:
            if isinstance(base_index, bool) or not isinstance(base_index, int) or not 0 <= base_index < n_inputs:
                raise ConfigError(f"{self.name}: base_index={base_index!r} is out of range for {n_inputs} inputs{where}")
        if self.base == BASE_IGNORED:
            base_index = None
        if self.base == BASE_REQUIRED and base_index is None:
            raise ConfigError(f"{self.name} needs a base model{where}: pass base_index (base_model: in a config)")
        if self.base == BASE_FORBIDDEN and base_index is not None:
            raise ConfigError(f"{self.name} takes no base model{where}; drop base_index / base_model")
        non_base = n_inputs - (base_index is not None)
        _count(self.name, "inputs", n_inputs, self.min_inputs, self.max_inputs, where)
        if self.min_non_base is not None or self.max_non_base is not None:
            _count(self.name, "non-base inputs", non_base, self.min_non_base or 0, self.max_non_base, where)
        return base_index


def _count(method: str, what: str, count: int, low: int, high: int | None, where: str) -> None:
    if count < low or (high is not None and count > high):
        need = f"exactly {low}" if low == high else (f"at least {low}" if high is None or count < low else f"at most {high}")
        raise ConfigError(f"{method} needs {need} {what}{where}; got {count}")


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make a method available by name (a duplicate name is an error)."""
    if method.name in _METHODS:
        raise ConfigError(f"merge method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def get(name: str | Method) -> Method:
    """The method called ``name`` (a :class:`Method` is returned as is)."""
    if isinstance(name, Method):
        return name
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown merge method {brief_repr(name)}; known: {', '.join(names())}") from None


def names() -> tuple[str, ...]:
    """Names of every registered method, sorted."""
    return tuple(sorted(_METHODS))


def is_per_group(value: Any) -> bool:
    """A :class:`~fusion_engine.methods.api.PerGroupValues` (ours or mergekit's)."""
    return type(value).__name__ == "PerGroupValues" and isinstance(getattr(value, "values", None), tuple)


def validate_parameters(method: str | Method, parameters: Mapping[str, Any] | None, n_inputs: int, *,
                        base_index: int | None = None, ids: Sequence[Hashable] | None = None,
                        label: str = "") -> dict[str, Any]:
    """Bind and check a method's parameters for one output tensor, before reading any tensor.

    Parameters
    ----------
    method : a method name or :class:`Method`
    parameters : name → value. Shared parameters take a scalar. Per-input ones take a scalar
        (broadcast), a sequence in input order, or a mapping keyed by input id (``ids``, default
        0…n−1). A per-non-base parameter's sequence lists the non-base inputs in order (mergekit),
        or all ``n_inputs`` inputs, the base's entry being ignored.
    n_inputs : the number of input tensors; base_index : which of them is the base (or None)
    label : the output tensor's name, for messages

    Returns
    -------
    A dict with every parameter of the method: shared values converted to their kind, per-input
    values as lists aligned with the inputs (scope ``input``) or the non-base inputs.

    Raises
    ------
    ConfigError naming the parameter, its value and the valid range; also for an unknown
    parameter, a missing required one, or an input count / base the method does not take.
    """
    m = get(method)
    base_index = m.check_inputs(n_inputs, base_index, label)
    ids = list(range(n_inputs)) if ids is None else list(ids)
    if len(ids) != n_inputs:
        raise ConfigError(f"{m.name}: got {len(ids)} ids for {n_inputs} inputs")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{m.name}: input ids {ids} are not unique")
    if parameters is not None and not isinstance(parameters, Mapping):
        raise ConfigError(f"{m.name}: parameters must be a mapping of parameter names to values, e.g. "
                          f"{{'weight': 0.5}}, not a {type(parameters).__name__} ({brief_repr(parameters)})")
    parameters = dict(parameters or {})
    unknown = sorted(str(name) for name in set(parameters) - set(m.parameter_names))
    if unknown:
        raise ConfigError(f"{m.name}: unknown parameter(s) {', '.join(unknown)}; "
                          f"{m.name} takes {', '.join(m.parameter_names) or 'no parameters'}")
    non_base_ids = [k for i, k in enumerate(ids) if i != base_index]
    bound: dict[str, Any] = {}
    for p in m.parameters:
        value = parameters.get(p.name, p.default)
        if value is REQUIRED:
            if p.scope == NON_BASE and not non_base_ids:
                bound[p.name] = []
                continue
            raise ConfigError(f"{m.name}: parameter {p.name} is required ({p.range_text()}"
                              f"{', one per input' if p.scope != SHARED else ''})")
        if is_per_group(value):
            raise ConfigError(f"{m.name}: parameter {p.name} holds per-tensor values (PerGroupValues); "
                              f"those are for merge_state_dicts")
        if p.scope == SHARED:
            if isinstance(value, (Mapping, list, tuple)):
                raise ConfigError(f"{m.name}: parameter {p.name} is one value for all inputs, "
                                  f"not {type(value).__name__} {brief_repr(value)}")
            bound[p.name] = p.check(m.name, value)
            continue
        scope_ids = ids if p.scope == INPUT else non_base_ids
        bound[p.name] = [p.check(m.name, v, f" for input {k!r}")
                         for k, v in zip(scope_ids, _per_input(m.name, p, value, ids, scope_ids, base_index))]
    if m.check is not None:
        m.check(m.name, bound)
    return bound


def _per_input(method: str, p: Parameter, value: Any, ids: list, scope_ids: list, base_index: int | None) -> list:
    if isinstance(value, torch.Tensor) and p.kind is not torch.Tensor:
        value = value.tolist() if value.dim() else value.item()
    if isinstance(value, Mapping):
        missing = [k for k in scope_ids if k not in value]
        if missing:
            raise ConfigError(f"{method}: parameter {p.name} has no value for input(s) {missing}")
        return [value[k] for k in scope_ids]
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        values = list(value)
        if len(values) == len(scope_ids):
            return values
        if p.scope == NON_BASE and base_index is not None and len(values) == len(ids):
            return [v for i, v in enumerate(values) if i != base_index]
        expected = f"{len(scope_ids)}" + (f" (the non-base inputs) or {len(ids)}" if p.scope == NON_BASE
                                          and base_index is not None else "")
        raise ConfigError(f"{method}: parameter {p.name} has {len(values)} values; expected {expected}, "
                          f"or one scalar for all")
    return [value] * len(scope_ids)
