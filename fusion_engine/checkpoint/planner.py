"""A parsed merge config + the checkpoints' headers → a validated :class:`~fusion_engine.checkpoint.plan.MergePlan`.

Everything a merge can get wrong is found here, before any tensor is read: models that are not
local, unreadable or truncated headers, architectures or layer counts that disagree, tensors
missing from a model, shapes that differ, unknown methods, and parameters that are missing or
out of range for some tensor. Errors quote the config's file and line.

Layout, as mergekit plans it:

* A tensor whose name matches ``<prefix>.layers.<i>.<suffix>`` (also ``.h.``, ``.blocks.``,
  ``.layer.``, ``.block.``) belongs to layer ``i``; the others are *pre* tensors (embeddings,
  written first) or *post* tensors (final norm, ``lm_head``, written last).
* ``models:`` is one slice covering every layer of every model; a ``base_model`` that is not
  among them is appended as the last input.
* ``slices:`` concatenate layer ranges: output layer ``j`` of a slice is layer ``start + j`` of each
  source; output layers are numbered on across slices. Pre tensors come from the first slice's
  sources, post tensors from the last slice's.
* The gradient position of layer ``j`` of an ``n``-layer slice is ``t = j / (n - 1)`` (1 when
  ``n = 1``); pre and post tensors use ``t = 0``.
* Parameters: a per-input parameter (``weight``, ``density``, ...) resolves, for each input, from
  that source's ``parameters`` > the slice's > the global ones (the first level that sets it and
  whose filter matches wins: mergekit's filter rule, a substring of the tensor name), filters matched
  against the input's tensor name; a shared parameter (``t``, ``normalize``, ``lambda``, ...) from the slice's > the
  global ones, matched against the output name. Per-input parameters that do not apply to the base
  (``non_base`` scope) are ``None`` in the base's slot. A gradient ``[v0, ..., v(m-1)]`` at layer
  position ``t`` is ``(1 - f)·v(i) + f·v(i+1)`` with ``s = t·(m-1)``, ``i = ⌊s⌋``, ``f = s - i``
  (mergekit's rule; a list of strings or booleans picks ``v(⌊t·(m-1)⌋)``).
* A model without ``lm_head.weight`` whose config ties it to the input embedding contributes its
  embedding matrix instead (tied embeddings): ``tie_word_embeddings`` of its ``config.json`` when
  present, else the default of its architecture's config class in transformers (``model_type``); a
  model with no config, an unknown architecture or untied embeddings lacks the head (an error).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from .. import methods as _methods
from ..errors import (CheckpointError, ConfigError, FusionEngineError, MissingTensorError, ShapeMismatchError,
                      brief_repr)
from ..io import Checkpoints
from ..lora import open_model_into, split_reference
from ..tokenizer import TokenizerSpec, is_vocabulary_tensor, plan_output_tokenizer
from .config import Conditional, MergeConfig, Scalar, Setting, SliceSource, located, suggest
from .plan import SIDE_FILES, MergePlan, TensorRef, TensorTask

LAYER_RE = re.compile(r"^(?P<prefix>(?:.*?\.)?(?:layers|h|blocks|layer|block)\.)(?P<index>\d+)\.(?P<suffix>.+)$")
PRE_HINTS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings")
INPUT_EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight", "model.decoder.embed_tokens.weight",
                    "gpt_neox.embed_in.weight", "transformer.word_embeddings.weight")
OTHER_HEADS = ("embed_out.weight", "output.weight")  # output heads not named lm_head (GPT-NeoX, InternLM2)
NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

# --------------------------------------------------------------------------- checkpoint layout


@dataclass
class Layout:
    """The tensors of one checkpoint, sorted into pre, per-layer and post groups."""

    pre: list[str]
    post: list[str]
    layer_prefix: str | None  # e.g. "model.layers."
    layers: list[list[str]]  # layer i -> its suffixes (after "<prefix><i>.") in checkpoint order

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_name(self, index: int, suffix: str) -> str:
        return f"{self.layer_prefix}{index}.{suffix}"


def layer_index(name: str, layer_prefix: str | None) -> int | None:
    """The layer of tensor ``name`` in the layer stack ``layer_prefix`` (e.g. ``model.layers.``), or None."""
    m = LAYER_RE.match(name)
    return int(m["index"]) if m and m["prefix"] == layer_prefix else None


def layout_of(names: list[str], num_layers_hint: int | None = None) -> Layout:
    """Sort tensor names into pre / layers / post. With several layer stacks, the main one is the one
    whose depth equals ``num_layers_hint`` (the config's ``num_hidden_layers``), else the deepest."""
    stacks: dict[str, dict[int, list[str]]] = {}
    rest: list[str] = []
    for name in names:
        m = LAYER_RE.match(name)
        if m:
            stacks.setdefault(m["prefix"], {}).setdefault(int(m["index"]), []).append(m["suffix"])
        else:
            rest.append(name)
    main = None
    if stacks:
        depth = {p: max(layers) + 1 for p, layers in stacks.items()}
        by_hint = [p for p, d in depth.items() if d == num_layers_hint]
        main = by_hint[0] if len(by_hint) == 1 else max(depth, key=lambda p: (depth[p], -list(stacks).index(p)))
    layers: list[list[str]] = []
    others = []
    for prefix, by_index in stacks.items():
        if prefix == main:
            layers = [by_index.get(i, []) for i in range(max(by_index) + 1)]
        else:  # a second stack (e.g. a vision tower) is merged tensor by tensor, as non-layer tensors
            others.append(prefix)
            rest.extend(f"{prefix}{i}.{s}" for i in sorted(by_index) for s in by_index[i])
    pre = [n for n in rest if any(h in n for h in PRE_HINTS) or any(n.startswith(o) for o in others)]
    post = [n for n in rest if n not in set(pre)]
    post.sort(key=lambda n: n.endswith("lm_head.weight"))  # mergekit writes lm_head last
    return Layout(pre, post, main, layers)


def tied_source(name: str, ckpt_names: set[str]) -> str | None:
    """For an output head missing from a checkpoint with tied embeddings, the embedding it shares."""
    if not name.endswith("lm_head.weight"):
        return None
    for candidate in INPUT_EMBEDDINGS:
        if candidate in ckpt_names:
            return candidate
    return None


def ties_word_embeddings(config: dict | None) -> bool:
    """Whether a model's ``config.json`` ties ``lm_head`` to the input embedding, as transformers reads it:
    ``tie_word_embeddings`` (top level, else in ``text_config``), else the default of the config class of
    its ``model_type`` (True for GPT-2 or Gemma, False for Llama, Mistral or Qwen2). Unknown: False."""
    if not config:
        return False
    for level in (config, config.get("text_config")):
        if isinstance(level, dict) and isinstance(level.get("tie_word_embeddings"), bool):
            return level["tie_word_embeddings"]
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return False
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        return False
    try:
        return getattr(CONFIG_MAPPING[model_type](), "tie_word_embeddings", False) is True
    except Exception:  # noqa: BLE001 - a config class that cannot be built with its defaults: unknown
        return False


# --------------------------------------------------------------------------- parameter values per tensor


def matches(flt: str | None, tensor_name: str) -> bool:
    """mergekit's filter rule: no filter or ``*`` matches all; otherwise a substring of the name."""
    return flt is None or flt == "*" or (bool(tensor_name) and flt in tensor_name)


def interpolate(values: list[Scalar], t: float) -> Scalar:
    """A gradient at relative layer position ``t``: linear between neighbouring numbers, else a pick."""
    if len(values) == 1:
        return values[0]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    if not numeric:
        return values[i0]
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def evaluate(setting: Setting, tensor_name: str, t: float) -> tuple[bool, Any, int]:
    """``(found, value, line)`` of one level's setting for a tensor at layer position ``t``."""
    value = setting.value
    if isinstance(value, list) and value and isinstance(value[0], Conditional):
        for cond in value:
            if matches(cond.filter, tensor_name):
                v = cond.value
                return True, interpolate(v, t) if isinstance(v, list) else v, cond.line
        return False, None, setting.line
    return True, interpolate(value, t) if isinstance(value, list) else value, setting.line


def resolve(name: str, levels: list[dict[str, Setting]], tensor_name: str, t: float) -> tuple[bool, Any, int | None]:
    """The first level (most specific first) that sets ``name`` for this tensor: ``(found, value, line)``."""
    for level in levels:
        if level and name in level:
            found, value, line = evaluate(level[name], tensor_name, t)
            if found:
                return True, value, line
    return False, None, None


# --------------------------------------------------------------------------- planning


@dataclass
class _Group:
    """Inputs shared by a run of output tensors: the sources, their models, the base, the levels."""

    sources: list[SliceSource]
    base: str | None
    slice_params: dict
    line: int | None


class Planner:
    """Builds a :class:`MergePlan` from a :class:`MergeConfig`; see the module docstring for the rules."""

    def __init__(self, config: MergeConfig, config_path: str | None, checkpoints: Checkpoints):
        self.config = config
        self.config_path = config_path or config.path
        self.checkpoints = checkpoints  # opened here, owned (and closed) by the caller
        self.paths: dict[str, str] = {}
        self.layouts: dict[str, Layout] = {}
        self.names: dict[str, set[str]] = {}
        self._bound: dict[tuple, dict[str, Any]] = {}  # validated parameters, shared by equal tasks

    # ------------------------------------------------------------------ errors
    def _where(self, line: int | None, problem: str, fix: str | None = None) -> str:
        return located(self.config.filename, line, problem, fix)

    # ------------------------------------------------------------------ models
    def _local_path(self, model: str, line: int | None = None) -> str:
        line = line or self.config.model_line(model)
        parts = split_reference(model)
        if len(parts) == 2:  # BASE+ADAPTER: both resolved like any model path
            return "+".join(self._local_path(part, line) for part in parts)
        candidates = [os.path.expanduser(model)]
        if not os.path.isabs(candidates[0]) and self.config.base_dir not in ("", "."):
            candidates.append(os.path.join(self.config.base_dir, candidates[0]))
        for c in candidates:
            if os.path.exists(c):
                return os.path.abspath(c)
        if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model) and not model.startswith("."):
            raise CheckpointError(self._where(line, f"model '{model}' is not a local path and fusion-engine has no "
                                                    "network: give a local path",
                                              f"download it first (huggingface-cli download {model} --local-dir "
                                              f"DIR) and write that folder"))
        raise CheckpointError(self._where(line, f"model '{model}': no such file or directory",
                                          "give the folder holding config.json and *.safetensors, or a weights file"))

    def open_models(self) -> None:
        for model in self.config.referenced_models():
            path = self._local_path(model)
            try:
                ckpt = open_model_into(self.checkpoints, model, path)
                cfg = ckpt.config() or {}
                names = ckpt.names()
                for n in names:  # headers: every tensor's shape and dtype, checked for truncation
                    ckpt.info(n)
            except FusionEngineError as exc:
                raise type(exc)(self._where(self.config.model_line(model), f"model '{model}': {exc}")) from None
            hint = next((cfg[k] for k in NUM_LAYERS_KEYS if isinstance(cfg.get(k), int)), None)
            self.paths[model] = path
            self.names[model] = set(names)
            self.layouts[model] = layout_of(names, hint)
        self._check_architectures()

    def _check_architectures(self) -> None:
        models = self.config.referenced_models()
        ref = models[0]
        ref_cfg = self.checkpoints[ref].config() or {}
        for model in models[1:]:
            cfg = self.checkpoints[model].config() or {}
            for key in ("model_type", "architectures"):
                if key in cfg and key in ref_cfg and cfg[key] != ref_cfg[key]:
                    raise ConfigError(self._where(self.config.model_line(model),
                                                  f"model '{model}' has {key} {brief_repr(cfg[key])} but '{ref}' "
                                                  f"has {brief_repr(ref_cfg[key])}; models of different "
                                                  "architectures cannot be merged tensor by tensor",
                                                  "merge models fine-tuned from the same base architecture"))

    # ------------------------------------------------------------------ groups
    def _groups(self) -> list[tuple[_Group, list[tuple[int, int]] | None]]:
        """(group, [(layer start, count)] per source) per output slice; models: one whole-model group."""
        cfg = self.config
        if cfg.models is not None:
            sources = list(cfg.models)
            if cfg.base_model and all(s.model != cfg.base_model for s in sources):
                sources.append(SliceSource(cfg.base_model, None, {}, cfg.line_of("base_model")))
            counts = {s.model: self.layouts[s.model].num_layers for s in sources}
            if len(set(counts.values())) > 1:
                raise ShapeMismatchError(self._where(cfg.line_of("models"),
                                                     f"the models have different numbers of layers "
                                                     f"({', '.join(f'{m}: {n}' for m, n in counts.items())})",
                                                     "merge models of one size, or pick layer ranges with slices:"))
            n = next(iter(counts.values()))
            return [(_Group(sources, cfg.base_model, {}, cfg.line_of("models")), [(0, n)] * len(sources))]
        groups = []
        for sl in cfg.slices:
            for src in sl.sources:
                depth = self.layouts[src.model].num_layers
                start, end = src.layer_range
                if end > depth:
                    raise ConfigError(self._where(src.line, f"layer_range [{start}, {end}] of '{src.model}' goes past "
                                                            f"its last layer (it has {depth} layers)",
                                                  f"use an end <= {depth}"))
            groups.append((_Group(sl.sources, sl.base_model or cfg.base_model, sl.parameters, sl.line),
                           [(s.layer_range[0], s.layer_range[1] - s.layer_range[0]) for s in sl.sources]))
        return groups

    # ------------------------------------------------------------------ plan
    def build(self) -> MergePlan:
        cfg = self.config
        if cfg.merge_method not in _methods.names():
            raise ConfigError(self._where(cfg.line_of("merge_method"), f"unknown merge_method '{cfg.merge_method}'",
                                          suggest(cfg.merge_method, _methods.names(), "known methods")))
        self.spec = _methods.get(cfg.merge_method)
        self._check_parameter_names()
        self.open_models()
        groups = self._groups()
        ref_model = cfg.base_model or groups[0][0].sources[0].model
        self.output_tokenizer = self._output_tokenizer(ref_model)
        ref = self.layouts[ref_model]
        tasks: list[TensorTask] = []
        first, last = groups[0][0], groups[-1][0]
        for name in ref.pre:
            tasks.append(self._task(name, first, [name] * len(first.sources), t=0.0))
        out_layer = 0
        for group, ranges in groups:
            n = ranges[0][1]
            for j in range(n):
                t = j / (n - 1) if n > 1 else 1.0
                first_src = group.sources[0]
                src_layout = self.layouts[first_src.model]
                if ref.layer_prefix is None or src_layout.layer_prefix is None:
                    raise ConfigError(self._where(group.line, f"'{first_src.model}' has no numbered layers "
                                                              "(no tensor named like model.layers.<i>.*)",
                                                  "use models: instead of slices: for this checkpoint"))
                suffixes = src_layout.layers[ranges[0][0] + j]
                if not suffixes:
                    raise MissingTensorError(self._where(first_src.line, f"model '{first_src.model}' has no tensors "
                                                                         f"for layer {ranges[0][0] + j} "
                                                                         f"({src_layout.layer_prefix}"
                                                                         f"{ranges[0][0] + j}.*)",
                                                         "check that the checkpoint is complete"))
                for suffix in suffixes:
                    in_names = [self.layouts[s.model].layer_name(start + j, suffix)
                                for s, (start, _) in zip(group.sources, ranges)]
                    tasks.append(self._task(ref.layer_name(out_layer, suffix), group, in_names, t))
                out_layer += 1
        post = list(ref.post)
        for model in dict.fromkeys(s.model for s in last.sources):  # a head the reference ties but another model has
            post += [n for n in self.layouts[model].post if n not in post and n.endswith("lm_head.weight")]
        if not any(n.endswith("lm_head.weight") for n in post):  # no head anywhere: each causal LM must tie it
            for src in last.sources:
                archs = (self.checkpoints[src.model].config() or {}).get("architectures")
                if (isinstance(archs, list) and any(str(a).endswith("ForCausalLM") for a in archs)
                        and not any(n.endswith(OTHER_HEADS) for n in self.layouts[src.model].pre
                                    + self.layouts[src.model].post)):
                    self._input_name(src.model, "lm_head.weight", "lm_head.weight", src.line)
        for name in post:
            tasks.append(self._task(name, last, [name] * len(last.sources), t=0.0))
        if cfg.lines_scaling is not None:
            self._lines(tasks, ref.layer_prefix, out_layer)
        return MergePlan(models=dict(self.paths), tasks=tasks,
                         config_json=self._config_json(ref_model, out_layer),
                         extra_files=self._extra_files(ref_model),
                         default_out_dtype=cfg.out_dtype or cfg.dtype, alignment=cfg.alignment,
                         alignment_data=cfg.alignment_data, **self._tokenizer_outputs())

    def _lines(self, tasks: list[TensorTask], layer_prefix: str | None, num_layers: int) -> None:
        """LiNeS: each task's depth factor, from the output layer in its name (α outside the layers)."""
        from ..methods.lines import lines_scale

        if any(task.base_index is None for task in tasks):
            raise ConfigError(self._where(self.config.line_of("lines"), f"lines: (LiNeS) scales task vectors, "
                                          f"but merge_method {self.spec.name} has no base model here",
                                          "set base_model: and use a task-vector method (task_arithmetic, ties, "
                                          "tsv, ...)"))
        alpha, beta = self.config.lines_scaling
        for task in tasks:
            task.lines_scale = lines_scale(layer_index(task.out_name, layer_prefix), num_layers, alpha, beta)

    def _check_parameter_names(self) -> None:
        known = {p.name for p in self.spec.parameters}
        levels = [self.config.parameters]
        for src in self.config.models or []:
            levels.append(src.parameters)
        for sl in self.config.slices or []:
            levels.append(sl.parameters)
            levels.extend(s.parameters for s in sl.sources)
        for level in levels:
            for name, setting in level.items():
                if name not in known:
                    raise ConfigError(self._where(setting.line, f"merge_method {self.spec.name} has no parameter "
                                                                f"'{name}'",
                                                  suggest(name, sorted(known), "its parameters") if known
                                                  else "remove it: this method takes no parameters"))

    def _input_name(self, model: str, name: str, out_name: str, line: int | None) -> tuple[str, tuple]:
        """The tensor to read from ``model`` for output ``out_name``, with its shape (tied heads resolved)."""
        names = self.names[model]
        if name not in names:
            tied = tied_source(name, names)
            if tied is not None and not ties_word_embeddings(self.checkpoints[model].config()):
                raise MissingTensorError(self._where(line, f"model '{model}' has no tensor '{name}' and its "
                                                           "config.json does not tie it to the input embedding "
                                                           f"'{tied}' (tie_word_embeddings is false or absent)",
                                                     "use a complete checkpoint; if the model does tie them, set "
                                                     "\"tie_word_embeddings\": true in its config.json"))
            if tied is None:
                raise MissingTensorError(self._where(line, f"model '{model}' has no tensor '{name}' (needed for "
                                                           f"output tensor '{out_name}')",
                                                     "merge only checkpoints of the same architecture, or fix the "
                                                     "layer_range"))
            name = tied
        return name, tuple(self.checkpoints[model].info(name).shape)

    def _task(self, out_name: str, group: _Group, in_names: list[str], t: float) -> TensorTask:
        inputs, shapes = [], []
        for src, name in zip(group.sources, in_names):
            name, shape = self._input_name(src.model, name, out_name, src.line)
            inputs.append(TensorRef(src.model, name))
            shapes.append(shape)
        vocabulary = (self.output_tokenizer.vocabulary if self.output_tokenizer is not None
                      and is_vocabulary_tensor(out_name) else None)
        for ref, shape, src in zip(inputs, shapes, group.sources):
            if (shape[1:] if vocabulary is not None else shape) != (shapes[0][1:] if vocabulary is not None
                                                                      else shapes[0]):
                hint = ("the vocabularies differ: add tokenizer_source: union (or base) to re-index them"
                        if any(h in out_name for h in ("embed", "lm_head", "wte")) else
                        "merge checkpoints of the same size")
                raise ShapeMismatchError(self._where(src.line, f"tensor '{ref.name}' has shape {shape} in "
                                                               f"'{ref.model}' but {shapes[0]} in "
                                                               f"'{inputs[0].model}'", hint))
        models = [s.model for s in group.sources]
        base_index = None
        if group.base is not None and self.spec.base != "ignored":
            if group.base not in models:
                raise ConfigError(self._where(group.line, f"base_model '{group.base}' is not among this slice's "
                                                          "sources", "add it as a source with the same layer_range"))
            base_index = models.index(group.base)
        parameters, lines = self._parameters(group, inputs, out_name, base_index, t)
        bound = self._validate(parameters, lines, inputs, base_index, out_name, group)
        shape = shapes[0] if vocabulary is None else (vocabulary.size, *shapes[0][1:])
        return TensorTask(out_name=out_name, method=self.spec.name, inputs=inputs, base_index=base_index,
                          parameters=parameters, shape=shape, dtype=self.config.dtype,
                          out_dtype=self.config.out_dtype or self.config.dtype, bound=bound, vocabulary=vocabulary)

    def _parameters(self, group: _Group, inputs: list[TensorRef], out_name: str, base_index: int | None,
                    t: float) -> tuple[dict[str, Any], dict[str, int | None]]:
        """Resolve every parameter the config sets for this tensor (see the module docstring).

        Parameters the config never sets are left out (the method's defaults apply); a per-input
        parameter set for some inputs only gets the method's default (or nothing, when required) in
        the others' slots, and a non-base one gets None in the base's slot.
        """
        global_levels = [group.slice_params, self.config.parameters]
        values: dict[str, Any] = {}
        lines: dict[str, int | None] = {}
        for p in self.spec.parameters:
            if p.scope == "shared":
                found, value, line = resolve(p.name, global_levels, out_name, t)
                if found:
                    values[p.name], lines[p.name] = value, line
                elif p.required:
                    raise ConfigError(self._where(self.config.line_of("parameters") or self.config.line_of(
                                                  "merge_method"), f"merge_method {self.spec.name} needs parameter "
                                                  f"'{p.name}' (for tensor '{out_name}')",
                                                  f"add '{p.name}: <value>' under parameters:"))
                continue
            per_input, any_found = [], False
            for i, (ref, src) in enumerate(zip(inputs, group.sources)):
                if p.scope == "non_base" and i == base_index:
                    per_input.append(None)
                    continue
                levels = [s.parameters for s in group.sources if s.model == src.model] + global_levels
                found, value, line = resolve(p.name, levels, ref.name, t)
                if not found and p.required:
                    raise ConfigError(self._where(src.line, f"merge_method {self.spec.name} needs parameter "
                                                            f"'{p.name}' for model '{src.model}' (tensor "
                                                            f"'{ref.name}')",
                                                  f"add '{p.name}: <value>' under this model's parameters, or "
                                                  "under the global parameters"))
                any_found |= found
                per_input.append(p.bind_to_tensor(value, ref.name) if found else p.default)
                if found and p.name not in lines:
                    lines[p.name] = line
            if any_found:
                values[p.name] = per_input
        return values, lines

    def _validate(self, parameters: dict, lines: dict, inputs: list[TensorRef], base_index: int | None,
                  out_name: str, group: _Group) -> dict[str, Any]:
        """The method's parameters for this tensor, bound and checked once per distinct set."""
        n_inputs = len(inputs)
        key = (repr(sorted(parameters.items())), n_inputs, base_index)
        if key in self._bound:
            return self._bound[key]
        try:
            bound = _methods.validate_parameters(self.spec.name, parameters, n_inputs, base_index=base_index,
                                                 label=out_name)
        except ConfigError as exc:
            msg = re.sub(r"for input (\d+)", lambda m: f"for input {m[1]} ('{inputs[int(m[1])].model}')"
                         if int(m[1]) < len(inputs) else m[0], str(exc))
            if out_name not in msg:
                msg += f" (output tensor '{out_name}')"
            said = re.search(r"parameters? '?(\w+)", str(exc))
            named = ([said[1]] if said and said[1] in parameters else
                     [name for name in parameters if re.search(rf"\b{re.escape(name)}\b", str(exc))])
            line = lines.get(named[0]) if named else (group.line if self.config.slices else
                                                      self.config.line_of("merge_method"))
            raise ConfigError(self._where(line, msg)) from None
        self._bound[key] = bound
        return bound

    # ------------------------------------------------------------------ side files
    def _config_json(self, ref_model: str, num_layers: int) -> dict | None:
        cfg = self.checkpoints[ref_model].config()
        if cfg is None:
            return None
        cfg = dict(cfg)
        if self.config.slices is not None:
            ref_depth = self.layouts[ref_model].num_layers
            for key in NUM_LAYERS_KEYS:
                if cfg.get(key) == ref_depth:
                    cfg[key] = num_layers
            for key, value in list(cfg.items()):  # per-layer lists (layer_types, ...) follow the slices
                if isinstance(value, list) and len(value) == ref_depth and ref_depth != num_layers:
                    cfg[key] = self._sliced_list(key, value)
        if self.output_tokenizer is not None and self.output_tokenizer.vocabulary is not None:
            cfg["vocab_size"] = self.output_tokenizer.vocabulary.size
        out = self.config.out_dtype or self.config.dtype
        if out is not None:
            name = str(out).removeprefix("torch.")
            for key in ("dtype", "torch_dtype"):
                if key in cfg or key == "dtype":
                    cfg[key] = name
        return cfg

    def _sliced_list(self, key: str, value: list) -> list:
        out = []
        for sl in self.config.slices:
            src = sl.sources[0]
            depth = self.layouts[src.model].num_layers
            values = (self.checkpoints[src.model].config() or {}).get(key, value)
            if not isinstance(values, list) or len(values) != depth:
                values = value
            out.extend(values[src.layer_range[0]:src.layer_range[1]])
        return out

    def _output_tokenizer(self, ref_model: str):
        """The planned output tokenizer (fusion_engine.tokenizer) when the config has a tokenizer source,
        a ``tokenizer:`` block or a chat template; None otherwise."""
        cfg = self.config
        spec = cfg.tokenizer or (TokenizerSpec(cfg.tokenizer_source, line=cfg.line_of("tokenizer_source"))
                                 if cfg.tokenizer_source else None)
        if spec is None and cfg.chat_template is None:
            return None
        models = [ref_model] + [m for m in cfg.referenced_models() if m != ref_model]
        sizes = {}
        for m in models:
            vocab_size = (self.checkpoints[m].config() or {}).get("vocab_size")
            embed = next((n for n in INPUT_EMBEDDINGS if n in self.names[m]), None)
            sizes[m] = vocab_size if isinstance(vocab_size, int) else (
                self.checkpoints[m].info(embed).shape[0] if embed else 0)
        source = spec.source if spec is not None else "base"
        source_folder = None
        if source not in ("base", "union"):
            source_folder = (self.checkpoints[source].directory if source in self.checkpoints else
                             split_reference(self._local_path(source, spec.line))[0])
        try:
            return plan_output_tokenizer(spec, cfg.chat_template, models, cfg.base_model,
                                         {m: self.checkpoints[m].directory for m in models}, sizes, source_folder)
        except ConfigError as exc:
            line = cfg.line_of("tokenizer") or cfg.line_of("tokenizer_source") or cfg.line_of("chat_template")
            raise ConfigError(self._where(line, str(exc))) from None

    def _tokenizer_outputs(self) -> dict:
        """The built tokenizer's files (``generated_files``) and its source folder (``reads``, for the guard)."""
        out = self.output_tokenizer
        if out is None:
            return {}
        reads = {"the tokenizer source": out.source_folder} if out.source_folder else {}
        return {"generated_files": dict(out.files), "reads": reads}

    def _extra_files(self, ref_model: str) -> dict[str, str]:
        """Tokenizer files of ``tokenizer_source`` (default: the base, else the first model) and the config."""
        source = self.config.tokenizer.source if self.config.tokenizer else self.config.tokenizer_source
        if self.output_tokenizer is not None and self.output_tokenizer.files:  # built at plan time: generated
            files = {}
            generation = os.path.join(self.checkpoints[ref_model].directory or "", "generation_config.json")
            if os.path.isfile(generation):
                files["generation_config.json"] = generation
            if self.config_path and os.path.isfile(self.config_path):
                files["mergekit_config.yml"] = os.path.abspath(self.config_path)
            return files
        if source in (None, "base", "union"):
            folder = self.checkpoints[ref_model].directory
        elif source in self.checkpoints:
            folder = self.checkpoints[source].directory
        else:
            folder = os.path.expanduser(source)
            if not os.path.isdir(folder) and self.config.base_dir not in ("", "."):
                folder = os.path.join(self.config.base_dir, folder)
            if not os.path.isdir(folder):
                raise ConfigError(self._where(self.config.line_of("tokenizer_source"),
                                              f"tokenizer_source '{source}' is not a local folder",
                                              "name a folder holding tokenizer.json / tokenizer_config.json, "
                                              "or write 'base'"))
        files = {}
        if folder and os.path.isdir(folder):
            for name in SIDE_FILES:
                if os.path.lexists(os.path.join(folder, name)):
                    files[name] = os.path.abspath(os.path.join(folder, name))
        if source not in (None, "base") and not any(n.startswith("tokenizer") for n in files):
            raise ConfigError(self._where(self.config.line_of("tokenizer_source"),
                                          f"tokenizer_source '{source}' holds no tokenizer files",
                                          "name a folder with tokenizer.json or tokenizer.model"))
        if self.config_path and os.path.isfile(self.config_path):
            files["mergekit_config.yml"] = os.path.abspath(self.config_path)
        return files


