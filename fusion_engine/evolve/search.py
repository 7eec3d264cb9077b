"""CMA-ES over merge recipes ("Evolutionary Optimization of Model Merging Recipes", Akiba et al. 2024).

The searched numbers of a merge YAML (:class:`~fusion_engine.evolve.space.SearchSpace`: per-model
weights / densities, optionally per-layer gradients) live in the unit cube. Each generation CMA-ES
(Hansen's ``cma`` package, box-constrained to [0, 1]^D) proposes ``population`` points; each point's
recipe is merged in memory on the device (:class:`~fusion_engine.evolve.merger.InMemoryMerger`) and
scored by the user's evaluation (higher is better; CMA-ES minimises ``−score``). Identical recipes (after
rounding) are scored once.

After every generation the search state (the CMA-ES object, numpy's generator, which ``cma`` draws
from, the scores so far) is written atomically to ``state_path``; ``resume=True`` continues from it, and a
resumed search makes the same proposals as an uninterrupted one. The best recipe so far is printed and
written (atomically) to ``out_path`` as a YAML that ``fusion-engine merge`` reproduces bit for bit.
"""

from __future__ import annotations

import os
import pickle
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import ConfigError
from ..io.writer import write_file_synced
from .evaluation import score_of
from .merger import InMemoryMerger
from .space import SearchSpace

STATE_VERSION = 1


@dataclass
class EvolveResult:
    """The best recipe found, its score, and the search's history (one row per generation)."""

    best_recipe: str
    best_score: float
    best_point: list[float]
    generations: int
    evaluations: int
    history: list[dict] = field(default_factory=list)


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    write_file_synced(tmp, data)
    os.replace(tmp, path)


def recipe_file_text(recipe: str, score: float, evaluations: int) -> str:
    return f"# fusion-engine evolve: best score {score:.6g} after {evaluations} evaluations\n{recipe}"


def evolve(space: SearchSpace, evaluate: Callable | None = None, *, evaluate_recipe: Callable[[str], float] | None = None,
           generations: int = 20, population: int | None = None, sigma: float = 0.2, seed: int = 0,
           device: str = "cpu", state_path: str | None = None, resume: bool = False, out_path: str | None = None,
           log: Callable[[str], None] | None = print) -> EvolveResult:
    """Search ``space`` for ``generations`` generations of CMA-ES; return the best recipe.

    ``evaluate(state_dict) -> float`` scores a candidate merged in memory on ``device``;
    ``evaluate_recipe(yaml_text) -> float`` scores the recipe itself (e.g. a command on a written
    checkpoint). Exactly one of the two is given. ``population`` defaults to CMA-ES's ``4 + ⌊3 ln D⌋``.
    """
    import cma

    if (evaluate is None) == (evaluate_recipe is None):
        raise ConfigError("give exactly one of evaluate (a state-dict scorer) and evaluate_recipe (a recipe scorer)")
    if generations < 1 or (population is not None and population < 2) or not sigma > 0:
        raise ConfigError(f"generations must be >= 1, population >= 2 and sigma > 0 (got {generations}, "
                          f"{population}, {sigma})")
    signature = {"template": space.text, "coordinates": space.coordinates, "digits": space.digits}
    state = None
    if resume and state_path and os.path.exists(state_path):
        with open(state_path, "rb") as fh:
            state = pickle.load(fh)
        if state.get("version") != STATE_VERSION or state.get("signature") != signature:
            raise ConfigError(f"{state_path}: the saved search is over a different template or search space; "
                              f"remove it or drop --resume")
        np.random.set_state(state["numpy"])
    else:
        options = {"bounds": [0.0, 1.0], "seed": seed + 1, "verbose": -9}
        if population is not None:
            options["popsize"] = population
        state = {"version": STATE_VERSION, "signature": signature,
                 "es": cma.CMAEvolutionStrategy(space.initial_point(), sigma, options),
                 "generation": 0, "scores": {}, "best": None, "history": []}
    es, scores = state["es"], state["scores"]

    with InMemoryMerger(device) as merger:
        def score(recipe: str) -> float:
            if recipe not in scores:
                if evaluate_recipe is not None:
                    scores[recipe] = score_of(evaluate_recipe(recipe), "the evaluation")
                else:
                    merged = merger.merge(recipe, f"a candidate recipe of {space.filename}")
                    scores[recipe] = score_of(evaluate(merged), "the evaluation")
            return scores[recipe]

        if state["best"] is None:  # the template's own values first: the search starts from a known score
            x0 = space.initial_point()
            recipe = space.recipe(x0)
            state["best"] = (score(recipe), recipe, x0)
        while state["generation"] < generations:
            start = time.perf_counter()
            points = es.ask()
            values = []
            for x in points:
                recipe = space.recipe(x)
                s = score(recipe)
                values.append(-s)
                if s > state["best"][0]:
                    state["best"] = (s, recipe, [float(v) for v in x])
            es.tell(points, values)
            state["generation"] += 1
            row = {"generation": state["generation"], "evaluations": len(scores), "best_of_generation": -min(values),
                   "best": state["best"][0], "seconds": time.perf_counter() - start}
            state["history"].append(row)
            state["numpy"] = np.random.get_state()
            if state_path:
                _atomic_write(state_path, pickle.dumps(state))
            if out_path:
                _atomic_write(out_path, recipe_file_text(state["best"][1], state["best"][0], len(scores)).encode())
            if log:
                log(f"generation {row['generation']}/{generations}: {row['evaluations']} recipes scored, best of "
                    f"generation {row['best_of_generation']:.6g}, best so far {row['best']:.6g} "
                    f"({space.describe(state['best'][2])}) [{row['seconds']:.2f} s]")
    best_score, best_recipe, best_x = state["best"]
    return EvolveResult(best_recipe, best_score, best_x, state["generation"], len(scores), state["history"])
