"""Alignment inside the checkpoint merge: permute HF checkpoints onto a reference before merging (the YAML's
``alignment: weight_matching`` or ``alignment: {method: activation_matching, data: prompts.txt}``).

For every model other than the reference (the base model, else the first), the permutations of a
transformer spec (GPT-2 or Llama names; heads, GQA groups, per-head value dims, FFN, residual stream)
are found against the reference, and the model is wrapped so that every tensor read during the
streamed merge comes out permuted (:class:`PermutedCheckpoint`): one gather per permuted axis, per
tensor, as it is read.

* Weight matching needs every tensor of the spec of both models at once (the residual-stream
  permutation couples all layers); they are memory-mapped from the checkpoints
  (:meth:`Checkpoint.load`), not copied.
* Activation matching runs both models (``transformers`` ``AutoModelForCausalLM``, fp32, CPU) on the
  prompts, tokenized with the reference's tokenizer (:func:`fusion_engine.io.prompts.load_token_ids`),
  streaming the activation statistics over batches of 8 sequences.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..errors import CheckpointError
from .builders import transformer_permutation_spec
from .spec import PermutationSpec, permute_tensor
from .activation_matching import activation_matching
from .weight_matching import weight_matching

METHODS = ("weight_matching", "activation_matching")
BATCH = 8  # sequences per forward pass of activation matching


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


def _causal_lm(checkpoint):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(checkpoint.directory, dtype=torch.float32).eval()
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"alignment: {checkpoint.path} cannot be loaded as a causal LM by transformers "
                              f"({exc}); activation matching runs the models") from exc


def align_checkpoints(method: str, reference: str, checkpoints: Mapping[str, object], *,
                      data: str | None = None) -> dict[str, object]:
    """``checkpoints`` with every model but ``reference`` wrapped in a :class:`PermutedCheckpoint` aligning it
    to the reference by ``method`` (``"weight_matching"``, or ``"activation_matching"`` on the prompts file
    ``data``): :func:`alignment_permutations`, then :func:`permuted_checkpoints`."""
    perms = alignment_permutations(method, reference, checkpoints, data=data)
    return permuted_checkpoints(checkpoints, reference, perms)


def permuted_checkpoints(checkpoints: Mapping[str, object], reference: str,
                         perms: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, object]:
    """``checkpoints`` with each model of ``perms`` (model key → permutations onto ``reference``) wrapped in
    a :class:`PermutedCheckpoint`. The spec is rebuilt from the reference's shapes and config (the same
    on every process of a distributed merge, which receives only the permutations)."""
    spec = checkpoint_spec(checkpoints[reference])
    out = dict(checkpoints)
    for key, model_perms in perms.items():
        out[key] = PermutedCheckpoint(checkpoints[key], spec, model_perms)
    return out


def alignment_permutations(method: str, reference: str, checkpoints: Mapping[str, object], *,
                           data: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """For every model but ``reference``: the permutations (name → int64 tensor) that align it to the
    reference by ``method``."""
    if method not in METHODS:
        raise CheckpointError(f"alignment: {method!r} is not available in a merge config; use one of {METHODS}")
    if method == "activation_matching" and data is None:
        raise CheckpointError("alignment: activation_matching needs a prompts file (alignment: {method: "
                              "activation_matching, data: prompts.txt})")
    ref = checkpoints[reference]
    spec = checkpoint_spec(ref)
    if method == "weight_matching":
        ref_weights = {k: ref.load(k) for k in spec.param_shapes}
    else:
        from ..io.prompts import load_token_ids

        ids = load_token_ids(data, ref.directory)
        batches = [ids[i:i + BATCH] for i in range(0, len(ids), BATCH)]
        ref_model = _causal_lm(ref)
    out = {}
    for key, ck in checkpoints.items():
        if key == reference:
            continue
        for k, shape in spec.param_shapes.items():
            if k not in ck or tuple(ck.info(k).shape) != shape:
                raise CheckpointError(f"alignment: model {key!r} has no tensor {k!r} of shape {list(shape)} like the "
                                      f"reference {reference!r}; alignment needs models of one architecture")
        if method == "weight_matching":
            out[key] = weight_matching(spec, ref_weights, {k: ck.load(k) for k in spec.param_shapes})
        else:
            model = _causal_lm(ck)
            out[key] = activation_matching(transformer_permutation_spec(model), ref_model, model, batches)
    return out
