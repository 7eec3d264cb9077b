"""A checkpoint merge, planned: what every output tensor is made of, before any tensor is read.

The planner (:func:`fusion_engine.checkpoint.planner.build_plan`) turns a parsed mergekit config
(:mod:`fusion_engine.checkpoint.config`) into a :class:`MergePlan` after validating it against the
checkpoints' headers; the executor (:func:`fusion_engine.checkpoint.executor.run_plan`) streams the plan:
read the inputs of one task, merge them with the task's method, write the result at its planned offset, next.
Nothing in a plan holds tensor data, so a plan for a 70B merge is a few MB.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


# Files copied beside the merged weights (from ``tokenizer_source``, else the reference model)
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
              "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json",
              "generation_config.json")
# the tokenizer's part of them (what mergekit-yaml --no-copy-tokenizer leaves out)
TOKENIZER_FILES = tuple(name for name in SIDE_FILES if name != "generation_config.json")


@dataclass(frozen=True)
class TensorRef:
    """One input tensor: ``name`` inside the checkpoint the config calls ``model``."""

    model: str
    name: str


@dataclass
class TensorTask:
    """One output tensor.

    ``inputs`` are in the config's model order; ``base_index`` points into them (None: no base).
    ``parameters`` are the method's parameters after resolving every config level and gradient for
    this tensor: per-input ones as lists aligned with ``inputs``, global ones as scalars. They are
    passed unchanged to :func:`fusion_engine.merge_tensors`. ``method == "passthrough"`` with one
    input copies it (frankenmerge slices). ``bound`` holds them as the planner validated and bound
    them (:func:`fusion_engine.methods.validate_parameters`), so the executor merges without checking
    them again; None (a plan made by hand) makes the executor bind ``parameters`` itself.
    ``lines_scale`` (LiNeS, None: off) rescales the merged task vector: y' = b + s (y − b).
    """

    out_name: str
    method: str
    inputs: list[TensorRef]
    base_index: int | None
    parameters: dict[str, Any]
    shape: tuple[int, ...]
    dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    bound: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    lines_scale: float | None = None
    vocabulary: Any = None  # a fusion_engine.tokenizer.VocabularyPlan: inputs re-indexed into the output vocabulary

    @property
    def out_numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class MergePlan:
    """Everything the executor needs: the models, the tasks in output order, the side files."""

    models: dict[str, str]  # model key as written in the config -> local checkpoint directory or file
    tasks: list[TensorTask]
    config_json: dict[str, Any] | None = None  # config.json of the output (e.g. num_hidden_layers after slices)
    extra_files: dict[str, str] = field(default_factory=dict)  # output file name -> source path (tokenizer, ...)
    generated_files: dict[str, bytes] = field(default_factory=dict)  # output file name -> content (README.md)
    reads: dict[str, str] = field(default_factory=dict)  # what else the merge reads (label -> path): output guard
    default_out_dtype: torch.dtype | None = None
    alignment: str | None = None  # permute every model onto the reference before merging (alignment.checkpoints)
    alignment_data: str | None = None  # the model inputs of alignment: activation_matching
