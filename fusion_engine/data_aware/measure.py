"""Statistics of a model on local data, saved as safetensors for data-aware merges of checkpoints.

:func:`measure_statistics` streams batches through a model and returns, in one dict of tensors:

* ``fisher.<parameter>`` — the diagonal Fisher (:func:`~.fisher.estimate_fisher`): per-example squared
  gradients averaged over the examples; ``kind="empirical"`` at the data's labels, ``"sampled"`` at labels
  drawn from the model's own predictive distribution (seeded), ``"model"`` the exact expectation over the
  classes (classifiers with [batch, classes] logits only);
* ``gram.<module>`` — XᵀX of every ``nn.Linear``'s inputs (:func:`~.regmean.collect_gram`), summed over
  the examples, so ``gram.<m>`` pairs with the weight ``<m>.weight`` (RegMean);
* optionally ``activation_mean.<module>`` / ``activation_var.<module>`` — per-channel mean and variance of
  every ``nn.Linear``'s outputs (for alignment and REPAIR-style statistics).

For a causal LM an example is one token sequence, its loss the mean next-token cross-entropy (each
sequence's gradient is taken on its own: exact per-example Fisher). :mod:`fusion_engine.io.statistics`
saves the dict as one safetensors file and reads it back; ``fusion-engine measure`` is the command for HF
causal LMs, and the YAML methods ``fisher`` and ``regmean`` read these files.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError
from ._inputs import eval_mode, iterate_batches, module_device
from .fisher import estimate_fisher
from .regmean import collect_gram

FISHER_KINDS = ("empirical", "sampled", "model")


class _NextTokenLogits(nn.Module):
    """A causal LM as a function of token ids → next-token logits [batch, length − 1, vocab]."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids).logits[:, :-1]


def _sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean next-token cross-entropy [batch]."""
    per_token = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return per_token.mean(-1)


def _sampled_labels(model: nn.Module, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    with torch.no_grad():
        logits = model(x).float()
    probs = torch.softmax(logits.reshape(-1, logits.shape[-1]), -1).cpu()
    return torch.multinomial(probs, 1, generator=generator).reshape(logits.shape[:-1]).to(x.device)


@torch.no_grad()
def _activation_moments(model: nn.Module, batches: Iterable, where: str) -> dict[str, torch.Tensor]:
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    sums: dict[str, list] = {}

    def hook(name):
        def record(_m, _inp, out):
            rows = out.detach().reshape(-1, out.shape[-1]).double()
            acc = sums.setdefault(name, [0, torch.zeros(rows.shape[1], dtype=torch.float64),
                                         torch.zeros(rows.shape[1], dtype=torch.float64)])
            acc[0] += rows.shape[0]
            acc[1] += rows.sum(0)
            acc[2] += rows.square().sum(0)
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
    device = module_device(model)
    try:
        with eval_mode(model):
            for x, _ in iterate_batches(where, batches):
                model(x.to(device))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, (n, s, sq) in sums.items():
        mean = s / n
        out[f"activation_mean.{name}"] = mean.float()
        out[f"activation_var.{name}"] = (sq / n - mean.square()).clamp_min(0).float()
    return out


def measure_statistics(model: nn.Module, batches: Iterable, *, fisher: str | None = "empirical", gram: bool = True,
                       activations: bool = False, causal_lm: bool = False, seed: int = 0,
                       loss_fn: Callable | None = None) -> dict[str, torch.Tensor]:
    """The statistics of the module doc, keyed ``fisher.<param>``, ``gram.<module>``, ``activation_*.<module>``.

    Parameters
    ----------
    model : an ``nn.Module`` (a classifier returning logits, or with ``causal_lm=True`` an HF causal LM taking
        ``input_ids``); run in eval mode, never modified
    batches : a re-iterable of ``x`` or ``(x, y)`` batches (causal LM: token ids [batch, length]; labels are the
        next tokens); it is read once per statistic
    fisher : ``"empirical"``, ``"sampled"``, ``"model"`` or None (no Fisher)
    gram, activations : whether to collect the Gram matrices / the activation moments
    seed : the generator of the sampled labels
    loss_fn : per-example loss for ``fisher="empirical"`` on a classifier (default cross-entropy)
    """
    where = "measure_statistics"
    if fisher is not None and fisher not in FISHER_KINDS:
        raise ConfigError(f"{where}: fisher={fisher!r}; choose one of {FISHER_KINDS} or None")
    if fisher is None and not gram and not activations:
        raise ConfigError(f"{where}: nothing to measure; ask for fisher, gram or activations")
    batches = list(batches)
    stats: dict[str, torch.Tensor] = {}
    lm = _NextTokenLogits(model) if causal_lm else model
    if fisher is not None:
        stats.update({f"fisher.{k}": v for k, v in _fisher(lm, batches, fisher, causal_lm, seed, loss_fn).items()})
    inputs = [x for x, _ in iterate_batches(where, batches)]
    if gram:
        stats.update({f"gram.{k}": v for k, v in collect_gram(model, inputs).items()})
    if activations:
        stats.update(_activation_moments(model, inputs, where))
    if causal_lm:  # the wrapper's parameter names carry an "lm." prefix: the model's own names
        stats = {k.replace("fisher.lm.", "fisher.", 1): v for k, v in stats.items()}
    return stats


def _fisher(model: nn.Module, batches: list, kind: str, causal_lm: bool, seed: int, loss_fn) -> dict[str, torch.Tensor]:
    where = "measure_statistics"
    generator = torch.Generator().manual_seed(seed)
    if not causal_lm:
        if kind == "sampled":
            pairs = [(x, _sampled_labels(model, x, generator)) for x, _ in iterate_batches(where, batches)]
            return estimate_fisher(model, pairs, kind="empirical", loss_fn=loss_fn)
        return estimate_fisher(model, batches, kind=kind, loss_fn=loss_fn)
    if kind == "model":
        raise ConfigError(f"{where}: fisher='model' (an exact sum over classes) is for classifiers; for a causal LM "
                          f"use 'empirical' or 'sampled'")
    sequences = []
    for x, _ in iterate_batches(where, batches):
        targets = x[:, 1:] if kind == "empirical" else _sampled_labels(model, x, generator)
        sequences += [(x[i:i + 1], targets[i:i + 1]) for i in range(x.shape[0])]
    # one sequence per step: the squared gradient of one example's loss (exact per-example Fisher)
    return estimate_fisher(model, sequences, kind="empirical", per_example=False, loss_fn=_sequence_loss)


__all__ = ["FISHER_KINDS", "measure_statistics"]
