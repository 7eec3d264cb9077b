"""Builders shared by the checkpoint I/O tests: tiny checkpoints on disk and hand-made merge plans."""

from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors.torch import save_file

from fusion_engine.checkpoint.plan import MergePlan, TensorRef, TensorTask

SHAPES = {"model.embed_tokens.weight": (37, 16), "model.layers.0.mlp.up_proj.weight": (24, 16),
          "model.layers.0.input_layernorm.weight": (16,), "model.layers.1.mlp.up_proj.weight": (24, 16),
          "model.norm.weight": (16,), "lm_head.weight": (37, 16)}


def state_dict(seed: int, dtype=torch.bfloat16, shapes=SHAPES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g).to(dtype) for name, shape in shapes.items()}


def write_model(folder, sd: dict, *, shards: int = 1, fmt: str = "safetensors", config: dict | None = None,
                tokenizer: str | None = None) -> str:
    """A HF-style model folder: weights (single, sharded with an index, or .bin), config.json, tokenizer.json."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    names = list(sd)
    if fmt == "bin":
        torch.save(sd, os.path.join(folder, "pytorch_model.bin"))
    elif shards == 1:
        save_file(sd, os.path.join(folder, "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            part = names[i::shards]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: sd[n] for n in part}, os.path.join(folder, fname))
            weight_map.update({n: fname for n in part})
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(config or {"model_type": "llama", "hidden_size": 16}, fh)
    with open(os.path.join(folder, "tokenizer.json"), "w") as fh:
        fh.write(tokenizer or '{"version": "1.0"}')
    return folder


def linear_plan(models: dict[str, str], weights: list[float], shapes=SHAPES, out_dtype=None) -> MergePlan:
    keys = list(models)
    tasks = [TensorTask(name, "linear", [TensorRef(k, name) for k in keys], None,
                        {"weight": list(weights), "normalize": True}, tuple(shape), out_dtype=out_dtype)
             for name, shape in shapes.items()]
    return MergePlan(models=dict(models), tasks=tasks)


def expected_linear(sds: list[dict], weights: list[float], out_dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    import fusion_engine

    merge = getattr(fusion_engine, "merge_tensors", None)
    out = {}
    for name in sds[0]:
        xs = [sd[name] for sd in sds]
        if merge is not None:
            out[name] = merge(xs, "linear", parameters={"weight": list(weights), "normalize": True}, base_index=None,
                              name=name, dtype=None, out_dtype=out_dtype)
        else:
            acc = sum(w * x.float() for w, x in zip(weights, xs)) / sum(weights)
            out[name] = acc.to(out_dtype)
    return out


def tree_digest(folder) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder``."""
    digests = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                digests[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return digests
