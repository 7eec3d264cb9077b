"""Measurements of models the merging literature uses: task-vector geometry, loss landscapes, CKA.

* :mod:`.geometry` — cosines, sign conflicts and singular-subspace overlaps of task vectors, per tensor;
* :mod:`.landscape` — interpolation curves, the barrier per layer, the loss plane through three models;
* :mod:`.cka` — linear CKA between two models' representations, layer by layer, streamed;
* :mod:`.report` — :func:`analyze` and :func:`write_report` (markdown + PNG figures);
* :mod:`.examples` — the digits task set, a tiny causal LM, and checkpoints on disk
  (``fusion-engine analyze``).
"""

from .._lazy import lazy_exports

# public name -> the module defining it, imported on first access (the command line stays light)
__getattr__, __dir__ = lazy_exports(__name__, {
    "LayerCKA": ".cka", "linear_cka": ".cka", "representation_cka": ".cka", "TaskVectorGeometry": ".geometry",
    "task_vector_geometry": ".geometry", "Curve1D": ".landscape", "LossPlane": ".landscape",
    "interpolation_curve": ".landscape", "layerwise_barriers": ".landscape", "loss_plane": ".landscape",
    "AnalysisReport": ".report", "analyze": ".report", "write_report": ".report",
})

__all__ = ["AnalysisReport", "Curve1D", "LayerCKA", "LossPlane", "TaskVectorGeometry", "analyze",
           "interpolation_curve", "layerwise_barriers", "linear_cka", "loss_plane", "representation_cka",
           "task_vector_geometry", "write_report"]
