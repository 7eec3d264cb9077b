"""Tiny dense checkpoints (Llama, Mistral, Qwen3) with a character tokenizer, and mergekit-moe in-process."""

from __future__ import annotations

import atexit
import functools
import glob
import os
import shutil
import tempfile

import torch
from safetensors.torch import load_file

from fusion_engine.demo import char_tokenizer, llama_config

ROOT = tempfile.mkdtemp(prefix="fe_moe_tests_")
atexit.register(shutil.rmtree, ROOT, ignore_errors=True)


def _config(kind: str):
    import transformers

    base = llama_config(num_layers=2, hidden=32, vocab=128).to_dict()
    if kind == "llama":
        return transformers.LlamaConfig(**base)
    if kind == "mistral":
        return transformers.MistralConfig(**base, sliding_window=None)
    if kind == "qwen3":
        return transformers.Qwen3Config(**{k: v for k, v in base.items() if k not in ("model_type", "head_dim")}, head_dim=8)
    raise ValueError(kind)


@functools.lru_cache(maxsize=None)
def dense_models(kind: str = "llama", n: int = 3) -> dict[str, str]:
    """{"base", "e0", ...} -> folders: a seeded base and n variants whose MLPs differ clearly (delta 0.2)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(_config(kind))
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tok = char_tokenizer()
    g = torch.Generator().manual_seed(8)
    paths = {}
    for i in range(n + 1):
        key = "base" if i == 0 else f"e{i - 1}"
        if i:
            model.load_state_dict({k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in base_state.items()})
        paths[key] = os.path.join(ROOT, kind, key)
        model.save_pretrained(paths[key])
        tok.save_pretrained(paths[key])
    return paths


def scratch(name: str) -> str:
    return tempfile.mkdtemp(prefix=f"{name}_", dir=ROOT)


def load_dir(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(f))
    return out


def mergekit_moe(config_text: str, out_dir: str, seed: int | None = None) -> None:
    """Run mergekit-moe's ``build`` in this process (its import is the slow part of the CLI)."""
    import yaml
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.options import MergeOptions
    from mergekit.scripts.moe import build

    options = MergeOptions(random_seed=seed, device="cpu", quiet=True)
    options.apply_global_options()
    build(MoEMergeConfig.model_validate(yaml.safe_load(config_text)), out_dir, options, device="cpu")
