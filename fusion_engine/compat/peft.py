"""PEFT on fusion_engine: :func:`patch` installs the drop-in ``peft.utils.merge_utils`` functions
(:mod:`fusion_engine.compat.peft_merge_utils`, re-exported here) and replaces
``LoraModel.add_weighted_adapter`` by :func:`fusion_engine.lora.peft_bridge.add_weighted_adapter`
(merges of the products B·A for every combination type, per-module ranks kept); :func:`unpatch`
restores PEFT's own.
"""

from __future__ import annotations

import importlib

from .peft_merge_utils import (calculate_majority_sign_mask, dare_linear, dare_ties, disjoint_merge,
                               magnitude_based_pruning, magnitude_prune, prune, random_pruning,
                               reshape_weight_task_tensors, task_arithmetic, ties)

__all__ = ["calculate_majority_sign_mask", "dare_linear", "dare_ties", "disjoint_merge", "is_patched",
           "magnitude_based_pruning", "magnitude_prune", "patch", "prune", "random_pruning",
           "reshape_weight_task_tensors", "task_arithmetic", "ties", "unpatch"]

# -- patching PEFT ----------------------------------------------------------------------------------

PATCHED = ("reshape_weight_task_tensors", "magnitude_based_pruning", "random_pruning", "prune",
           "calculate_majority_sign_mask", "disjoint_merge", "task_arithmetic", "magnitude_prune", "ties",
           "dare_linear", "dare_ties")
# modules that import the functions by name (``from peft.utils.merge_utils import ties``)
_IMPORTERS = ("peft.utils.merge_utils", "peft.tuners.lora.model")
_LORA_MODEL = "peft.tuners.lora.model"
_originals: dict[tuple[str, str], object] = {}


def _resolve(module_name: str, dotted: str):
    """(owner, attribute) of ``module_name.dotted``, e.g. the class holding a patched method."""
    owner = importlib.import_module(module_name)
    *path, attr = dotted.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, attr


def patch() -> None:
    """Make PEFT use fusion_engine's merges. Idempotent.

    ``LoraModel.add_weighted_adapter`` becomes :func:`fusion_engine.lora.peft_bridge.add_weighted_adapter`
    (every combination type merges the products B·A, ranks kept per module); the ``merge_utils`` functions
    become those of :mod:`fusion_engine.compat.peft_merge_utils`.
    """
    from ..lora.peft_bridge import add_weighted_adapter

    ours = dict(globals(), **{"LoraModel.add_weighted_adapter": add_weighted_adapter})
    for module_name in _IMPORTERS:
        for name in PATCHED + (("LoraModel.add_weighted_adapter",) if module_name == _LORA_MODEL else ()):
            owner, attr = _resolve(module_name, name)
            if hasattr(owner, attr) and (module_name, name) not in _originals:
                _originals[(module_name, name)] = getattr(owner, attr)
                setattr(owner, attr, ours[name])


def unpatch() -> None:
    """Restore PEFT's own functions (no-op when not patched)."""
    while _originals:
        (module_name, name), original = _originals.popitem()
        setattr(*_resolve(module_name, name), original)


def is_patched() -> bool:
    return bool(_originals)
