"""Merge ops: each module holds the public function, its torch reference and its dispatch entry."""

from .dare_merge import dare_merge
from .fisher_merge import fisher_merge
from .linear_merge import linear_merge
from .magnitude_mask import magnitude_mask
from .philox import stream_id
from .task_arithmetic import task_arithmetic
from .ties_merge import ties_merge

__all__ = ["dare_merge", "fisher_merge", "linear_merge", "magnitude_mask", "stream_id",
           "task_arithmetic", "ties_merge"]
