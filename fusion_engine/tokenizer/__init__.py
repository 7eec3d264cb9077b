"""Tokenizers of a merge (issue 16): ``tokenizer_source``, the ``tokenizer:`` block and ``chat_template``.

:func:`plan_output_tokenizer` runs at plan time (tokenizers only, no tensor data): it builds the output
tokenizer (:mod:`.build`), decides whether the vocabulary tensors must be re-indexed (a
:class:`~.embed.VocabularyPlan` the executor applies per tensor, :mod:`.embed`), and serialises the
tokenizer files (with the chat template, :mod:`.templates`) for the output folder.
"""

from .._lazy import lazy_exports

# public name -> the module defining it, imported on first access (the command line stays light)
__getattr__, __dir__ = lazy_exports(__name__, {
    "Vocabulary": ".build", "build_vocabulary": ".build", "VocabularyPlan": ".embed", "OutputTokenizer": ".output",
    "is_vocabulary_tensor": ".output", "plan_output_tokenizer": ".output", "TokenizerSpec": ".spec",
    "parse_tokenizer_block": ".spec", "source_name": ".spec", "resolve_chat_template": ".templates",
})

__all__ = ["OutputTokenizer", "TokenizerSpec", "Vocabulary", "VocabularyPlan", "build_vocabulary",
           "is_vocabulary_tensor", "parse_tokenizer_block", "plan_output_tokenizer", "resolve_chat_template",
           "source_name"]
