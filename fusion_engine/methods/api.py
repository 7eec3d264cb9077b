"""mergekit-compatible entry points: :func:`merge_tensors` (one output tensor) and
:func:`merge_state_dicts` (whole in-memory models).

Signatures, parameter names, defaults and semantics follow ``mergekit.merge_methods.api`` of
mergekit 0.1.5, with these differences:

* the merge runs on fusion_engine's fused ops (each method's module says which) and accumulates
  in float32 (float64 for float64 inputs), so low-precision inputs are rounded once, at the output;
* random methods (dare_*, della*) draw their masks from the counter-based Philox generator,
  keyed by the ``random_seed`` parameter and the tensor's ``name`` (reproducible per tensor);
* invalid input raises a :class:`~fusion_engine.errors.FusionEngineError` subclass naming the
  parameter, tensor or input; NaN/Inf inputs raise :class:`NonFiniteError` unless
  ``check_finite=False`` (mergekit propagates them);
* merges are differentiable as mergekit's are: when an input requires grad (and grad mode is on),
  a method marked ``differentiable`` runs its exact torch path instead of the fused ops, and
  autograd records it (masks and sign elections are piecewise constant: gradients flow through the
  kept entries). The methods mergekit does not have (fisher, regmean, ...) return a result without a graph.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from ..errors import ConfigError, DTypeMismatchError, MissingTensorError, NonFiniteError
from . import registry as R
from ..ops._common import check_tensors
from ..ops.nonfinite import any_nonfinite

# methods whose fused ops or reductions report NaN/Inf inputs themselves (one pass fewer)
CHECKED_BY_OPS = {"linear", "fisher", "task_arithmetic", "ties", "dare_ties", "dare_linear",
                  "slerp", "nuslerp", "multislerp", "karcher", "model_stock"}


class PerGroupValues:
    """A parameter value per tensor of :func:`merge_state_dicts` (in the state dicts' key order,
    buffers included), like mergekit's ``PerGroupValues`` (which is accepted too)."""

    def __init__(self, values: Sequence[Any]):
        self.values = tuple(values)

    def __repr__(self) -> str:
        return f"PerGroupValues({list(self.values)!r})"


def _check_dtype_arg(what: str, value) -> None:
    if value is not None and (not isinstance(value, torch.dtype) or not value.is_floating_point):
        raise DTypeMismatchError(f"{what}={value!r} must be a floating-point torch.dtype "
                                 f"(torch.float32, torch.bfloat16, torch.float16, torch.float64)")


def _nonfinite(tensors: list[torch.Tensor], ids: list) -> list:
    return [key for key, t in zip(ids, tensors) if any_nonfinite([t])]


def _raise_nonfinite(method: str, label: str, bad: list, cause: Exception | None = None):
    where = f" for {label}" if label else ""
    raise NonFiniteError(f"{method}{where}: input(s) {', '.join(map(repr, bad)) or '?'} hold NaN or Inf values; "
                         f"clean the checkpoint, or pass check_finite=False to let them propagate") from cause


