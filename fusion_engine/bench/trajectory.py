"""Rows of the digits table for training-time averaging along one multi-task training run.

Each row trains the pre-trained model on the union of the tasks' training data — the "Multi-task
trained" row's run: same data, seed, epochs and Adam learning rate — and averages along the way
(:mod:`fusion_engine.trajectory_averaging`):

* **LAWA**: the average of the k latest epoch-end checkpoints of that very run;
* **SWAG**: moments and deviations of the last epochs of that run; the row is the Bayesian model average
  of S sampled models;
* **Lookahead**: the same run with Adam wrapped in Lookahead;
* **Snapshot ensemble**: the same budget under M cosine cycles (peak ``snapshot_lr_max``), one model
  collected per cycle, their logits averaged;
* **FGE**: from the multi-task model, ``fge_cycles`` extra epoch-long triangular cycles (the rate falls
  from the run's rate to 1/100 of it at mid-cycle, where a model is collected), logits averaged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..averaging import load_state
from ..trajectory_averaging import SWAG, CyclicSnapshots, LatestWeightAverage, Lookahead, bayesian_model_average
from .digits import train
from .tasks import MultiTaskSetup


@dataclass(frozen=True)
class TrajectoryConfig:
    """Hyper-parameters of the training-time averaging rows."""

    lawa_k: int = 5
    swag_epochs: int = 5          # collect at the end of the last swag_epochs epochs
    swag_rank: int = 5
    swag_samples: int = 16
    lookahead_k: int = 5
    lookahead_alpha: float = 0.5
    snapshot_cycles: int = 5
    snapshot_lr_max: float = 3e-3
    fge_cycles: int = 4


def _multitask_run(setup: MultiTaskSetup, **hooks) -> nn.Module:
    """The "Multi-task trained" run (see :func:`~fusion_engine.bench.tasks.train_multitask`), with hooks."""
    c = setup.config
    x = torch.cat([t.x_train for t in setup.tasks])
    y = torch.cat([t.y_train for t in setup.tasks])
    return train(copy.deepcopy(setup.pretrained), x, y, epochs=c.finetune_epochs, lr=c.lr, seed=c.seed + 100,
                 **hooks)


def trajectory_methods(setup: MultiTaskSetup, config: TrajectoryConfig = TrajectoryConfig()
                       ) -> dict[str, Callable[[], tuple[nn.Module, str]]]:
    """Row name → a function training and averaging, returning the model to evaluate and a note."""
    epochs, lr = setup.config.finetune_epochs, setup.config.lr
    steps_per_epoch = -(-sum(len(t.y_train) for t in setup.tasks) // 64)

    def lawa():
        avg = LatestWeightAverage(config.lawa_k)
        model = _multitask_run(setup, after_epoch=avg.update)
        return load_state(model, avg.state_dict()), f"k={config.lawa_k} latest epoch-end checkpoints"

    def swag():
        posterior, epoch = SWAG(max_rank=config.swag_rank), [0]

        def collect(model):
            epoch[0] += 1
            if epoch[0] > epochs - config.swag_epochs:
                posterior.collect(model)

        model = _multitask_run(setup, after_epoch=collect)
        g = torch.Generator().manual_seed(setup.config.seed)
        samples = [load_state(model, posterior.sample(generator=g)) for _ in range(config.swag_samples)]
        return bayesian_model_average(samples), (f"BMA of {config.swag_samples} samples, last {config.swag_epochs} "
                                                 f"epochs, rank {config.swag_rank}")

    def lookahead():
        model = _multitask_run(setup, optimizer=lambda opt: Lookahead(opt, config.lookahead_k,
                                                                       config.lookahead_alpha))
        return model, f"Adam inside, k={config.lookahead_k}, α={config.lookahead_alpha:g}"

    def snapshots():
        holder = []

        def cyclic(opt):
            holder.append(CyclicSnapshots.snapshot_ensemble(opt, total_steps=epochs * steps_per_epoch,
                                                            cycles=config.snapshot_cycles,
                                                            lr_max=config.snapshot_lr_max))
            return opt

        model = _multitask_run(setup, optimizer=cyclic, after_step=lambda m, opt: holder[0].step(m))
        return holder[0].ensemble(model), (f"M={config.snapshot_cycles} cosine cycles, peak lr "
                                           f"{config.snapshot_lr_max:g}, {config.snapshot_cycles}× the inference cost")

    def fge():
        start = _multitask_run(setup)
        holder = []
        cycle = steps_per_epoch + steps_per_epoch % 2  # even: the model is collected at mid-cycle

        def cyclic(opt):
            holder.append(CyclicSnapshots.fast_geometric(opt, cycle_length=cycle, lr_high=lr, lr_low=lr / 100))
            return opt

        x = torch.cat([t.x_train for t in setup.tasks])
        y = torch.cat([t.y_train for t in setup.tasks])
        model = train(start, x, y, epochs=config.fge_cycles, lr=lr, seed=setup.config.seed + 101, optimizer=cyclic,
                      after_step=lambda m, opt: holder[0].step(m))
        return holder[0].ensemble(model), (f"{config.fge_cycles} extra epoch-long cycles from the multi-task model, "
                                           f"{len(holder[0].snapshots)}× the inference cost")

    return {"LAWA (multi-task run)": lawa, "SWAG (multi-task run)": swag, "Lookahead (multi-task run)": lookahead,
            "Snapshot ensemble (multi-task run)": snapshots, "FGE (multi-task run)": fge}


__all__ = ["TrajectoryConfig", "trajectory_methods"]
