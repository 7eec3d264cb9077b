"""Evolutionary search of merge recipes (CMA-ES over a merge YAML's weights, densities and gradients).

* :class:`SearchSpace` — which numbers of a template YAML are searched, and their bounds.
* :func:`evolve` — the search: in-memory merges, a user evaluation, resumable state, the best YAML.
* :class:`InMemoryMerger` — a recipe merged on the device without writing, equal to ``fusion-engine merge``.
* :func:`run_digits_example` — ``fusion-engine evolve --example digits``.
"""

from .digits import run_digits_example
from .evaluation import EvaluationError, command_evaluation, load_callable
from .merger import InMemoryMerger
from .search import EvolveResult, evolve
from .space import SearchSpace

__all__ = ["EvaluationError", "EvolveResult", "InMemoryMerger", "SearchSpace", "command_evaluation", "evolve",
           "load_callable", "run_digits_example"]
