"""The output tokenizer of a merge and, per model, where each output token's row is (mergekit's rules).

* ``base``: the base model's tokenizer (the first model's without a base);
* ``union``: the base tokenizer plus every other token of every model (ids below the model's
  ``vocab_size``), appended in model order with ``add_tokens``, then every model's added (special)
  tokens with their settings (the first model's settings win);
* a model: that model's tokenizer.

Tokens named in the ``tokenizer:`` block's ``tokens`` are added when missing. A model's
*permutation* maps every output id to the row of that token in the model's embedding (-1 when the
model lacks it, or has it at an id ``>= vocab_size``). Tokenizers are loaded with ``transformers``'
``AutoTokenizer`` from the local folders (no network); a model without tokenizer files uses the base's.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch

from ..errors import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


@dataclass
class Vocabulary:
    """The output tokenizer and each model's rows for its tokens."""

    tokenizer: object  # a transformers tokenizer
    vocab: dict[str, int]
    permutations: dict[str, torch.Tensor]  # model key -> int64 (len(vocab),), -1 where absent
    original_vocabs: dict[str, dict[str, int]]

    def is_identity(self, sizes: dict[str, int]) -> bool:
        """Every model already has exactly the output vocabulary, in order (nothing to re-index)."""
        n = len(self.vocab)
        return all(sizes[m] == n and torch.equal(p, torch.arange(n)) for m, p in self.permutations.items())


def load_tokenizer(folder: str | None, what: str):
    """``AutoTokenizer.from_pretrained(folder)`` (local files only), or None when the folder has none."""
    if folder is None or not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError(f"{what}: building the output tokenizer needs transformers and tokenizers "
                          "(pip install 'fusion_engine[tokenizer]')") from None

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any tokenizer loading failure is a bad input folder
        raise ConfigError(f"{what}: cannot load the tokenizer in {folder} ({type(exc).__name__}: {exc})") from None


def _copy(tokenizer):
    """A private copy (save and reload), so the inputs' tokenizers are never changed."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp, local_files_only=True)


def _union(base_tok, tokenizers: dict[str, object], sizes: dict[str, int]):
    out_vocab: dict[str, int] = {}
    added: dict[str, object] = {}
    for model, tok in tokenizers.items():
        decoder = tok.added_tokens_decoder
        added_contents = {info.content for info in decoder.values()}
        for token, idx in tok.get_vocab().items():
            if idx < sizes[model] and token not in added_contents and token not in out_vocab:
                out_vocab[token] = len(out_vocab)
        for idx, info in decoder.items():
            if idx < sizes[model] and info.content not in added:
                added[info.content] = info
    result = _copy(base_tok)
    base_vocab = base_tok.get_vocab()
    for token in out_vocab:
        if token not in added and token not in base_vocab:
            result.add_tokens(token)
    for info in added.values():
        result.add_tokens(info)
    return result


def build_vocabulary(source: str, models: list[str], base: str | None, folders: dict[str, str | None],
                     sizes: dict[str, int], extra_tokens=(), source_folder: str | None = None) -> Vocabulary:
    """The output tokenizer for ``source`` (``union``/``base``/a model) over ``models`` (config keys, base first
    when there is one) and their permutations; ``sizes`` are the models' embedding rows (``vocab_size``)."""
    base = base or models[0]
    base_tok = load_tokenizer(folders[base], f"model '{base}'")
    if base_tok is None:
        raise ConfigError(f"model '{base}' has no tokenizer files; a merged vocabulary needs the base's tokenizer")
    tokenizers = {base: base_tok}
    for model in models:
        if model not in tokenizers:
            tok = load_tokenizer(folders[model], f"model '{model}'")
            if tok is not None:
                tokenizers[model] = tok
    if source == "union":
        out = _union(base_tok, tokenizers, sizes)
    elif source == "base":
        out = _copy(base_tok)
    else:
        tok = load_tokenizer(source_folder, f"tokenizer source '{source}'")
        if tok is None:
            raise ConfigError(f"tokenizer source '{source}' holds no tokenizer files")
        out = _copy(tok)
    have = set(out.get_vocab())
    for token in extra_tokens:
        if token not in have:
            out.add_tokens(token)
            have.add(token)
    vocab = out.get_vocab()
    ids = torch.tensor(list(vocab.values()), dtype=torch.long)
    permutations = {}
    for model in models:
        model_vocab = tokenizers.get(model, base_tok).get_vocab()
        perm = torch.full((len(vocab),), -1, dtype=torch.long)
        rows = torch.tensor([model_vocab.get(t, -1) for t in vocab], dtype=torch.long)
        rows[rows >= sizes[model]] = -1
        perm[ids] = rows
        permutations[model] = perm
    return Vocabulary(out, vocab, permutations, {m: t.get_vocab() for m, t in tokenizers.items()})
