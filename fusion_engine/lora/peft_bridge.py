"""PEFT's ``LoraModel.add_weighted_adapter`` on :func:`fusion_engine.lora.merge.merge_factors`.

Installed by :func:`fusion_engine.compat.peft.patch`. Same signature and arguments; what changes:

* every ``combination_type`` merges the products ``s_k B_k A_k`` (no cross-terms): ``linear`` is exact
  task arithmetic (rank ``svd_rank`` or the numerical rank of the sum), ``ties``/``dare_*``/
  ``magnitude_prune`` and their ``*_svd`` twins are the same merge on the products followed by an SVD to
  ``svd_rank`` (default: the module's largest input rank), ``svd`` is PEFT's (task arithmetic + SVD),
  ``cat`` concatenates;
* ranks are per module: the new adapter's ``rank_pattern``/``alpha_pattern`` hold every module whose
  rank differs from ``r`` (the largest), scaling 1 everywhere and ``use_rslora`` off, so the rsLoRA
  scale is right and the ranks survive ``save_pretrained``;
* the SVDs run in float32 on the factors (fp16/bf16 adapters work) and conv layers of any dimension work.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from ..errors import ConfigError
from .merge import DENSE_METHODS, merge_factors

COMBINATIONS = {"svd": "linear", "linear": "linear", "cat": "cat",
                **{m: m for m in DENSE_METHODS}, **{f"{m}_svd": m for m in DENSE_METHODS}}


def _lora_params(target, adapter: str):
    if adapter in target.lora_A:
        return target.lora_A[adapter].weight, target.lora_B[adapter].weight
    if adapter in target.lora_embedding_A:
        return target.lora_embedding_A[adapter], target.lora_embedding_B[adapter]
    return None


def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                         svd_full_matrices: bool = True, svd_driver: str | None = None, density: float | None = None,
                         majority_sign_method: str = "total") -> None:
    """Add ``adapter_name``, the merge of ``adapters`` with ``weights`` (see the module docstring)."""
    from peft.tuners.lora.layer import LoraLayer
    from peft.utils import _freeze_adapter

    if adapter_name in self.peft_config:
        return
    if combination_type not in COMBINATIONS:
        raise ConfigError(f"Invalid combination_type: {combination_type} (one of {', '.join(COMBINATIONS)})")
    if any(self.peft_config[a].use_dora for a in adapters if a in self.peft_config):
        raise ConfigError("add_weighted_adapter cannot merge DoRA adapters")
    _, _, targets = self._check_add_weighted_adapter(adapters=adapters, combination_type="svd", svd_rank=svd_rank)
    method = COMBINATIONS[combination_type]
    merged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, target in self.model.named_modules():
        if not isinstance(target, LoraLayer):
            continue
        factors, used = [], []
        for adapter, weight in zip(adapters, weights):
            params = _lora_params(target, adapter)
            if params is not None:
                a, b = params
                factors.append(((a.detach().float() * target.scaling[adapter]).flatten(1), b.detach().float().flatten(1)))
                used.append(weight)
        if not factors:
            continue
        rank = svd_rank or (max(a.shape[0] for a, _ in factors) if combination_type == "svd" else None)
        merged[key] = merge_factors(factors, used, method, rank=rank, density=density,
                                    majority_sign_method=majority_sign_method,
                                    clamp=svd_clamp if combination_type.endswith("svd") else None)
    if not merged:
        raise ConfigError(f"no module carries any of the adapters {adapters}")
    ranks = {key: a.shape[0] for key, (a, _) in merged.items()}
    r = max(ranks.values())
    pattern = {re.escape(key): k for key, k in ranks.items() if k != r}
    self.peft_config[adapter_name] = replace(self.peft_config[adapters[0]], r=r, lora_alpha=r, target_modules=targets,
                                             rank_pattern=pattern, alpha_pattern=dict(pattern), use_rslora=False)
    self.inject_adapter(self.model, adapter_name)
    _freeze_adapter(self.model, adapter_name)
    for key, target in self.model.named_modules():
        params = _lora_params(target, adapter_name) if isinstance(target, LoraLayer) else None
        if params is None:
            continue
        a_param, b_param = params
        if key not in merged:
            a_param.data.zero_()
            b_param.data.zero_()
            continue
        a, b = merged[key]
        a_param.data = a.reshape(a_param.shape).to(a_param.dtype)
        b_param.data = b.reshape(b_param.shape).to(b_param.dtype)
