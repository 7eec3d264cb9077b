"""Embedding and LM-head rows re-indexed into the output vocabulary, per tensor (mergekit's ``PermutedVocabulary``).

For one vocabulary tensor of the models ``M`` of a task (rows = tokens), every model's output row for
token ``t`` is its own row ``P_m[t]`` when it has the token (and the token is not ``force``-d), else a
default embedding ``e_t`` shared by all models:

* a token configured in ``tokens:``: zero, the row of ``token``/``token_id`` in a model
  (``model_token``), or the named model's row of ``t`` (``model``);
* otherwise (mergekit's ``assign_embedding_sources``): present in one model only → that model's row;
  in none → zero; in the base → the base's row; else the mean over the models that have it.

With ``pad_to_multiple_of`` the rows past the vocabulary get the mean of the vocabulary's rows. The
result's dtype is the promotion of the inputs' dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from .build import Vocabulary
from .spec import TokenSetting


@dataclass
class VocabularyPlan:
    """What the executor needs to re-index one task's vocabulary tensors (no tensor data)."""

    vocabulary: Vocabulary
    size: int  # output rows (padded)
    base: str | None
    tokens: dict[str, TokenSetting] = field(default_factory=dict)

    def apply(self, models: list[str], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors of ``models`` (in task order; a model may appear once) in the output vocabulary."""
        vocab = self.vocabulary.vocab
        n = len(vocab)
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        tensors = [t.to(dtype) for t in tensors]
        by_model = dict(zip(models, tensors))
        order = list(by_model)
        perms = torch.stack([self.vocabulary.permutations[m] for m in order])  # (models, n)
        present = perms >= 0
        force = torch.zeros(n, dtype=torch.bool)
        for token, setting in self.tokens.items():
            if setting.force and token in vocab:
                force[vocab[token]] = True
        needs = force | ~present.all(dim=0)
        defaults = self._defaults(order, by_model, perms, present, needs)
        out = []
        for model, tensor in zip(models, tensors):
            perm = self.vocabulary.permutations[model]
            rows = torch.zeros((self.size, *tensor.shape[1:]), dtype=dtype, device=tensor.device)
            own = (perm >= 0) & ~force
            ids = own.nonzero().squeeze(1)
            rows[ids] = tensor[perm[ids]]
            ids = (~own & needs).nonzero().squeeze(1)
            rows[ids] = defaults[ids]
            if self.size > n:
                rows[n:] = rows[:n].mean(dim=0)
            out.append(rows)
        return out

    def _defaults(self, order, by_model, perms, present, needs) -> torch.Tensor:
        """``e_t`` for every token that needs one (zero rows elsewhere)."""
        first = by_model[order[0]]
        defaults = torch.zeros((perms.shape[1], *first.shape[1:]), dtype=first.dtype, device=first.device)
        vocab = self.vocabulary.vocab
        configured = torch.zeros(perms.shape[1], dtype=torch.bool)
        for token, setting in self.tokens.items():
            if token not in vocab or setting.source.kind == "auto":
                continue
            t = vocab[token]
            configured[t] = True
            if bool(needs[t]):
                defaults[t] = self._configured(token, t, setting, by_model)
        auto = needs & ~configured
        count = present.sum(dim=0)
        total = torch.zeros_like(defaults)
        for i, model in enumerate(order):  # the mean, summed in model order as mergekit does
            ids = (auto & present[i]).nonzero().squeeze(1)
            total[ids] += by_model[model][perms[i, ids]]
        ids = (auto & (count > 0)).nonzero().squeeze(1)
        defaults[ids] = total[ids] / count[ids].view(-1, *([1] * (total.dim() - 1))).to(total.dtype)
        if self.base in by_model:  # present in the base (and in more than one model): the base's row
            b = order.index(self.base)
            ids = (auto & present[b] & (count > 1)).nonzero().squeeze(1)
            defaults[ids] = by_model[self.base][perms[b, ids]]
        return defaults

    def _configured(self, token: str, t: int, setting: TokenSetting, by_model) -> torch.Tensor:
        src = setting.source
        if src.kind == "zero":
            return torch.zeros_like(next(iter(by_model.values()))[0])
        if src.model not in by_model:
            raise ConfigError(f"token {token!r} takes its embedding from model '{src.model}', which is not an input "
                              f"of this tensor (fix: name a model that this merge reads)")
        tensor = by_model[src.model]
        if src.kind == "model":
            row = int(self.vocabulary.permutations[src.model][t])
            if row < 0:
                raise ConfigError(f"token {token!r}: model '{src.model}' does not have it (fix: name a model whose "
                              "tokenizer has the token, or use kind: model_token)")
            return tensor[row]
        row = src.token_id
        if row is None:
            row = self.vocabulary.original_vocabs.get(src.model, {}).get(src.token, -1)
            if row < 0:
                raise ConfigError(f"token {src.token!r} (source of {token!r}) is not in the tokenizer of model "
                                  f"'{src.model}'")
        if not 0 <= row < tensor.shape[0]:
            raise ConfigError(f"token id {row} (source of {token!r}) is out of range for model '{src.model}' "
                              f"({tensor.shape[0]} rows)")
        return tensor[row]
