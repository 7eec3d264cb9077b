"""The ``tokenizer:`` block of a merge config (mergekit's ``TokenizerConfig``), parsed with line numbers.

::

    tokenizer:
      source: union                 # union (default) | base | a model path (also model:<path>)
      pad_to_multiple_of: 64        # optional: the vocabulary is padded with the mean embedding
      tokens:                       # optional per-token embedding sources
        <|im_start|>:
          source: ./chat_model      # that model's embedding of the token
          force: true               # use it even where a model has the token
        <|im_end|>:
          source: {kind: model_token, model: ./chat_model, token: "</s>"}   # or token_id: 2
        <pad>:
          source: {kind: zero}

``tokenizer_source: X`` at the top level is the same as ``tokenizer: {source: X}`` with no tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml


@dataclass(frozen=True)
class TokenSource:
    """Where a token's embedding comes from: ``kind`` is ``model`` (that model's row of the token),
    ``model_token`` (the row of ``token``/``token_id`` in ``model``), ``zero``, or ``auto`` (mergekit's
    rule for a token some models lack)."""

    kind: str
    model: str | None = None
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class TokenSetting:
    source: TokenSource
    force: bool = False
    line: int | None = None


@dataclass
class TokenizerSpec:
    source: str  # "union", "base" or a model reference
    tokens: dict[str, TokenSetting] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None
    line: int | None = None


def source_name(value: str) -> str:
    """``model:<path>`` -> ``<path>``; anything else unchanged."""
    return value[len("model:"):] if value.startswith("model:") else value


def parse_tokenizer_block(doc, node, line_of) -> TokenizerSpec:
    """Parse the ``tokenizer:`` mapping with the config's YAML helper ``doc`` (errors carry lines)."""
    entries = doc.mapping(node, "tokenizer", ("source", "tokens", "pad_to_multiple_of"))
    source = source_name(doc.model_ref(entries["source"][1], "tokenizer source")) if "source" in entries else "union"
    pad = None
    if "pad_to_multiple_of" in entries:
        pad = doc.value(entries["pad_to_multiple_of"][1])
        if not isinstance(pad, int) or isinstance(pad, bool) or pad < 1:
            raise doc.error(entries["pad_to_multiple_of"][1], f"pad_to_multiple_of must be a positive integer, got "
                                                              f"{pad!r}", "write e.g. pad_to_multiple_of: 64")
    tokens = {}
    if "tokens" in entries:
        for token, (key_node, value_node) in doc.mapping(entries["tokens"][1], "tokenizer tokens").items():
            tokens[token] = _token_setting(doc, value_node, token, line_of(key_node))
    return TokenizerSpec(source, tokens, pad, line_of(node))


def _token_setting(doc, node, token: str, line: int | None) -> TokenSetting:
    entries = doc.mapping(node, f"token {token!r}", ("source", "force"))
    force = False
    if "force" in entries:
        force = doc.value(entries["force"][1])
        if not isinstance(force, bool):
            raise doc.error(entries["force"][1], f"token {token!r}: force must be true or false, got {force!r}")
    if "source" not in entries:
        return TokenSetting(TokenSource("auto"), force, line)
    src = entries["source"][1]
    if isinstance(src, yaml.ScalarNode):
        return TokenSetting(TokenSource("model", model=doc.model_ref(src, f"token {token!r} source")), force, line)
    spec = doc.mapping(src, f"the source of token {token!r}")
    if "kind" not in spec:  # a model written in long form: {model: ..., lora: ...} / {path: ...}
        return TokenSetting(TokenSource("model", model=doc.model_ref(src, f"token {token!r} source")), force, line)
    kind = doc.string(spec["kind"][1], f"token {token!r} source kind")
    if kind == "zero":
        doc.mapping(src, f"the source of token {token!r}", ("kind",))
        return TokenSetting(TokenSource("zero"), force, line)
    if kind != "model_token":
        raise doc.error(spec["kind"][1], f"token {token!r}: source kind {kind!r} is unknown",
                        "use kind: zero, or kind: model_token with model and token (or token_id)")
    spec = doc.mapping(src, f"the source of token {token!r}", ("kind", "model", "token", "token_id"),
                       required=("model",))
    has_token, has_id = "token" in spec, "token_id" in spec
    if has_token == has_id:
        raise doc.error(src, f"token {token!r}: a model_token source needs exactly one of token and token_id")
    model = doc.model_ref(spec["model"][1], f"token {token!r} source model")
    if has_id:
        token_id = doc.value(spec["token_id"][1])
        if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
            raise doc.error(spec["token_id"][1], f"token {token!r}: token_id must be a non-negative integer")
        return TokenSetting(TokenSource("model_token", model=model, token_id=token_id), force, line)
    return TokenSetting(TokenSource("model_token", model=model, token=doc.string(spec["token"][1], "token")),
                        force, line)
