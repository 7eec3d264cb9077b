"""Ready-made analyses: the digits task set, a tiny causal LM built in code, and local checkpoints.

* :func:`digits_analysis` — the evaluation table's pre-trained MLP and its fine-tunings (rot90, rot180,
  rot270, mirror), measured on all tasks' test images;
* :func:`tiny_lm_analysis` — a 2-layer Llama initialised from a seed, fine-tuned on three synthetic
  next-token tasks (arithmetic sequences of step 1, 2, 3 modulo the vocabulary), measured on held-out
  sequences of all three;
* :func:`checkpoint_analysis` — HF checkpoints on disk: the task-vector geometry streamed tensor by tensor,
  and with a text file of prompts, the language-modelling curves and CKA of causal LMs.

Everything is offline and seeded.
"""

from __future__ import annotations

import copy
import os
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import CheckpointError, ConfigError
from ..io.prompts import load_token_ids
from .report import AnalysisReport, analyze


# ----------------------------------------------------------------------------------------------
# digits


def digits_analysis(seed: int = 0, *, steps: int = 11, plane_grid: int = 11) -> AnalysisReport:
    """Task vectors of the digits fine-tunings; curves, per-layer barriers, CKA and the loss plane between them."""
    from ..bench.digits import evaluate as score
    from ..bench.tasks import TaskConfig, build_tasks

    setup = build_tasks(TaskConfig(seed=seed))
    x = torch.cat([t.x_test for t in setup.tasks])
    y = torch.cat([t.y_test for t in setup.tasks])

    def evaluate(model):
        s = score(model, x, y)
        return s.loss, s.accuracy

    labels = [f"ft-{t.name}" for t in setup.tasks]
    report = analyze(setup.finetuned, base=setup.pretrained, labels=labels, evaluate=evaluate,
                     cka_batches=[x[i:i + 512] for i in range(0, len(x), 512)], steps=steps, plane_grid=plane_grid,
                     title="Analysis: the digits fine-tunings")
    report.notes.append(f"{len(setup.tasks)} fine-tunings of one pre-trained {'×'.join(map(str, setup.config.hidden))} "
                        f"MLP (seed {seed}); loss and accuracy on all tasks' test images ({len(y)}).")
    return report


# ----------------------------------------------------------------------------------------------
# a tiny causal LM


def _tiny_llama(vocab: int, seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def _arithmetic_sequences(step: int, n: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, vocab, (n, 1), generator=generator)
    return (start + step * torch.arange(length)) % vocab


def lm_scores(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 64) -> tuple[float, float]:
    """Mean next-token cross-entropy and accuracy of a causal LM on token sequences [n, length]."""
    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, len(input_ids), batch_size):
            ids = input_ids[i:i + batch_size]
            logits = model(input_ids=ids).logits[:, :-1].float()
            target = ids[:, 1:]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
            correct += int((logits.argmax(-1) == target).sum())
            count += target.numel()
    return total / count, correct / count


def tiny_lm_analysis(seed: int = 0, *, steps: int = 11, plane_grid: int = 9, train_steps: int = 60) -> AnalysisReport:
    """A seeded tiny Llama and three fine-tunings on arithmetic-sequence tasks (see the module doc)."""
    vocab, length = 48, 16
    g = torch.Generator().manual_seed(seed)
    base = _tiny_llama(vocab, seed)
    models = []
    for task, step in enumerate((1, 2, 3)):
        model = copy.deepcopy(base).train()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(train_steps):
            ids = _arithmetic_sequences(step, 32, length, vocab, g)
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        models.append(model.eval())
    held_out = torch.cat([_arithmetic_sequences(s, 64, length, vocab, g) for s in (1, 2, 3)])
    report = analyze(models, base=base, labels=["step-1", "step-2", "step-3"],
                     evaluate=lambda m: lm_scores(m, held_out),
                     cka_batches=[held_out[i:i + 64] for i in range(0, len(held_out), 64)],
                     forward=lambda m, ids: m(input_ids=ids), steps=steps, plane_grid=plane_grid,
                     title="Analysis: a tiny causal LM fine-tuned on three tasks")
    report.notes.append(f"2-layer Llama (hidden 32, vocab {vocab}, seed {seed}), each copy fine-tuned {train_steps} "
                        f"Adam steps on sequences x_t = x_0 + k·t mod {vocab} (k = 1, 2, 3); next-token loss and "
                        f"accuracy on {len(held_out)} held-out sequences of all three tasks.")
    return report


# ----------------------------------------------------------------------------------------------
# checkpoints on disk


def checkpoint_analysis(models: Sequence[str], *, base: str | None = None, data: str | None = None,
                        steps: int = 11, plane_grid: int = 9, max_prompts: int = 256,
                        max_tokens: int = 256) -> AnalysisReport:
    """Task-vector geometry of HF checkpoints (streamed), plus LM curves / CKA / plane with ``data``."""
    from ..io import open_checkpoint

    labels = [os.path.basename(os.path.normpath(m)) or m for m in models]
    report = AnalysisReport("Analysis of " + ", ".join(labels), labels)
    if base is not None:
        from .geometry import task_vector_geometry

        with open_checkpoint(base) as b:
            opened = [open_checkpoint(m) for m in models]
            try:
                report.geometry = task_vector_geometry(b, opened, labels=labels)
            finally:
                for c in opened:
                    c.close()
    if data is not None:
        if len(models) < 2:
            raise ConfigError("analyze --data needs at least two models (curves run between the first two)")
        ids = load_token_ids(data, base or models[0], max_prompts=max_prompts, max_tokens=max_tokens)
        lms = [_load_causal_lm(m) for m in models]
        lm_report = analyze(lms, labels=labels, evaluate=lambda m: lm_scores(m, ids, batch_size=8),
                            cka_batches=[ids[i:i + 8] for i in range(0, len(ids), 8)],
                            forward=lambda m, x: m(input_ids=x), steps=steps, plane_grid=plane_grid)
        report.curve, report.layer_barriers = lm_report.curve, lm_report.layer_barriers
        report.cka, report.plane = lm_report.cka, lm_report.plane
        report.notes.append(f"Language-modelling loss and next-token accuracy on {len(ids)} prompts of {data} "
                            f"(truncated/padded to {ids.shape[1]} tokens).")
    return report


def _load_causal_lm(path: str) -> nn.Module:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as exc:  # pragma: no cover - transformers is a dependency of the demo extra
        raise ConfigError("analyze --data needs transformers: pip install transformers") from exc
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot be loaded as a causal LM by transformers ({exc}); analyze --data "
                              f"needs HF causal-LM folders (config.json + weights)") from exc


__all__ = ["checkpoint_analysis", "digits_analysis", "lm_scores", "tiny_lm_analysis"]
