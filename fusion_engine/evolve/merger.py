"""Merge a recipe in memory: the checkpoint pipeline's plan, with the inputs held on the device.

:class:`InMemoryMerger` opens the recipe's checkpoints once and keeps every input tensor it has read
on ``device``; :meth:`InMemoryMerger.merge` parses a recipe (mergekit YAML text), plans it exactly as
``fusion-engine merge`` does (:func:`fusion_engine.checkpoint.planner.build_plan`) and computes each
output tensor with the executor's own :func:`~fusion_engine.checkpoint.executor.merge_job`. Nothing is
written, and on the same device the state dict equals, bit for bit, what ``fusion-engine merge`` writes
for that YAML.
"""

from __future__ import annotations

import torch

from ..checkpoint.config import parse_config
from ..checkpoint.executor import merge_job, resolve_jobs
from ..checkpoint.planner import build_plan
from ..lora import open_model_into


class InMemoryMerger:
    """Merges recipes over one set of checkpoints without writing; use as a context manager."""

    def __init__(self, device: str | torch.device = "cpu", base_dir: str = "."):
        self.device = torch.device(device)
        self.base_dir = base_dir
        self._ckpts: dict = {}
        self._tensors: dict[tuple[str, str], torch.Tensor] = {}

    def _input(self, model: str, name: str) -> torch.Tensor:
        key = (model, name)
        if key not in self._tensors:
            self._tensors[key] = self._ckpts[model].read(name).to(self.device)
        return self._tensors[key]

    def merge(self, recipe: str, filename: str = "recipe.yaml") -> dict[str, torch.Tensor]:
        """The merged state dict (on the device) of the mergekit YAML text ``recipe``."""
        plan = build_plan(parse_config(recipe, filename, self.base_dir))
        for key, path in plan.models.items():  # BASE+LORA references too
            open_model_into(self._ckpts, key, path)
        return {job.task.out_name: merge_job(job, [self._input(r.model, r.name) for r in job.task.inputs])
                for job in resolve_jobs(plan, self._ckpts)}

    def close(self) -> None:
        for ck in self._ckpts.values():
            ck.close()
        self._ckpts.clear()
        self._tensors.clear()

    def __enter__(self) -> "InMemoryMerger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