def build_plan(config: MergeConfig, config_path: str | None = None, *,
               checkpoints: Checkpoints | None = None) -> MergePlan:
    """Validate ``config`` against its checkpoints' headers and plan every output tensor (no data read).

    ``checkpoints``: a run's open inputs (filled here, left open for :func:`plan_summary` and
    :func:`~fusion_engine.checkpoint.executor.run_plan`, closed by the caller); None opens and closes them here.
    """
    with Checkpoints.borrow(checkpoints) as opened:
        return Planner(config, config_path, opened).build()


def plan_summary(plan: MergePlan, config: MergeConfig | None = None, *, checkpoints: Checkpoints | None = None) -> str:
    """What a merge will do (for ``--dry-run``): the models, the output groups (layers, sources and
    method of each), tensors and bytes written per method, bytes read. Reads headers only (those of
    ``checkpoints`` when given, as :func:`build_plan` left them open)."""
    infos: dict[tuple[str, str], Any] = {}
    with Checkpoints.borrow(checkpoints) as opened:
        for key, path in plan.models.items():
            ckpt = open_model_into(opened, key, path)
            needed = {ref.name for task in plan.tasks for ref in task.inputs if ref.model == key}
            infos.update({(key, name): ckpt.info(name) for name in needed})
    by_method: dict[str, list[int]] = {}
    read_bytes = 0
    for task in plan.tasks:
        main = task.inputs[task.base_index if task.base_index is not None else 0]
        dtype = task.out_dtype or plan.default_out_dtype or task.dtype or infos[(main.model, main.name)].dtype
        entry = by_method.setdefault(task.method, [0, 0, 0])
        entry[0] += 1
        entry[1] += task.out_numel * torch.empty((), dtype=dtype).element_size()
        entry[2] = max(entry[2], len(task.inputs))
        read_bytes += sum(infos[(ref.model, ref.name)].nbytes for ref in task.inputs)
    lines = [f"models ({len(plan.models)}):"]
    lines += [f"  {key}" + (f" -> {path}" if os.path.abspath(key) != path else "") for key, path in plan.models.items()]
    if config is not None:
        lines += _group_lines(config)
    total = sum(v[1] for v in by_method.values())
    layers = plan.config_json.get("num_hidden_layers") if plan.config_json else None
    lines.append(f"output: {len(plan.tasks)} tensors, {_human(total)}" + (f", {layers} layers" if layers else ""))
    for method, (count, nbytes, k) in by_method.items():
        lines.append(f"  {method}: {count} tensors, {_human(nbytes)}, {k} input{'s' if k != 1 else ''} each at most")
    lines.append(f"reads: {_human(read_bytes)}")
    scales = [task.lines_scale for task in plan.tasks if task.lines_scale is not None]
    if scales:
        lines.append(f"LiNeS: task vectors scaled by {min(scales):g} … {max(scales):g} (shallow → deep layers)")
    if plan.extra_files:
        lines.append(f"copies: {', '.join(sorted(plan.extra_files))}")
    return "\n".join(lines)


def _group_lines(config: MergeConfig) -> list[str]:
    method = config.merge_method
    if config.models is not None:
        names = [s.model for s in config.models]
        base = f", base {config.base_model}" if config.base_model else ""
        return [f"group: every tensor <- {method}({', '.join(names)}){base}"]
    out, lines = 0, []
    for i, sl in enumerate(config.slices):
        n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        srcs = ", ".join(f"{s.model}[{s.layer_range[0]}:{s.layer_range[1]}]" for s in sl.sources)
        lines.append(f"slice {i}: output layers {out}..{out + n - 1} <- {method}({srcs})")
        out += n
    return lines


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
