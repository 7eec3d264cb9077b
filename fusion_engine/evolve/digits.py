"""``fusion-engine evolve --example digits``: search a task-arithmetic recipe on the digits task set.

The evaluation table's setup (:mod:`fusion_engine.bench.tasks`: a pre-trained 64-64-64-10 MLP, four
fine-tunes on rotated / mirrored digits) is saved as safetensors checkpoints (linear layers named
``layers.{i}.weight`` / ``.bias`` so that mergekit gradients run over them) and the template is the
table's task-arithmetic row: every model's weight is the λ the table picks on the validation split. The
search (per-model weights, a gradient of ``points`` values over the three layers) maximises the mean
validation accuracy; the best recipe and the table's row are then compared on the test split.
"""

from __future__ import annotations

import json
import os

import torch

from ..averaging import load_state
from ..bench.evaluate import EvalConfig, deterministic, merge_methods
from ..bench.tasks import TaskConfig, build_tasks
from ..io import atomic_output_dir, save_sharded
from .space import SearchSpace
from .search import evolve

TEMPLATE = """\
# task arithmetic over the digits task set; weights = the evaluation table's λ (chosen on validation)
merge_method: task_arithmetic
base_model: {base}
models:
{models}
dtype: float32
"""


def to_checkpoint_names(state_dict: dict) -> dict:
    """``nn.Sequential`` names (``0.weight``, ``2.weight``, …) -> ``layers.{i}.weight`` per linear layer."""
    linear = sorted({int(k.split(".")[0]) for k in state_dict})
    return {f"layers.{linear.index(int(k.split('.')[0]))}.{k.split('.', 1)[1]}": v for k, v in state_dict.items()}


def from_checkpoint_names(state_dict: dict, model: torch.nn.Sequential) -> dict:
    """The inverse of :func:`to_checkpoint_names` for ``model``'s layout."""
    linear = sorted({int(k.split(".")[0]) for k in model.state_dict()})
    return {f"{linear[int(k.split('.')[1])]}.{k.split('.', 2)[2]}": v for k, v in state_dict.items()}


def save_model(model: torch.nn.Module, folder: str) -> str:
    """``model`` as a safetensors checkpoint folder (replaced if it exists: a rerun rebuilds the same bytes)."""
    state = {k: v.detach().contiguous() for k, v in to_checkpoint_names(model.state_dict()).items()}
    with atomic_output_dir(folder, allow_overwrite=True) as tmp:
        save_sharded(state, tmp)
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            json.dump({"model_type": "digits_mlp", "num_hidden_layers": len(state) // 2}, fh)
    return folder


def run_digits_example(workdir: str, *, generations: int = 30, population: int | None = None, points: int = 3,
                       sigma: float = 0.2, seed: int = 0, device: str = "cpu", resume: bool = False,
                       log=print) -> dict:
    """Build the task set, search, and return the comparison on the test split (accuracies in %)."""
    os.makedirs(workdir, exist_ok=True)
    with deterministic():  # as the evaluation table builds its models and its task-arithmetic row
        setup = build_tasks(TaskConfig(seed=seed))
        table_sd, note = merge_methods(setup, EvalConfig(seed=seed))["Task arithmetic"]()
    lam = float(note.split("=")[1])
    base = save_model(setup.pretrained, os.path.join(workdir, "pretrained"))
    paths = [save_model(m, os.path.join(workdir, t.name)) for m, t in zip(setup.finetuned, setup.tasks)]
    template = TEMPLATE.format(base=base, models="\n".join(f"  - model: {p}\n    parameters: {{weight: {lam}}}"
                                                           for p in paths))
    with open(os.path.join(workdir, "template.yaml"), "w") as fh:
        fh.write(template)
    space = SearchSpace(template, ["weight"], points=points, bounds={"weight": (0.0, 1.5)})

    def evaluate(state_dict) -> float:
        model = load_state(setup.pretrained, from_checkpoint_names(state_dict, setup.pretrained))
        return setup.mean_accuracy(model, split="val")

    result = evolve(space, evaluate, generations=generations, population=population, sigma=sigma, seed=seed,
                    device=device, state_path=os.path.join(workdir, "evolve_state.pkl"), resume=resume,
                    out_path=os.path.join(workdir, "best.yaml"), log=log)
    from .merger import InMemoryMerger

    with InMemoryMerger("cpu") as merger:
        best_sd = from_checkpoint_names(merger.merge(result.best_recipe), setup.pretrained)
    best = setup.accuracies(load_state(setup.pretrained, best_sd))
    table = setup.accuracies(load_state(setup.pretrained, table_sd))
    summary = {"tasks": [t.name for t in setup.tasks], "task_arithmetic": [100 * a for a in table],
               "evolved": [100 * a for a in best], "lambda": lam, "evaluations": result.evaluations,
               "best_val": 100 * result.best_score, "recipe": os.path.join(workdir, "best.yaml")}
    if log:
        avg = lambda accs: sum(accs) / len(accs)  # noqa: E731
        log(f"test accuracy (%), {', '.join(summary['tasks'])}, average:")
        log(f"  task arithmetic (λ={lam:g}, the table's row): "
            + " ".join(f"{a:.1f}" for a in summary["task_arithmetic"]) + f"  avg {avg(summary['task_arithmetic']):.1f}")
        log(f"  evolved recipe ({result.evaluations} recipes):       "
            + " ".join(f"{a:.1f}" for a in summary["evolved"]) + f"  avg {avg(summary['evolved']):.1f}")
        log(f"best recipe: {summary['recipe']} (reproduce: fusion-engine merge {summary['recipe']} OUT)")
    return summary
