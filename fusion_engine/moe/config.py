"""mergekit-moe's YAML: a base model, dense experts with routing prompts, and how to build the gates.

The schema is ``mergekit-moe``'s (``mergekit.moe.config.MoEMergeConfig``), read unchanged::

    base_model: ./base                  # everything outside the MLPs comes from here
    architecture: mixtral               # optional: mixtral | qwen (Qwen2-MoE) | qwen3 (Qwen3-MoE)
    gate_mode: hidden                   # hidden | cheap_embed | random | uniform_random (also hidden_avg)
    dtype: bfloat16                     # output dtype (default: the base config's dtype)
    experts_per_token: 2
    experts:
      - source_model: ./code            # its MLP (gate/up/down projections) becomes one expert per layer
        positive_prompts: ["def f(x):"]
        negative_prompts: ["Once upon a time"]
        residual_scale: 1.0             # optional: scales the expert's down projection
        noise_scale: 0.0                # optional: adds N(0, noise_scale²) to the expert's weights
    shared_experts:                     # Qwen2-MoE only: exactly one, always active
      - source_model: ./base
        positive_prompts: ["..."]

Checks follow ``mergekit.moe.config.is_bad_config``: ``experts_per_token >= 1`` and at most the
number of experts; unless ``gate_mode`` is ``random``, every expert has positive prompts and the
experts' prompts are not all identical; the experts are not all the same model unless
``allow_all_same``. Errors are :class:`~fusion_engine.errors.ConfigError` with the file and line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import yaml

from ..checkpoint.config import _Doc, _dtype, line_of, located, read_config_file
from ..errors import ConfigError

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
TOP_LEVEL_KEYS = ("base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts",
                  "architecture")
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")


@dataclass
class Expert:
    """A dense model whose MLPs become one expert per layer, with the prompts that route to it."""

    source_model: str
    positive_prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    noise_scale: float | None = None
    residual_scale: float | None = None
    line: int | None = None


@dataclass
class MoEConfig:
    """A parsed mergekit-moe config (see the module docstring)."""

    base_model: str
    experts: list[Expert]
    gate_mode: str = "hidden"
    dtype: torch.dtype | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] = field(default_factory=list)
    architecture: str | None = None
    filename: str = "config.yaml"
    text: str = ""
    lines: dict[str, int] = field(default_factory=dict)

    def error(self, key: str, problem: str, fix: str | None = None) -> ConfigError:
        return ConfigError(located(self.filename, self.lines.get(key), problem, fix))

    def models(self) -> list[str]:
        """The base, then every expert's and shared expert's model, each once."""
        return list(dict.fromkeys([self.base_model] + [e.source_model for e in self.experts + self.shared_experts]))


def load_moe_config(path: str | os.PathLike) -> MoEConfig:
    """Read and parse a mergekit-moe YAML file."""
    path = os.fspath(path)
    return parse_moe_config(read_config_file(path), os.path.basename(path) or path)


def parse_moe_config(text: str, filename: str = "config.yaml") -> MoEConfig:
    """Parse mergekit-moe YAML text into a :class:`MoEConfig` (form and types only; see :func:`check_moe_config`)."""
    doc = _Doc(filename)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(located(filename, mark.line + 1 if mark else None, f"not valid YAML: {exc}")) from None
    if root is None:
        raise ConfigError(located(filename, None, "the config is empty", "write base_model and experts"))
    top = doc.mapping(root, "the config", TOP_LEVEL_KEYS, required=("base_model", "experts"))
    lines = {key: line_of(key_node) for key, (key_node, _) in top.items()}
    config = MoEConfig(base_model=doc.model_ref(top["base_model"][1], "base_model"),
                       experts=[_expert(doc, n) for n in doc.sequence(top["experts"][1], "experts")],
                       filename=filename, text=text, lines=lines)
    if "gate_mode" in top:
        config.gate_mode = doc.string(top["gate_mode"][1], "gate_mode")
        if config.gate_mode not in GATE_MODES:
            raise doc.error(top["gate_mode"][1], f"unknown gate_mode {config.gate_mode!r}",
                            f"use one of {', '.join(GATE_MODES)}")
    if "dtype" in top:
        config.dtype = _dtype(doc, top["dtype"][1], "dtype")
    if "experts_per_token" in top:
        value = doc.value(top["experts_per_token"][1])
        if not isinstance(value, int) or isinstance(value, bool):
            raise doc.error(top["experts_per_token"][1], f"experts_per_token must be an integer, got {value!r}")
        config.experts_per_token = value
    if "shared_experts" in top and doc.value(top["shared_experts"][1]) is not None:
        config.shared_experts = [_expert(doc, n) for n in doc.sequence(top["shared_experts"][1], "shared_experts")]
    if "architecture" in top and doc.value(top["architecture"][1]) is not None:
        config.architecture = doc.string(top["architecture"][1], "architecture")
    return config


def _prompts(doc: _Doc, node: yaml.Node, what: str) -> list[str]:
    value = doc.value(node)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise doc.error(node, f"{what} must be a list of strings", f"write {what}: [\"a prompt\", ...]")
    return value


def _number(doc: _Doc, node: yaml.Node, what: str) -> float | None:
    value = doc.value(node)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise doc.error(node, f"{what} must be a number, got {value!r}")
    return float(value)


def _expert(doc: _Doc, node: yaml.Node) -> Expert:
    entries = doc.mapping(node, "an experts entry", EXPERT_KEYS, required=("source_model",))
    get = entries.get
    return Expert(
        source_model=doc.model_ref(entries["source_model"][1], "source_model"),
        positive_prompts=_prompts(doc, get("positive_prompts")[1], "positive_prompts") if get("positive_prompts") else [],
        negative_prompts=_prompts(doc, get("negative_prompts")[1], "negative_prompts") if get("negative_prompts") else [],
        noise_scale=_number(doc, get("noise_scale")[1], "noise_scale") if get("noise_scale") else None,
        residual_scale=_number(doc, get("residual_scale")[1], "residual_scale") if get("residual_scale") else None,
        line=line_of(node))


def check_moe_config(config: MoEConfig, allow_all_same: bool = False) -> None:
    """mergekit-moe's ``is_bad_config`` rules, as ConfigErrors naming the line and the fix."""
    if config.experts_per_token < 1:
        raise config.error("experts_per_token", f"experts_per_token must be >= 1, got {config.experts_per_token}")
    if len(config.experts) < config.experts_per_token:
        raise config.error("experts", f"{len(config.experts)} experts but experts_per_token is "
                           f"{config.experts_per_token}", "list at least experts_per_token experts")
    if config.gate_mode == "random":
        return
    for i, expert in enumerate(config.experts):
        if not expert.positive_prompts:
            raise ConfigError(located(config.filename, expert.line, f"expert {i} has no positive_prompts",
                                      f"give it prompts that should route to it, or use gate_mode: random"))
    first = (config.experts[0].positive_prompts, config.experts[0].negative_prompts)
    if all((e.positive_prompts, e.negative_prompts) == first for e in config.experts[1:]):
        raise config.error("experts", "the positive and negative prompts are identical for all experts: the "
                           "router could not tell them apart", "give each expert prompts of its own")
    if not allow_all_same and all(e.source_model == config.experts[0].source_model for e in config.experts[1:]):
        raise config.error("experts", "all experts are the same model: the MoE would cost more and compute the "
                           "same thing", "use different models, or pass --allow-all-same if you will train it")