def merge_tensors(tensors: Sequence[torch.Tensor], method: str | R.Method, *,
                  parameters: Mapping[str, Any] | None = None, ids: Sequence[Hashable] | None = None,
                  base_index: int | None = None, name: str | None = None, dtype: torch.dtype | None = None,
                  out_dtype: torch.dtype | None = None, check_finite: bool = True,
                  backend: str | None = None) -> torch.Tensor:
    """Merge the inputs of one output tensor with a mergekit method.

    Parameters
    ----------
    tensors : the K input tensors (one shape, one device), in input order
    method : a method name (:func:`fusion_engine.methods.names`) or a :class:`Method`
    parameters : the method's parameters. Shared ones take a scalar; per-input ones a scalar
        (broadcast), a sequence in input order, or a mapping keyed by ``ids`` (see
        :func:`validate_parameters`). Random methods also take ``random_seed``.
    ids : hashable input ids (default 0 … K−1), the keys of mapping parameters
    base_index : which input is the base model (the index into ``tensors``)
    name : the output tensor's name: labels errors and selects the random stream
    dtype : the working dtype the inputs are converted to (default: their promoted dtype)
    out_dtype : the result's dtype (default: the working dtype)
    check_finite : raise :class:`NonFiniteError` naming NaN/Inf inputs (mergekit propagates them)
    backend : the ops' backend (``"cpp"``, ``"triton"``, ``"cuda"``, ``"torch"``; None: automatic)

    Returns
    -------
    The merged tensor, shaped like the inputs. Inputs are never modified; ``passthrough`` without
    a scale or dtype change returns its input itself, as mergekit does.

    Example
    -------
    >>> merge_tensors([base, a, b], "ties", base_index=0,
    ...               parameters={"weight": [1.0, 0.5], "density": 0.5})
    """
    m = R.get(method)
    if isinstance(tensors, torch.Tensor):
        raise ConfigError(f"{m.name}: tensors must be a sequence of tensors, not one tensor (wrap it: [t])")
    tensors = list(tensors)
    label = name or ""
    if not tensors:
        raise ConfigError(f"{m.name}{f' for {label}' if label else ''}: no input tensors")
    bound = R.validate_parameters(m, parameters, len(tensors), base_index=base_index, ids=ids, label=label)
    base_index = m.check_inputs(len(tensors), base_index, label)
    return merge_bound(tensors, m, bound, ids=ids, base_index=base_index, name=name, dtype=dtype,
                       out_dtype=out_dtype, check_finite=check_finite, backend=backend)


def merge_bound(tensors: list[torch.Tensor], method: R.Method, bound: dict[str, Any], *,
                ids: Sequence[Hashable] | None = None, base_index: int | None = None, name: str | None = None,
                dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None, check_finite: bool = True,
                backend: str | None = None) -> torch.Tensor:
    """:func:`merge_tensors` for parameters already bound and checked by :func:`validate_parameters`
    (and an input count and base the method takes): the checkpoint executor merges its planned
    tasks with it, the planner having validated each distinct parameter set once. The tensors are
    still checked (floating, one shape, one device, finite)."""
    m = method
    label = name or ""
    ids = list(range(len(tensors))) if ids is None else list(ids)
    check_tensors(m.name + (f" for {label}" if label else ""),
                  [(f"input {key!r}", t) for key, t in zip(ids, tensors)], same_dtype=False)
    _check_dtype_arg("dtype", dtype)
    _check_dtype_arg("out_dtype", out_dtype)
    working = dtype
    if working is None:
        working = tensors[0].dtype
        for t in tensors[1:]:
            working = torch.promote_types(working, t.dtype)
    result_dtype = out_dtype or working
    if tensors[0].numel() == 0:
        return torch.empty(tensors[0].shape, dtype=result_dtype, device=tensors[0].device)
    if check_finite and m.name not in CHECKED_BY_OPS and (bad := _nonfinite(tensors, ids)):
        _raise_nonfinite(m.name, label, bad)
    grad = m.differentiable and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    group = R.Group([t if t.dtype == working else t.to(working) for t in tensors], base_index, name,
                    result_dtype, backend, check_finite, grad)
    try:
        with torch.set_grad_enabled(grad):
            result = m.merge(group, **bound)
    except NonFiniteError as error:
        _raise_nonfinite(m.name, label, _nonfinite(tensors, ids), error)
    return result


