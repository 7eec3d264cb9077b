"""scikit-learn's digits as a small, real, offline benchmark: data, an MLP, seeded training.

Everything here is deterministic given the seed and runs in seconds on two CPU cores, so tests and
the evaluation table (``fusion-engine evaluate``) can train real models instead of mocking them.

    >>> data = load_digits_split(seed=0)
    >>> model = train_mlp(data, seed=1)
    >>> evaluate(model, data.x_test, data.y_test).accuracy > 0.9
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

N_FEATURES = 64
N_CLASSES = 10


@dataclass(frozen=True)
class DigitsSplit:
    """Standardised 8×8 digit images (float32 [n, 64]) and labels (int64 [n]), train and test."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass(frozen=True)
class Score:
    loss: float
    accuracy: float


def load_digits_split(*, test_fraction: float = 0.25, seed: int = 0) -> DigitsSplit:
    """The 1797 digits, shuffled with ``seed``, split train/test, standardised with train statistics."""
    from sklearn.datasets import load_digits  # an optional dependency: the ``eval``/``test`` extras

    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    mean = x[train].mean(0)
    std = x[train].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    return DigitsSplit(x[train], y[train], x[test], y[test])


def make_mlp(hidden: tuple[int, ...] = (128, 128), *, seed: int = 0, n_in: int = N_FEATURES,
             n_out: int = N_CLASSES) -> nn.Sequential:
    """``Linear → ReLU → … → Linear``, initialised from ``seed`` (PyTorch's default init)."""
    torch.manual_seed(seed)  # nn.Linear draws from the global generator
    widths = (n_in, *hidden)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], n_out))
    return nn.Sequential(*layers)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 30, batch_size: int = 64,
          lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
          optimizer: Callable[[torch.optim.Optimizer], torch.optim.Optimizer] | None = None,
          after_step: Callable[[nn.Module, torch.optim.Optimizer], None] | None = None,
          after_epoch: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Adam on cross-entropy, minibatches shuffled with ``seed``; trains ``model`` in place and returns it.

    Hooks for training-time averaging: ``optimizer`` wraps the Adam optimizer (e.g. in Lookahead);
    ``after_step(model, optimizer)`` runs after every optimizer step (e.g. a cyclic learning rate that
    collects snapshots), ``after_epoch(model)`` after every epoch (e.g. LAWA or SWAG collecting).
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    if optimizer is not None:
        opt = optimizer(opt)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for start in range(0, len(y), batch_size):
            idx = order[start:start + batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            if after_step is not None:
                after_step(model, opt)
        if after_epoch is not None:
            after_epoch(model)
    model.eval()
    return model


def train_mlp(data: DigitsSplit, *, hidden: tuple[int, ...] = (128, 128), seed: int = 0, epochs: int = 30,
              lr: float = 1e-3) -> nn.Sequential:
    """A fresh MLP (init and data order from ``seed``) trained on the digits' training split."""
    return train(make_mlp(hidden, seed=seed), data.x_train, data.y_train, epochs=epochs, lr=lr, seed=seed)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Score:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``."""
    model.eval()
    logits = model(x)
    return Score(float(F.cross_entropy(logits, y)), float((logits.argmax(-1) == y).float().mean()))
