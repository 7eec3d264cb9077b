"""The README.md model card of a merged model: mergekit 0.1.5's (``mergekit.card.generate_card``).

Same template and content as mergekit's: YAML front matter (``base_model``, ``tags: [mergekit, merge]``,
``library_name: transformers``), the output folder's name as title, the method (mergekit's display name,
linked to its paper), the base model, the merged models, and the YAML config as written. fusion_engine
merges local folders only, so no model is a Hugging Face repository: ``base_model`` is empty and the
models are not linked (mergekit does the same for local paths). The models are listed in the order the
config names them (mergekit lists them in the order of a Python set).
"""

from __future__ import annotations

import os

import yaml

from .config import MergeConfig

CARD_TEMPLATE = """---
{metadata}
---
# {name}

This is a merge of pre-trained language models created using [mergekit](https://github.com/cg123/mergekit).

## Merge Details
### Merge Method

This model was merged using the {merge_method} merge method{base_text}.

### Models Merged

The following models were included in the merge:
{model_list}

### Configuration

The following YAML configuration was used to produce this model:

```yaml
{config_yaml}
```
"""

# mergekit's display names (``MergeMethod.spec.pretty_name``) of the methods that have one
PRETTY_NAMES = {
    "linear": "Linear", "ties": "TIES", "slerp": "SLERP", "task_arithmetic": "Task Arithmetic",
    "dare_ties": "DARE TIES", "dare_linear": "Linear DARE", "della": "DELLA", "della_linear": "Linear DELLA",
    "model_stock": "Model Stock", "nuslerp": "NuSLERP", "karcher": "Karcher Mean", "passthrough": "Passthrough",
    "breadcrumbs": "Model Breadcrumbs", "breadcrumbs_ties": "Model Breadcrumbs with TIES", "sce": "SCE",
    "nearswap": "NearSwap", "arcee_fusion": "Arcee Fusion", "multislerp": "Multi-SLERP",
    "ram": "Reinforced Agent Merging",
}


def method_markdown(method: str) -> str:
    """``[TIES](https://arxiv.org/abs/2306.01708)``: the display name, linked to the method's reference."""
    from ..methods.registry import get

    try:
        reference = get(method).reference
    except Exception:  # noqa: BLE001 - an unknown method is named as written, as mergekit does
        return method
    name = PRETTY_NAMES.get(method, method)
    return f"[{name}]({reference})" if reference.strip() else name


def generate_card(config: MergeConfig, config_yaml: str, name: str | None = None) -> str:
    """The model card mergekit writes as README.md for ``config`` (``config_yaml``: its source text)."""
    base = None if config.merge_method == "slerp" else config.base_model  # as mergekit: slerp names no base
    base_text = f" using {base} as a base" if base else ""
    bullets = [f"* {model}" for model in config.referenced_models() if model != base]
    return CARD_TEMPLATE.format(
        metadata=yaml.dump({"base_model": [], "tags": ["mergekit", "merge"], "library_name": "transformers"}),
        model_list="\n".join(bullets), base_text=base_text, merge_method=method_markdown(config.merge_method),
        name=name or "Untitled Model (1)", config_yaml=config_yaml)


def card_for_output(config: MergeConfig, out_dir: str) -> bytes:
    """README.md's bytes for a merge of ``config`` written to ``out_dir``."""
    return generate_card(config, config.text, os.path.basename(out_dir)).encode("utf-8")
