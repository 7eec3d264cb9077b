"""LoRA adapters (issue 16): ``BASE+ADAPTER`` references merged on read, extraction, adapter merging.

* :func:`open_model` — a checkpoint, or ``BASE+ADAPTER`` with the adapter applied per tensor as it is read.
* :class:`LoraAdapter` — a PEFT LoRA folder: factors, scalings (``rank_pattern``/``alpha_pattern``, rsLoRA).
* :func:`extract_lora` — a PEFT adapter approximating ``model − base`` (truncated SVD per module).
* :func:`merge_adapters` / :func:`merge_factors` — adapters merged into one adapter on the products B·A.
"""

from .._lazy import lazy_exports

# public name -> the module defining it, imported on first access (the command line stays light)
__getattr__, __dir__ = lazy_exports(__name__, {
    "LoraAdapter": ".adapter", "lora_scaling": ".adapter", "pattern_value": ".adapter",
    "merge_adapters": ".adapter_merge", "extract_lora": ".extract", "METHODS": ".merge", "merge_factors": ".merge",
    "AdaptedCheckpoint": ".reference", "open_model": ".reference", "open_model_into": ".reference",
    "split_reference": ".reference",
})

__all__ = ["METHODS", "AdaptedCheckpoint", "LoraAdapter", "extract_lora", "lora_scaling", "merge_adapters",
           "merge_factors", "open_model", "open_model_into", "pattern_value", "split_reference"]
