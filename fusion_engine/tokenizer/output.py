"""The output tokenizer of a merge, planned (see :mod:`fusion_engine.tokenizer`)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

from ..errors import ConfigError
from .build import build_vocabulary, load_tokenizer
from .embed import VocabularyPlan
from .spec import TokenizerSpec
from .templates import resolve_chat_template

VOCABULARY_TENSORS = ("model.embed_tokens.weight", "transformer.wte.weight", "model.decoder.embed_tokens.weight",
                      "gpt_neox.embed_in.weight", "transformer.word_embeddings.weight", "lm_head.weight",
                      "embed_out.weight", "output.weight")


def is_vocabulary_tensor(name: str) -> bool:
    """Rows indexed by token id: input embeddings and LM heads."""
    return name in VOCABULARY_TENSORS or name.endswith(".lm_head.weight")


@dataclass
class OutputTokenizer:
    """The planned tokenizer of a merge: the re-indexing (None: every model already has the output
    vocabulary), the files to write (output name -> content; empty: copy the source's files as they are)
    and the folder it was read from when that is not one of the merged models."""

    vocabulary: VocabularyPlan | None
    files: dict[str, bytes] = field(default_factory=dict)
    source_folder: str | None = None


def _saved(tokenizer) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory(prefix="fe_tokenizer_") as folder:
        tokenizer.save_pretrained(folder)
        out = {}
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as fh:
                out[name] = fh.read()
        return out


def plan_output_tokenizer(spec: TokenizerSpec | None, chat_template: str | None, models: list[str],
                          base: str | None, folders: dict[str, str | None], sizes: dict[str, int],
                          source_folder: str | None) -> OutputTokenizer | None:
    """Plan the output tokenizer (see the module docstring); None when the config asks for nothing."""
    if spec is None and chat_template is None:
        return None
    tokenizer, plan = None, None
    if spec is not None:
        vocab = build_vocabulary(spec.source, models, base, folders, sizes, tuple(spec.tokens), source_folder)
        size = len(vocab.vocab)
        if spec.pad_to_multiple_of and size % spec.pad_to_multiple_of:
            size += spec.pad_to_multiple_of - size % spec.pad_to_multiple_of
        if spec.tokens or size != len(vocab.vocab) or not vocab.is_identity(sizes):
            plan = VocabularyPlan(vocab, size, base, dict(spec.tokens))
            tokenizer = vocab.tokenizer
    if chat_template is None:
        return OutputTokenizer(plan, _saved(tokenizer) if tokenizer is not None else {}, source_folder)
    if tokenizer is None:
        tokenizer = load_tokenizer(source_folder or folders[base or models[0]], "the tokenizer source")
        if tokenizer is None:
            raise ConfigError("chat_template is set but the tokenizer source has no tokenizer files")
    tokenizers = [t for t in (load_tokenizer(folders[m], f"model '{m}'") for m in models) if t is not None]
    tokenizer.chat_template = resolve_chat_template(chat_template, tokenizers)
    return OutputTokenizer(plan, _saved(tokenizer), source_folder)

