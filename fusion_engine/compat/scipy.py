"""scipy on fusion_engine: :func:`linear_sum_assignment` is ``scipy.optimize.linear_sum_assignment``
with fusion_engine's solver behind it (:func:`fusion_engine.ops.linear_assignment`): the same
arguments, the same results (the very assignment scipy returns, ties included), the same errors.
:func:`patch` puts it in ``scipy.optimize`` for programs that call scipy; :func:`unpatch` restores
scipy's own.

>>> from fusion_engine.compat import scipy as fe_scipy
>>> fe_scipy.patch()            # before the program imports linear_sum_assignment by name
>>> from scipy.optimize import linear_sum_assignment
"""

from __future__ import annotations

import importlib

import numpy as np
import torch

from .. import ops

__all__ = ["is_patched", "linear_sum_assignment", "patch", "unpatch"]


def linear_sum_assignment(cost_matrix, maximize=False) -> tuple[np.ndarray, np.ndarray]:
    """Solve the linear sum assignment problem, as ``scipy.optimize.linear_sum_assignment``.

    .. math::  \\min_{X} \\sum_{i, j} C_{ij} X_{ij}

    over assignments X of min(n, m) rows to distinct columns (``maximize``: max).

    Parameters
    ----------
    cost_matrix : array-like [n, m] (a list, a NumPy array or matrix, a torch tensor on any device)
        Any dtype NumPy casts to float64 safely (bool, integers, floats); +inf (−inf when
        maximising) forbids a pair.
    maximize : truthy
        Maximise the total instead.

    Returns
    -------
    (row_ind, col_ind) : int64 NumPy arrays, ``row_ind`` ascending (``arange(n)`` when n ≤ m);
        the pairs scipy returns.

    Raises (scipy's types and wording)
    ------
    ValueError "expected a matrix (2-D array), got a K array"; TypeError "Cannot cast array data
    from dtype(...) to dtype('float64') according to the rule 'safe'"; ValueError "matrix contains
    invalid numeric entries" (NaN, −inf; +inf when maximising); ValueError "cost matrix is
    infeasible" (no assignment avoids the forbidden pairs).
    """
    if isinstance(cost_matrix, torch.Tensor):
        cost_matrix = cost_matrix.detach().cpu().numpy()
    array = np.asarray(cost_matrix)
    if array.ndim != 2:
        raise ValueError(f"expected a matrix (2-D array), got a {array.ndim} array")
    if not np.can_cast(array.dtype, np.float64, casting="safe"):
        raise TypeError(f"Cannot cast array data from {array.dtype!r} to dtype('float64') according to the rule "
                        f"'safe'")
    cost = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))
    rows, cols = ops.linear_assignment(cost, maximize=bool(maximize))
    return rows.numpy(), cols.numpy()


# -- patching scipy ---------------------------------------------------------------------------------

# the public name, and the module scipy defines it in
_TARGETS = ("scipy.optimize", "scipy.optimize._lsap")
_originals: dict[str, object] = {}


def patch() -> None:
    """Make ``scipy.optimize.linear_sum_assignment`` this module's. Idempotent. Code that imported the
    function by name before the patch keeps scipy's."""
    for module_name in _TARGETS:
        module = importlib.import_module(module_name)
        if module_name not in _originals and hasattr(module, "linear_sum_assignment"):
            _originals[module_name] = module.linear_sum_assignment
            module.linear_sum_assignment = linear_sum_assignment


def unpatch() -> None:
    """Restore scipy's own function (no-op when not patched)."""
    while _originals:
        module_name, original = _originals.popitem()
        importlib.import_module(module_name).linear_sum_assignment = original


def is_patched() -> bool:
    """Whether ``scipy.optimize.linear_sum_assignment`` is fusion_engine's."""
    return bool(_originals)
