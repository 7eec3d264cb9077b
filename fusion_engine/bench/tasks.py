"""A seeded multi-task setup on scikit-learn's digits: one pre-trained MLP, K tasks, one fine-tuned model each.

The tasks are geometric transformations of the 8×8 images (rotations by 90°, 180°, 270°, a mirror
image, …) with the same 10 labels, so every model shares one classification head:

1. **pre-train**: an MLP on the upright and the intensity-inverted training images (a model of
   "digits in general" that reads rotated or mirrored digits poorly, and knows it: its predictions
   there are uncertain rather than confidently wrong, as a broadly pre-trained model's would be);
2. **fine-tune**: a copy of it per task, briefly (a few epochs), on that task's transformed training
   images — the task vectors τ_k = θ_k − θ_pre stay small and mergeable;
3. **evaluate** a model per task on that task's transformed test images.

The transformations move the strokes to different input pixels, so the task vectors pull the first
layer in different directions: simple averaging loses accuracy against the individual models, which is
where data-aware merging (Fisher, RegMean, AdaMerging) earns its keep. Everything is deterministic given
``seed`` and builds in about a second on two CPU cores.

    >>> setup = build_tasks(TaskConfig(seed=0))
    >>> [t.name for t in setup.tasks]
    ['rot90', 'rot180', 'rot270', 'mirror']
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .digits import N_CLASSES, Score, evaluate, make_mlp, train

IMAGE_SIDE = 8

# transformations of a batch of images [n, 8, 8] -> [n, 8, 8]
TRANSFORMS = {
    "upright": lambda im: im,
    "rot90": lambda im: torch.rot90(im, 1, dims=(1, 2)),
    "rot180": lambda im: torch.rot90(im, 2, dims=(1, 2)),
    "rot270": lambda im: torch.rot90(im, 3, dims=(1, 2)),
    "mirror": lambda im: torch.flip(im, dims=(2,)),
    "flip": lambda im: torch.flip(im, dims=(1,)),
    "transpose": lambda im: im.transpose(1, 2),
    "invert": lambda im: 1.0 - im,
}


@dataclass(frozen=True)
class TaskConfig:
    """What :func:`build_tasks` builds; the defaults are the evaluation table's configuration."""

    tasks: tuple[str, ...] = ("rot90", "rot180", "rot270", "mirror")
    pretrain_tasks: tuple[str, ...] = ("upright", "invert")
    hidden: tuple[int, ...] = (64, 64)
    pretrain_epochs: int = 10
    finetune_epochs: int = 10
    lr: float = 1e-3
    val_fraction: float = 0.15
    test_fraction: float = 0.25
    seed: int = 0


@dataclass(frozen=True)
class Task:
    """One task: its name and its transformed train / validation / test splits (float32 [n, 64], int64 [n])."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def batches(self, batch_size: int = 64, split: str = "train") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The split as a list of (inputs, labels) minibatches, in order."""
        x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
        return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]


@dataclass
class MultiTaskSetup:
    """The pre-trained model, the tasks and one fine-tuned model per task (same order)."""

    config: TaskConfig
    tasks: list[Task]
    pretrained: nn.Module
    finetuned: list[nn.Module]
    pretrain_data: tuple[torch.Tensor, torch.Tensor] = field(repr=False, default=None)

    def scores(self, model: nn.Module, split: str = "test") -> list[Score]:
        """``model``'s loss and accuracy on each task's ``split``."""
        return [evaluate(model, getattr(t, f"x_{split}"), getattr(t, f"y_{split}")) for t in self.tasks]

    def accuracies(self, model: nn.Module, split: str = "test") -> list[float]:
        return [s.accuracy for s in self.scores(model, split)]

    def mean_accuracy(self, model: nn.Module, split: str = "test") -> float:
        acc = self.accuracies(model, split)
        return sum(acc) / len(acc)

    def task_vectors(self) -> list[dict[str, torch.Tensor]]:
        """τ_k = θ_k − θ_pre per tensor."""
        pre = self.pretrained.state_dict()
        return [{k: v - pre[k] for k, v in m.state_dict().items()} for m in self.finetuned]


