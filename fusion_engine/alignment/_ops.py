"""The alignment ops this package builds on (one import point, so the algorithms read ``_ops.<op>``)."""

from ..ops import cost_matrix, linear_assignment, sinkhorn

__all__ = ["cost_matrix", "linear_assignment", "sinkhorn"]
