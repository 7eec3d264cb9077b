"""Tiny Llamas and PEFT LoRA adapters for the LoRA tests (built once per session, never modified).

``tiny_lora()`` saves a seeded tiny Llama base, a second model, and a PEFT LoRA adapter with random
non-zero ``B`` (``init_lora_weights=False``) on attention, MLP, ``lm_head`` and the embedding, with
``rank_pattern``/``alpha_pattern`` and rsLoRA, plus the base with that adapter merged by PEFT's
``merge_and_unload`` (the reference).
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

import torch

from fusion_engine.demo import build_tiny_llamas

ROOT = tempfile.mkdtemp(prefix="fe_lora_tests_")
atexit.register(shutil.rmtree, ROOT, ignore_errors=True)


def scratch(name: str) -> str:
    return tempfile.mkdtemp(prefix=f"{name}_", dir=ROOT)


def peft_lora(model, *, seed: int, **config):
    """``get_peft_model`` with a random non-zero LoRA (B too), seeded."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():  # PEFT's non-zero init is small for B; scale it so the delta is visible
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(10.0)
    return peft_model


LORA_CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "lm_head", "embed_tokens"],
                   rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"down_proj": 3}, use_rslora=True)


@functools.lru_cache(maxsize=None)
def tiny_lora(dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """{"base", "model_0", "model_1", "adapter", "merged"} -> folder."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    folder = os.path.join(ROOT, f"lora_{str(dtype).removeprefix('torch.')}")
    paths = build_tiny_llamas(folder, n_models=2, num_layers=2, hidden=32, seed=7, dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=dtype)
    peft_model = peft_lora(model, seed=11, **LORA_CONFIG)
    paths["adapter"] = os.path.join(folder, "adapter")
    peft_model.save_pretrained(paths["adapter"])
    merged = peft_model.merge_and_unload()
    paths["merged"] = os.path.join(folder, "merged")
    merged.save_pretrained(paths["merged"], safe_serialization=True)
    shutil.copy(os.path.join(paths["base"], "tokenizer.json"), paths["merged"])
    return paths
