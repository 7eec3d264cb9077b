"""``fusion-engine merge-adapters``: PEFT LoRA adapter folders merged into one adapter folder.

Each module that any adapter adapts is merged with :func:`fusion_engine.lora.merge.merge_factors`
over the adapters that adapt it (an adapter without the module contributes nothing, as in PEFT), each
adapter's scaling folded into its factors. The output has scaling 1 everywhere: ``r`` is the largest
merged rank with ``lora_alpha = r``, other ranks in ``rank_pattern``/``alpha_pattern`` (so per-module
ranks survive saving), ``use_rslora`` false. ``lora_B`` biases merge as ``Σ w_k s_k b_k``; tensors stored
whole (``modules_to_save``) as the weighted average ``Σ w_k T_k / Σ w_k`` of the adapters that store them.

Example::

    merge_adapters(["./math", "./code"], [1.0, 1.0], "./both", method="ties", density=0.5, rank=16)
"""

from __future__ import annotations

import os

import torch

from ..errors import ConfigError
from ..io.atomic import check_output_dir
from .adapter import PEFT_PREFIX, LoraAdapter
from .merge import merge_factors
from .save import rank_config, write_adapter


def _factor_keys(adapter: LoraAdapter, name: str) -> tuple[str, str]:
    lm = adapter.modules[name]
    if lm.embedding:
        return f"{PEFT_PREFIX}{lm.module}.lora_embedding_A", f"{PEFT_PREFIX}{lm.module}.lora_embedding_B"
    return f"{PEFT_PREFIX}{lm.module}.lora_A.weight", f"{PEFT_PREFIX}{lm.module}.lora_B.weight"


def merge_adapters(adapters: list[str], weights: list[float], out_path: str, method: str = "linear", *,
                   rank: int | None = None, density: float | None = None, majority_sign_method: str = "total",
                   seed: int | None = None, allow_overwrite: bool = False) -> dict[str, int]:
    """Merge the adapter folders ``adapters`` with ``weights`` into ``out_path``; returns the rank per module.

    ``method``, ``rank``, ``density`` and ``majority_sign_method`` are those of
    :func:`~fusion_engine.lora.merge.merge_factors`; ``seed`` seeds the DARE masks.
    """
    if len(adapters) != len(weights) or not adapters:
        raise ConfigError(f"{len(adapters)} adapters but {len(weights)} weights: give one weight per adapter")
    check_output_dir(out_path, allow_overwrite)
    opened: list[LoraAdapter] = []
    try:
        for path in adapters:
            opened.append(LoraAdapter(path))
        flags = {bool(a.config.get("fan_in_fan_out")) for a in opened}
        if len(flags) > 1:
            raise ConfigError("the adapters disagree on fan_in_fan_out; merge adapters of one base model")
        if seed is not None:
            torch.manual_seed(seed)
        entries, ranks = [], {}
        names = list(dict.fromkeys(n for a in opened for n in a.modules))
        for name in names:
            have = [(a, w) for a, w in zip(opened, weights) if name in a.modules]
            a_merged, b_merged = merge_factors([a.factors(name) for a, _ in have], [w for _, w in have], method,
                                               rank=rank, density=density, majority_sign_method=majority_sign_method)
            first = have[0][0]
            a_shape, b_shape, dtype = first.factor_layout(name)
            k = a_merged.shape[0]
            key_a, key_b = _factor_keys(first, name)
            entries += [(key_a, a_merged.reshape(k, *a_shape[1:]).to(dtype)),
                        (key_b, b_merged.reshape(b_shape[0], k, *b_shape[2:]).to(dtype))]
            biased = [(a, w) for a, w in have if a.modules[name].bias is not None]
            if biased:
                bias = sum(w * a.modules[name].scaling * a.read(a.modules[name].bias).float() for a, w in biased)
                entries.append((f"{PEFT_PREFIX}{first.modules[name].module}.lora_B.bias", bias.to(dtype)))
            ranks[first.modules[name].module] = k
        for name in dict.fromkeys(n for a in opened for n in a.replacements):
            have = [(a, w) for a, w in zip(opened, weights) if name in a.replacements]
            total = sum(w for _, w in have)
            if total == 0:
                raise ConfigError(f"the weights of the adapters storing {name!r} whole sum to 0: no average exists")
            stored = [a.read(a.replacements[name]) for a, _ in have]
            value = sum(w * t.float() for t, (_, w) in zip(stored, have)) / total
            entries.append((have[0][0].replacements[name], value.to(stored[0].dtype)))
        config = dict(opened[0].config)
        config.update(rank_config(ranks), target_modules=sorted({m.rsplit(".", 1)[-1] for m in ranks}),
                      lora_bias=any(a.bias_of for a in opened), use_dora=False)
        saved = [m for a in opened for m in (a.config.get("modules_to_save") or [])]
        config["modules_to_save"] = list(dict.fromkeys(saved)) or None
        write_adapter(os.fspath(out_path), entries, config, allow_overwrite=allow_overwrite)
        return ranks
    finally:
        for a in opened:
            a.close()
