"""Merge ops: each module holds the public function, its torch reference and its registration.

From an op to its kernel in three modules: ``ops/<op>.py`` (validates, flattens, calls
:func:`fusion_engine._dispatch.resolve`) → ``_dispatch.py`` (picks the backend, loads the kernel
registered for it) → ``launchers/cpp.py``, ``launchers/cuda.py`` or ``triton_kernels/<op>.py``
(the kernel call itself).
"""

from .cost_matrix import cost_matrix
from .dare_merge import dare_merge
from .fisher_merge import fisher_merge
from .inner_products import inner_products
from .linear_assignment import linear_assignment
from .linear_merge import linear_merge
from .magnitude_mask import magnitude_mask
from .nonfinite import any_nonfinite
from .philox import stream_id
from .sinkhorn import SinkhornResult, sinkhorn
from .task_arithmetic import task_arithmetic
from .ties_merge import ties_merge

__all__ = ["any_nonfinite", "cost_matrix", "dare_merge", "fisher_merge", "inner_products", "linear_assignment",
           "linear_merge", "magnitude_mask", "stream_id",
           "SinkhornResult", "sinkhorn",
           "task_arithmetic", "ties_merge"]
