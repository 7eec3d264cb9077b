"""Merge methods built from the ops, with mergekit-compatible names, parameters and defaults (issue 4).

>>> from fusion_engine.methods import merge_tensors, names, get
>>> names()
('arcee_fusion', 'breadcrumbs', ..., 'ties')
>>> get("ties").parameters      # specs: name, scope, default, valid range
>>> merge_tensors([base, a, b], "ties", base_index=0, parameters={"weight": 1.0, "density": 0.3})

Every method of mergekit 0.1.5's registry is here (linear, task_arithmetic, ties, dare_ties,
dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear, slerp, nuslerp, multislerp,
karcher, model_stock, nearswap, sce, ram, ramplus_tl, arcee_fusion, passthrough), plus
``fisher`` (Fisher-weighted averaging with given Fisher tensors or statistics files), ``regmean``
(RegMean from the Gram matrices of statistics files: ``fusion-engine measure``) and the 2024–26
task-vector methods ``tsv``, ``iso_c``, ``iso_cts`` (:mod:`.subspace`), ``magmax``, ``consensus``,
``pcb`` (:mod:`.task_vector_masks`) and ``wudi`` (:mod:`.wudi`); :mod:`.lines` scales any merge by
depth (LiNeS).
"""

from . import (arcee_fusion, fisher, linear, model_stock, nearswap, passthrough, ram,  # noqa: F401  (register)
               regmean, sce, slerp, subspace, task_arithmetic, task_vector_masks, wudi)
from .api import PerGroupValues, merge_state_dicts, merge_tensors
from .registry import Group, Method, Parameter, get, names, register, validate_parameters

__all__ = ["Group", "Method", "Parameter", "PerGroupValues", "get", "merge_state_dicts", "merge_tensors",
           "names", "register", "validate_parameters"]
