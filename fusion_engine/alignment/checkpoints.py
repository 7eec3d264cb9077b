"""Alignment inside the checkpoint merge: permute HF checkpoints onto a reference before merging (the YAML's
``alignment: weight_matching``).

For every model other than the reference (the base model, else the first), the permutations of a
transformer spec (GPT-2 or Llama names; heads, GQA groups, per-head value dims, FFN, residual stream)
are found by weight matching against the reference, and the model is wrapped so that every tensor
read during the streamed merge comes out permuted (:class:`PermutedCheckpoint`): one gather per
permuted axis, per tensor, as it is read. Weight matching itself needs every tensor of the spec of
both models at once (the residual-stream permutation couples all layers); they are memory-mapped
from the checkpoints (:meth:`Checkpoint.load`), not copied.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..errors import CheckpointError
from .builders import transformer_permutation_spec
from .spec import PermutationSpec, permute_tensor
from .weight_matching import weight_matching

METHODS = ("weight_matching",)


class PermutedCheckpoint:
    """A checkpoint whose :meth:`read` returns tensors relabelled by ``perms`` (other methods delegate)."""

    def __init__(self, checkpoint, spec: PermutationSpec, perms: Mapping[str, torch.Tensor]):
        self._checkpoint, self.spec, self.perms = checkpoint, spec, dict(perms)
        self._table = spec.axis_perms()

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        tensor = self._checkpoint.read(name, out)
        if name not in self.spec.param_shapes:
            return tensor
        return permute_tensor(self.spec, name, tensor, self.perms, self._table)

    def __getattr__(self, attr):
        return getattr(self._checkpoint, attr)


def checkpoint_spec(checkpoint) -> PermutationSpec:
    """The transformer spec of a checkpoint, from its tensor shapes and its config.json."""
    cfg = checkpoint.config() or {}
    shapes = {n: torch.empty(checkpoint.info(n).shape, device="meta") for n in checkpoint.names()}
    n_layers = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    n_heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    if not n_layers or not n_heads:
        raise CheckpointError(f"alignment: {checkpoint.path} has no config.json with num_hidden_layers and "
                              f"num_attention_heads; alignment needs them to build the permutation spec")
    return transformer_permutation_spec(shapes, n_layers=n_layers, n_heads=n_heads,
                                        n_kv_heads=cfg.get("num_key_value_heads"))


def align_checkpoints(method: str, reference: str, checkpoints: Mapping[str, object]) -> dict[str, object]:
    """``checkpoints`` with every model but ``reference`` wrapped in a :class:`PermutedCheckpoint` aligning it
    to the reference by ``method`` (``"weight_matching"``)."""
    if method not in METHODS:
        raise CheckpointError(f"alignment: {method!r} is not available in a merge config; use one of {METHODS} "
                              f"(activation matching needs model inputs: align in Python with "
                              f"fusion_engine.alignment.activation_matching and merge the aligned checkpoint)")
    ref = checkpoints[reference]
    spec = checkpoint_spec(ref)
    ref_weights = {k: ref.load(k) for k in spec.param_shapes}
    out = dict(checkpoints)
    for key, ck in checkpoints.items():
        if key == reference:
            continue
        for k, shape in spec.param_shapes.items():
            if k not in ck or tuple(ck.info(k).shape) != shape:
                raise CheckpointError(f"alignment: model {key!r} has no tensor {k!r} of shape {list(shape)} like the "
                                      f"reference {reference!r}; alignment needs models of one architecture")
        perms = weight_matching(spec, ref_weights, {k: ck.load(k) for k in spec.param_shapes})
        out[key] = PermutedCheckpoint(ck, spec, perms)
    return out