def load_digit_images(*, val_fraction: float, test_fraction: float, seed: int):
    """The 1797 digit images scaled to [0, 1] as [n, 8, 8], shuffled with ``seed``, split train/val/test."""
    from sklearn.datasets import load_digits  # an optional dependency: the ``eval``/``test`` extras

    x, y = load_digits(return_X_y=True)
    images = torch.as_tensor(x, dtype=torch.float32).reshape(-1, IMAGE_SIDE, IMAGE_SIDE) / 16.0
    labels = torch.as_tensor(y, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(labels)))
    n_val = int(round(val_fraction * len(labels)))
    test, val, train_ = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    return {"train": (images[train_], labels[train_]), "val": (images[val], labels[val]),
            "test": (images[test], labels[test])}


def _features(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return ((images - mean) / std).reshape(len(images), -1)


def make_tasks(config: TaskConfig) -> tuple[list[Task], tuple[torch.Tensor, torch.Tensor]]:
    """The tasks' transformed splits and the pre-training data (the training images under each of
    ``config.pretrain_tasks``' transformations), standardised with one global mean and standard deviation
    (of the upright training pixels), so a transformation of the image is the same transformation of the
    features."""
    unknown = [name for name in (*config.tasks, *config.pretrain_tasks) if name not in TRANSFORMS]
    if unknown:
        from ..errors import ConfigError

        raise ConfigError(f"TaskConfig.tasks: unknown task(s) {unknown}; choose from {sorted(TRANSFORMS)}")
    splits = load_digit_images(val_fraction=config.val_fraction, test_fraction=config.test_fraction,
                               seed=config.seed)
    train_images, train_labels = splits["train"]
    mean, std = float(train_images.mean()), float(train_images.std())
    tasks = []
    for name in config.tasks:
        parts = {}
        for split, (images, labels) in splits.items():
            parts[f"x_{split}"] = _features(TRANSFORMS[name](images), mean, std)
            parts[f"y_{split}"] = labels
        tasks.append(Task(name, **parts))
    x_pre = torch.cat([_features(TRANSFORMS[name](train_images), mean, std) for name in config.pretrain_tasks])
    y_pre = train_labels.repeat(len(config.pretrain_tasks))
    return tasks, (x_pre, y_pre)


def build_tasks(config: TaskConfig = TaskConfig()) -> MultiTaskSetup:
    """Pre-train on ``config.pretrain_tasks``, then fine-tune one copy per task (all seeded from ``config.seed``)."""
    tasks, (x_pre, y_pre) = make_tasks(config)
    pretrained = train(make_mlp(config.hidden, seed=config.seed, n_out=N_CLASSES), x_pre, y_pre,
                       epochs=config.pretrain_epochs, lr=config.lr, seed=config.seed)
    finetuned = [finetune(pretrained, task.x_train, task.y_train, config, seed=config.seed + 1 + k)
                 for k, task in enumerate(tasks)]
    return MultiTaskSetup(config, tasks, pretrained, finetuned, (x_pre, y_pre))


def finetune(pretrained: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TaskConfig, *, seed: int,
             epochs: int | None = None) -> nn.Module:
    """A copy of ``pretrained`` trained briefly on ``(x, y)``."""
    return train(copy.deepcopy(pretrained), x, y, epochs=config.finetune_epochs if epochs is None else epochs,
                 lr=config.lr, seed=seed)


def train_multitask(setup: MultiTaskSetup) -> nn.Module:
    """One copy of the pre-trained model trained on all tasks' training data jointly (the usual upper
    reference of a merging table): the same number of epochs as each fine-tuning, over the union."""
    x = torch.cat([t.x_train for t in setup.tasks])
    y = torch.cat([t.y_train for t in setup.tasks])
    return finetune(setup.pretrained, x, y, setup.config, seed=setup.config.seed + 100)


__all__ = ["MultiTaskSetup", "TRANSFORMS", "Task", "TaskConfig", "build_tasks", "finetune", "load_digit_images",
           "make_tasks", "train_multitask"]
