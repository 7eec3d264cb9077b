"""Measurements of models the merging literature uses: task-vector geometry, loss landscapes, CKA.

* :mod:`.geometry` — cosines, sign conflicts and singular-subspace overlaps of task vectors, per tensor;
* :mod:`.landscape` — interpolation curves, the barrier per layer, the loss plane through three models;
* :mod:`.cka` — linear CKA between two models' representations, layer by layer, streamed;
* :mod:`.report` — :func:`analyze` and :func:`write_report` (markdown + PNG figures);
* :mod:`.examples` — the digits task set, a tiny causal LM, and checkpoints on disk
  (``fusion-engine analyze``).
"""

from .cka import LayerCKA, linear_cka, representation_cka
from .geometry import TaskVectorGeometry, task_vector_geometry
from .landscape import Curve1D, LossPlane, interpolation_curve, layerwise_barriers, loss_plane
from .report import AnalysisReport, analyze, write_report

__all__ = ["AnalysisReport", "Curve1D", "LayerCKA", "LossPlane", "TaskVectorGeometry", "analyze",
           "interpolation_curve", "layerwise_barriers", "linear_cka", "loss_plane", "representation_cka",
           "task_vector_geometry", "write_report"]