def merge_state_dicts(models: Mapping[Hashable, Any] | Sequence[Any], method: str | R.Method, *,
                      parameters: Mapping[str, Any] | None = None, base: Hashable | None = None,
                      strict: bool = True, dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None,
                      batch_options: Any = None, check_finite: bool = True,
                      backend: str | None = None) -> dict[str, torch.Tensor]:
    """Merge whole in-memory models (state dicts or ``nn.Module``\\ s), tensor by tensor.

    Parameters
    ----------
    models : a mapping id → state dict / module, or a sequence (ids 0 … K−1)
    method, dtype, out_dtype, check_finite, backend : as in :func:`merge_tensors`
    parameters : as in :func:`merge_tensors`, broadcast to every tensor; a
        :class:`PerGroupValues` gives one value per tensor (state-dict key order, buffers included)
    base : the id of the base model
    strict : every model must have the same keys (else :class:`MissingTensorError`); with False,
        only the keys every model has are merged
    batch_options : accepted for mergekit compatibility; tensors are merged one at a time

    Returns
    -------
    name → merged tensor, in the first model's key order. Non-floating buffers are copied when
    every model holds the same values (else :class:`ConfigError`).
    """
    m = R.get(method)
    del batch_options
    items = list(models.items()) if isinstance(models, Mapping) else list(enumerate(models))
    if not items:
        raise ConfigError(f"{m.name}: no models to merge")
    state_dicts = [(key, _as_state_dict(m.name, key, model)) for key, model in items]
    input_ids = [key for key, _ in state_dicts]
    if base is not None and base not in input_ids:
        raise ConfigError(f"{m.name}: base {base!r} is not one of the models {input_ids}")
    base_index = input_ids.index(base) if base is not None else None
    key_sets = [set(sd) for _, sd in state_dicts]
    union = set().union(*key_sets)
    if strict and any(keys != union for keys in key_sets):
        missing = {key: sorted(union - keys) for key, keys in zip(input_ids, key_sets) if keys != union}
        raise MissingTensorError(f"{m.name}: the models have different tensor names; missing per model: {missing} "
                                 f"(pass strict=False to merge only the common tensors)")
    tensor_names = [n for n in state_dicts[0][1] if all(n in keys for keys in key_sets)]
    m.check_inputs(len(input_ids), base_index)
    for pname, value in (parameters or {}).items():
        if R.is_per_group(value) and len(value.values) != len(tensor_names):
            raise ConfigError(f"{m.name}: parameter {pname} has {len(value.values)} per-tensor values for "
                              f"{len(tensor_names)} tensors")
    merged = {}
    for index, tensor_name in enumerate(tensor_names):
        tensors = [sd[tensor_name] for _, sd in state_dicts]
        if not all(t.is_floating_point() for t in tensors):
            merged[tensor_name] = _copy_buffer(m.name, tensor_name, tensors, input_ids)
            continue
        group_parameters = {k: (v.values[index] if R.is_per_group(v) else v) for k, v in (parameters or {}).items()}
        merged[tensor_name] = merge_tensors(tensors, m, parameters=group_parameters, ids=input_ids,
                                            base_index=base_index, name=tensor_name, dtype=dtype,
                                            out_dtype=out_dtype, check_finite=check_finite, backend=backend)
    return merged


def _as_state_dict(method: str, key, model) -> Mapping[str, torch.Tensor]:
    if isinstance(model, torch.nn.Module):
        model = model.state_dict(keep_vars=True)  # parameters keep their autograd connection (mergekit)
    if not isinstance(model, Mapping):
        raise ConfigError(f"{method}: model {key!r} is a {type(model).__name__}; pass a state dict or an nn.Module")
    for name, tensor in model.items():
        if not isinstance(name, str):
            raise ConfigError(f"{method}: model {key!r} has a non-string key {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise ConfigError(f"{method}: model {key!r} maps {name!r} to a {type(tensor).__name__}, not a tensor")
    return model


def _copy_buffer(method: str, name: str, tensors: list[torch.Tensor], ids: list) -> torch.Tensor:
    first = tensors[0]
    for key, t in zip(ids[1:], tensors[1:]):
        if t.dtype != first.dtype or t.shape != first.shape or not torch.equal(t, first):
            raise ConfigError(f"{method}: non-floating buffer {name!r} differs between model {ids[0]!r} and "
                              f"model {key!r}; make them equal (or drop it) before merging")
    return first.clone()
