"""mergekit's YAML merge configuration: parsed with the line of every value, checked field by field.

A config is the mergekit schema (``mergekit-yaml`` reads the same files)::

    merge_method: ties                 # any name in fusion_engine.methods.names()
    base_model: ./base                 # local folder or file (no hub downloads); BASE+LORA anywhere a
                                       # model is named: the PEFT adapter merged per tensor (fusion_engine.lora)
    models:                            # either models: ...
      - model: ./math
        parameters: {weight: 0.5, density: [0.2, 0.8]}    # a list is a gradient over the layers
      - model: ./code
        parameters:
          weight:
            - filter: mlp              # first entry whose filter is a substring of the tensor name
              value: 0.7
            - value: 0.3               # no filter: matches every tensor
    slices:                            # ... or slices (frankenmerges, layer ranges per source)
      - sources:
          - model: ./a
            layer_range: [0, 16]
    parameters: {normalize: true}      # global level; a slice may have its own parameters too
    dtype: float32                     # inputs are cast to it before merging
    out_dtype: bfloat16                # the written tensors' dtype
    tokenizer_source: base             # base | union | a model (model:<path>); none: the base's files copied
    tokenizer: {source: union, tokens: {...}}   # or this block (fusion_engine.tokenizer.spec)
    chat_template: chatml              # a template name, auto, or a literal Jinja template

This module only parses: the values stay as written (:class:`Setting`); the planner
(:mod:`fusion_engine.checkpoint.planner`) resolves them per tensor (levels, filters, gradients).

Every error is a :class:`~fusion_engine.errors.ConfigError` that names the file and line and says
how to fix it: ``config.yaml line 7: density must be in [0, 1], got 1.5 (fix: ...)``.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from ..errors import ConfigError, brief_repr
from ..io.files import open_input
from ..tokenizer.spec import TokenizerSpec, parse_tokenizer_block, source_name

DTYPES = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}
TOP_LEVEL_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
                  "tokenizer_source", "tokenizer", "chat_template", "name", "lines", "alignment")
ALIGNMENTS = ("weight_matching", "activation_matching")  # permute the models onto the reference before merging
UNSUPPORTED_KEYS = {
    "modules": "write the merge with top-level `models:` or `slices:`",
}

Scalar = bool | int | float | str
MAX_YAML_DEPTH = 64  # nesting levels of mappings and lists
MAX_YAML_NODES = 100_000  # values in the document with every alias expanded (an alias bomb has billions)


@dataclass
class Conditional:
    """One entry of a filtered parameter: ``value`` applies to tensors whose name contains ``filter``."""

    value: Scalar | list[Scalar]
    filter: str | None
    line: int


@dataclass
class Setting:
    """A parameter as written at one level: a scalar, a gradient, or a list of filtered entries."""

    name: str
    value: Scalar | list[Scalar] | list[Conditional]
    line: int


@dataclass
class SliceSource:
    """One input of an output slice: layers ``layer_range[0] .. layer_range[1]-1`` of ``model``.

    A ``models:`` entry is a source whose layer range is the whole model (``layer_range`` None).
    """

    model: str
    layer_range: tuple[int, int] | None
    parameters: dict[str, Setting]
    line: int


@dataclass
class OutputSlice:
    sources: list[SliceSource]
    base_model: str | None
    parameters: dict[str, Setting]
    line: int


@dataclass
class MergeConfig:
    """A parsed config. ``models`` xor ``slices`` is set; ``lines`` maps top-level keys to their line."""

    merge_method: str
    base_model: str | None
    models: list[SliceSource] | None
    slices: list[OutputSlice] | None
    parameters: dict[str, Setting]
    dtype: torch.dtype | None
    out_dtype: torch.dtype | None
    tokenizer_source: str | None
    alignment: str | None = None
    alignment_data: str | None = None  # prompts (or token ids) file for alignment: activation_matching
    filename: str = "config.yaml"
    tokenizer: TokenizerSpec | None = None  # the tokenizer: block (fusion_engine.tokenizer)
    chat_template: str | None = None  # a template name (chatml, llama3, ..., auto) or a literal template
    base_dir: str = "."
    path: str | None = None  # the file it was read from (copied to the output as mergekit_config.yml)
    text: str = ""
    lines: dict[str, int] = field(default_factory=dict)
    lines_scaling: tuple[float, float] | None = None  # LiNeS (alpha, beta) of a top-level `lines:` key

    def line_of(self, key: str) -> int | None:
        return self.lines.get(key)

    def referenced_models(self) -> list[str]:
        """Every model the config names, in order of first appearance, the base first."""
        seen: list[str] = []
        if self.base_model:
            seen.append(self.base_model)
        for src in self.models or []:
            seen.append(src.model)
        for sl in self.slices or []:
            if sl.base_model:
                seen.append(sl.base_model)
            seen.extend(src.model for src in sl.sources)
        return list(dict.fromkeys(seen))

    def model_line(self, model: str) -> int | None:
        """The line where ``model`` is first named."""
        if model == self.base_model:
            return self.lines.get("base_model")
        for src in self.models or []:
            if src.model == model:
                return src.line
        for sl in self.slices or []:
            if sl.base_model == model:
                return sl.line
            for src in sl.sources:
                if src.model == model:
                    return src.line
        return None


def located(filename: str, line: int | None, problem: str, fix: str | None = None) -> str:
    """``file line N: problem (fix: ...)``; a problem or fix past 2000 characters (a huge value quoted
    whole) is shortened."""
    where = f"{filename} line {line}" if line else filename
    problem, fix = (t if t is None or len(t) <= 2000 else t[:1997] + "..." for t in (problem, fix))
    return f"{where}: {problem}" + (f" (fix: {fix})" if fix else "")


# --------------------------------------------------------------------------- YAML nodes with lines


class _TooLarge(yaml.MarkedYAMLError):
    """The document nests too deeply or expands (through aliases) to too many values."""


class BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (what mergekit reads configs with: anchors, aliases and ``<<`` merges are legal)
    that refuses, while composing and in time linear in the text, a document nested more than
    :data:`MAX_YAML_DEPTH` levels, a recursive alias, or one that holds more than :data:`MAX_YAML_NODES`
    values once every alias is expanded (the "billion laughs" bomb): whatever later walks or prints the
    values stays bounded."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._expanded: dict[int, int] = {}  # id(node) -> values under it, aliases expanded

    def compose_node(self, parent, index):
        mark = self.peek_event().start_mark
        if self.check_event(yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if id(node) not in self._expanded:
                raise _TooLarge(None, None, "an alias refers to the value that contains it (a recursive alias)",
                                mark)
            return node
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _TooLarge(None, None, f"the config nests more than {MAX_YAML_DEPTH} levels deep", mark)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else
                    node.value if isinstance(node, yaml.SequenceNode) else [])
        size = 1 + sum(self._expanded[id(child)] for child in children)
        if size > MAX_YAML_NODES:
            raise _TooLarge(None, None, f"the config holds more than {MAX_YAML_NODES} values once its aliases "
                                        "(*name) are expanded", mark)
        self._expanded[id(node)] = size
        return node


class _Doc:
    """Turns composed YAML nodes into Python values, raising ConfigErrors that carry the line."""

    def __init__(self, filename: str):
        self.filename = filename
        self._constructor = yaml.SafeLoader("")

    def error(self, node: yaml.Node | None, problem: str, fix: str | None = None) -> ConfigError:
        return ConfigError(located(self.filename, line_of(node), problem, fix))

    def value(self, node: yaml.Node) -> Any:
        try:
            return self._constructor.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:  # e.g. a !!python/... tag
            raise self.error(node, f"unreadable value: {exc.problem}", "write plain values (no !! tags)") from None
        except ValueError as exc:  # an integer past Python's digit limit
            raise self.error(node, f"unreadable value {describe(node)}: {exc}") from None

    def mapping(self, node: yaml.Node, what: str, allowed: tuple[str, ...] | None = None,
                required: tuple[str, ...] = ()) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """{key: (key_node, value_node)}; rejects non-mappings, duplicate, unknown and missing keys."""
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, f"{what} must be a mapping (key: value lines), got {describe(node)}")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.value(key_node)
            if not isinstance(key, str):
                raise self.error(key_node, f"{what}: keys must be names, got {brief_repr(key)}")
            if key in out:
                raise self.error(key_node, f"{what}: key {brief_repr(key)} appears twice (first on line "
                                           f"{line_of(out[key][0])})", "keep one of them")
            if allowed is not None and key not in allowed:
                if key in UNSUPPORTED_KEYS:
                    raise self.error(key_node, f"'{key}' is not supported by fusion_engine",
                                     UNSUPPORTED_KEYS[key])
                raise self.error(key_node, f"unknown key {brief_repr(key)} in {what}",
                                 suggest(key[:100], allowed, "allowed keys"))
            out[key] = (key_node, value_node)
        for key in required:
            if key not in out:
                raise self.error(node, f"{what} has no '{key}'", f"add a '{key}:' entry")
        return out

    def sequence(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(node, f"{what} must be a list ('- ' entries), got {describe(node)}")
        return list(node.value)

    def string(self, node: yaml.Node, what: str) -> str:
        value = self.value(node) if isinstance(node, yaml.ScalarNode) else None
        if not isinstance(value, str) or not value.strip():
            raise self.error(node, f"{what} must be a non-empty string, got {describe(node)}")
        return value.strip()

    def model_ref(self, node: yaml.Node, what: str) -> str:
        if isinstance(node, yaml.MappingNode):  # mergekit's long form: {model: {path: ...}} / {path: ...}
            entries = self.mapping(node, what)
            if "lora" in entries:  # {model: ..., lora: ...} is mergekit's long form of MODEL+LORA
                model = self.model_ref(entries["model"][1], what) if "model" in entries else None
                if model is None:
                    raise self.error(node, f"{what} has a 'lora' but no 'model'", "add the base model's path")
                return f"{model}+{self.model_ref(entries['lora'][1], what)}"
            if "model" in entries:
                return self.model_ref(entries["model"][1], what)
            if "path" in entries:
                if "revision" in entries:
                    raise self.error(entries["revision"][0], f"{what}: revisions need the model hub",
                                     "download that revision and give its local folder")
                return self.string(entries["path"][1], what)
            raise self.error(node, f"{what} has no 'path'", "write the model as a local folder path")
        return self.string(node, what)


def line_of(node: yaml.Node | None) -> int | None:
    return node.start_mark.line + 1 if node is not None and node.start_mark is not None else None


def describe(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node.tag == "tag:yaml.org,2002:null":
        return "nothing"
    return brief_repr(node.value)


def suggest(word: str, choices, what: str) -> str:
    choices = list(choices)
    close = difflib.get_close_matches(word, choices, n=1)
    prefix = f"did you mean '{close[0]}'? " if close else ""
    return f"{prefix}{what}: {', '.join(choices)}"


# --------------------------------------------------------------------------- parsing


def read_config_file(path: str) -> str:
    """The text of a config file, or a ConfigError saying why it cannot be read."""
    try:
        with open_input(path, "r", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file (fix: check the path)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: cannot read the config: {exc}") from None


def load_config(path: str | os.PathLike) -> MergeConfig:
    """Read and parse a mergekit YAML file; relative model paths are relative to the current directory."""
    path = os.fspath(path)
    text = read_config_file(path)
    config = parse_config(text, filename=os.path.basename(path) or path, base_dir=os.path.dirname(path))
    config.path = os.path.abspath(path)
    return config


def parse_config(text: str, filename: str = "config.yaml", base_dir: str = ".") -> MergeConfig:
    """Parse mergekit YAML text into a :class:`MergeConfig`, checking every field's type and form.

    Checks that need the checkpoints (paths exist, shapes agree, the method's parameter ranges)
    happen in :func:`fusion_engine.checkpoint.planner.build_plan`, still before any tensor is read.
    """
    doc = _Doc(filename)
    try:
        root = yaml.compose(text, Loader=BoundedLoader)
    except _TooLarge as exc:
        raise ConfigError(located(filename, exc.problem_mark.line + 1, exc.problem,
                                  "write the values out plainly: mergekit configs need neither deep nesting "
                                  "nor large alias expansions")) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(located(filename, line, f"not valid YAML: {exc.problem or exc}",
                                  "check the indentation and the ':' after each key")) from None
    except yaml.YAMLError as exc:  # e.g. a character YAML does not allow (the message spans lines)
        raise ConfigError(located(filename, None, f"not valid YAML: {' '.join(str(exc).split())}")) from None
    if root is None:
        raise ConfigError(located(filename, None, "the config is empty",
                                  "write at least merge_method and models (see mergekit's examples)"))
    top = doc.mapping(root, "the config", TOP_LEVEL_KEYS, required=("merge_method",))
    lines = {key: line_of(key_node) for key, (key_node, _) in top.items()}

    method = doc.string(top["merge_method"][1], "merge_method")
    base_model = doc.model_ref(top["base_model"][1], "base_model") if "base_model" in top else None

    has_models, has_slices = "models" in top, "slices" in top
    if has_models == has_slices:
        raise doc.error(root if not has_models else top["slices"][0],
                        "the config needs exactly one of 'models' and 'slices'",
                        "list whole models under 'models:' or layer ranges under 'slices:', not both"
                        if has_models else "add a 'models:' list")
    models = slices = None
    if has_models:
        models = [_model_entry(doc, n) for n in doc.sequence(top["models"][1], "models")]
        if not models:
            raise doc.error(top["models"][1], "'models' is empty", "list at least one model")
    else:
        slices = [_output_slice(doc, n) for n in doc.sequence(top["slices"][1], "slices")]
        if not slices:
            raise doc.error(top["slices"][1], "'slices' is empty", "list at least one slice")

    parameters = _parameters(doc, top["parameters"][1]) if "parameters" in top else {}
    dtype = _dtype(doc, top["dtype"][1], "dtype") if "dtype" in top else None
    out_dtype = _dtype(doc, top["out_dtype"][1], "out_dtype") if "out_dtype" in top else None
    tokenizer_source = tokenizer = chat_template = None
    if "tokenizer_source" in top:
        tokenizer_source = source_name(doc.model_ref(top["tokenizer_source"][1], "tokenizer_source"))
    if "tokenizer" in top:
        if tokenizer_source is not None:
            raise doc.error(top["tokenizer"][0], "both tokenizer_source and a tokenizer: block are given",
                            "keep one: put the source under tokenizer: as source:")
        tokenizer = parse_tokenizer_block(doc, top["tokenizer"][1], line_of)
    if "chat_template" in top:
        chat_template = doc.string(top["chat_template"][1], "chat_template")
    lines_scaling = _lines_scaling(doc, top["lines"][1]) if "lines" in top else None
    alignment, alignment_data = _alignment(doc, top["alignment"][1], base_dir) if "alignment" in top else (None, None)
    if alignment is not None and slices is not None:
        raise doc.error(top["alignment"][0], "alignment works on whole models", "list the models under 'models:'")
    return MergeConfig(merge_method=method, base_model=base_model, models=models, slices=slices,
                       parameters=parameters, dtype=dtype, out_dtype=out_dtype, tokenizer_source=tokenizer_source,
                       alignment=alignment, alignment_data=alignment_data,
                       filename=filename, base_dir=base_dir, text=text, lines=lines, lines_scaling=lines_scaling,
                       tokenizer=tokenizer, chat_template=chat_template)


def _lines_scaling(doc: _Doc, node: yaml.Node) -> tuple[float, float]:
    """``lines: {alpha: a, beta: b}``: LiNeS's depth scaling (:mod:`fusion_engine.methods.lines`)."""
    from ..methods.lines import check_lines

    entries = doc.mapping(node, "lines", ("alpha", "beta"), required=("alpha", "beta"))
    try:
        return check_lines(doc.value(entries["alpha"][1]), doc.value(entries["beta"][1]))
    except ConfigError as exc:
        raise doc.error(node, str(exc)) from None


def _alignment(doc: _Doc, node: yaml.Node, base_dir: str) -> tuple[str, str | None]:
    """``alignment: weight_matching`` or ``alignment: {method: activation_matching, data: prompts.txt}``."""
    data_node = None
    if isinstance(node, yaml.MappingNode):
        entries = doc.mapping(node, "alignment", ("method", "data"), required=("method",))
        method_node, data_node = entries["method"][1], entries.get("data", (None, None))[1]
    else:
        method_node = node
    method = doc.string(method_node, "alignment")
    if method not in ALIGNMENTS:
        raise doc.error(method_node, f"alignment: {method} is not available in a merge config",
                        f"use one of {', '.join(ALIGNMENTS)}")
    data = doc.string(data_node, "alignment data") if data_node is not None else None
    if method == "activation_matching" and data is None:
        raise doc.error(node, "alignment: activation_matching needs model inputs",
                        "write alignment: {method: activation_matching, data: prompts.txt} (one prompt per line, "
                        "JSONL, or a tensor file of input_ids)")
    if data is not None and not os.path.isabs(data):
        data = os.path.join(base_dir, data)
    return method, data


def _model_entry(doc: _Doc, node: yaml.Node) -> SliceSource:
    if isinstance(node, yaml.ScalarNode):  # "- ./model" shorthand
        return SliceSource(doc.model_ref(node, "model"), None, {}, line_of(node))
    entries = doc.mapping(node, "a models entry", ("model", "parameters"), required=("model",))
    params = _parameters(doc, entries["parameters"][1]) if "parameters" in entries else {}
    return SliceSource(doc.model_ref(entries["model"][1], "model"), None, params, line_of(node))


def _output_slice(doc: _Doc, node: yaml.Node) -> OutputSlice:
    entries = doc.mapping(node, "a slices entry", ("sources", "base_model", "parameters", "residual_weight"),
                          required=("sources",))
    if "residual_weight" in entries:
        raise doc.error(entries["residual_weight"][0], "residual_weight is not supported (mergekit ignores it too)",
                        "remove it")
    sources = []
    for src in doc.sequence(entries["sources"][1], "sources"):
        e = doc.mapping(src, "a slice source", ("model", "layer_range", "parameters"), required=("model", "layer_range"))
        sources.append(SliceSource(doc.model_ref(e["model"][1], "model"), _layer_range(doc, e["layer_range"][1]),
                                   _parameters(doc, e["parameters"][1]) if "parameters" in e else {}, line_of(src)))
    if not sources:
        raise doc.error(entries["sources"][1], "a slice has no sources", "list at least one source model")
    lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
    if len(lengths) > 1:
        raise doc.error(node, f"the sources of a slice cover different numbers of layers ({sorted(lengths)})",
                        "give every source of one slice a layer_range of the same length")
    base = doc.model_ref(entries["base_model"][1], "base_model") if "base_model" in entries else None
    params = _parameters(doc, entries["parameters"][1]) if "parameters" in entries else {}
    return OutputSlice(sources, base, params, line_of(node))


def _layer_range(doc: _Doc, node: yaml.Node) -> tuple[int, int]:
    value = doc.value(node)
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise doc.error(node, f"layer_range must be two integers [start, end), got {brief_repr(value)}",
                        "write e.g. layer_range: [0, 16]")
    start, end = value
    if start < 0 or end <= start:
        raise doc.error(node, f"layer_range [{start}, {end}] is empty or negative",
                        "use 0 <= start < end; the end layer is excluded")
    return start, end


def _dtype(doc: _Doc, node: yaml.Node, what: str) -> torch.dtype:
    name = doc.string(node, what)
    key = name.removeprefix("torch.")
    if key not in DTYPES:
        raise doc.error(node, f"{what} '{name}' is not a floating dtype", suggest(key, ["float16", "bfloat16",
                        "float32", "float64"], "use one of"))
    return DTYPES[key]


def _parameters(doc: _Doc, node: yaml.Node) -> dict[str, Setting]:
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
        return {}
    out = {}
    for name, (key_node, value_node) in doc.mapping(node, "parameters").items():
        out[name] = Setting(name, _setting_value(doc, value_node, name), line_of(key_node))
    return out


def _scalar_or_gradient(doc: _Doc, node: yaml.Node, name: str) -> Scalar | list[Scalar]:
    if isinstance(node, yaml.ScalarNode):
        value = doc.value(node)
        if value is None:
            raise doc.error(node, f"parameter '{name}' has no value", f"write e.g. {name}: 0.5, or remove it")
        if not isinstance(value, (bool, int, float, str)):
            raise doc.error(node, f"parameter '{name}' must be a number, boolean or string, got {brief_repr(value)}")
        if isinstance(value, int) and not _fits_a_float(value):  # no merge can compute with it
            raise doc.error(node, f"parameter '{name}' = {brief_repr(value)} is too large a number",
                            "write a number of ordinary size, e.g. 0.5")
        return value
    if isinstance(node, yaml.SequenceNode):
        values = [_scalar_or_gradient(doc, n, name) for n in node.value]
        if not values:
            raise doc.error(node, f"parameter '{name}' is an empty list", "give a value or a gradient of >= 1 values")
        if any(isinstance(v, list) for v in values):
            raise doc.error(node, f"parameter '{name}': a gradient is a flat list of values",
                            "write e.g. [0.2, 0.5, 0.8]")
        return values
    raise doc.error(node, f"parameter '{name}' must be a value, a gradient list or filter entries, "
                          f"got {describe(node)}", f"write e.g. {name}: 0.5")


def _fits_a_float(value: int) -> bool:
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _setting_value(doc: _Doc, node: yaml.Node, name: str):
    def is_conditional(n: yaml.Node) -> bool:
        return isinstance(n, yaml.MappingNode)

    if isinstance(node, yaml.MappingNode):
        return [_conditional(doc, node, name)]
    if isinstance(node, yaml.SequenceNode) and any(is_conditional(n) for n in node.value):
        if not all(is_conditional(n) for n in node.value):
            raise doc.error(node, f"parameter '{name}' mixes filter entries and plain values",
                            "make every entry a mapping with 'value:' (and 'filter:' except for the default)")
        return [_conditional(doc, n, name) for n in node.value]
    return _scalar_or_gradient(doc, node, name)


def _conditional(doc: _Doc, node: yaml.Node, name: str) -> Conditional:
    entries = doc.mapping(node, f"a filter entry of '{name}'", ("filter", "value"), required=("value",))
    flt = None
    if "filter" in entries:
        flt = doc.value(entries["filter"][1])
        if not isinstance(flt, str) or not flt:
            raise doc.error(entries["filter"][1], f"the filter of '{name}' must be a non-empty string "
                            "(a part of the tensor name)", "write e.g. filter: self_attn")
    return Conditional(_scalar_or_gradient(doc, entries["value"][1], name), flt, line_of(node))
