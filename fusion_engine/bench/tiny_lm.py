"""A tiny language-modelling task for transformer alignment: two small Llama models (GQA) trained in seconds.

The data are token sequences of a fixed random second-order Markov chain over ``vocab`` symbols
(each pair of previous tokens has a sparse next-token distribution), so a two-layer model learns
it well in a few hundred steps on two CPU cores. Two models trained from different seeds end up with
different hidden-unit, head and head-dimension labellings: the naive midpoint has a clear barrier
that alignment removes.

    >>> data = markov_data(seed=0)
    >>> a = train_lm(data, seed=1)
    >>> lm_loss(a, data.test) < 1.5
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class TokenData:
    train: torch.Tensor  # int64 [n, length]
    test: torch.Tensor


def markov_data(*, vocab: int = 16, length: int = 24, n_train: int = 1024, n_test: int = 256,
                support: int = 3, seed: int = 0) -> TokenData:
    """Sequences of a random second-order Markov chain: ``support`` possible next tokens per context."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.full((vocab, vocab, vocab), float("-inf"))
    for i in range(vocab):
        for j in range(vocab):
            nxt = torch.randperm(vocab, generator=g)[:support]
            logits[i, j, nxt] = torch.randn(support, generator=g)
    probs = logits.softmax(-1)
    n = n_train + n_test
    seq = torch.empty(n, length, dtype=torch.int64)
    seq[:, :2] = torch.randint(0, vocab, (n, 2), generator=g)
    for t in range(2, length):
        seq[:, t] = torch.multinomial(probs[seq[:, t - 2], seq[:, t - 1]], 1, generator=g)[:, 0]
    return TokenData(seq[:n_train], seq[n_train:])


def make_lm(*, vocab: int = 16, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
            ffn: int = 64, seed: int = 0) -> nn.Module:
    """A ``transformers`` Llama causal LM (grouped-query attention with ``kv_heads`` < ``heads``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=ffn, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` on ``tokens``, in eval mode."""
    flag = model.training
    model.eval()
    with torch.no_grad():
        logits = model(tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    model.train(flag)
    return float(loss)


def train_lm(data: TokenData, *, seed: int = 0, steps: int = 300, batch_size: int = 64, lr: float = 3e-3,
             **model_kwargs) -> nn.Module:
    """A :func:`make_lm` model trained with Adam on next-token prediction (batches drawn with ``seed``)."""
    model = make_lm(seed=seed, **model_kwargs)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch = data.train[torch.randint(0, len(data.train), (batch_size,), generator=g)]
        logits = model(batch[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()
