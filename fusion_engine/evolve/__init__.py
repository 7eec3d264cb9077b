"""Evolutionary search of merge recipes (CMA-ES over a merge YAML's weights, densities and gradients).

* :class:`SearchSpace` — which numbers of a template YAML are searched, and their bounds.
* :func:`evolve` — the search: in-memory merges, a user evaluation, resumable state, the best YAML.
* :class:`InMemoryMerger` — a recipe merged on the device without writing, equal to ``fusion-engine merge``.
* :func:`run_digits_example` — ``fusion-engine evolve --example digits``.
"""

from .._lazy import lazy_exports

# public name -> the module defining it, imported on first access (the command line stays light)
__getattr__, __dir__ = lazy_exports(__name__, {
    "run_digits_example": ".digits", "EvaluationError": ".evaluation", "command_evaluation": ".evaluation",
    "load_callable": ".evaluation", "InMemoryMerger": ".merger", "EvolveResult": ".search", "evolve": ".search",
    "SearchSpace": ".space",
})

__all__ = ["EvaluationError", "EvolveResult", "InMemoryMerger", "SearchSpace", "command_evaluation", "evolve",
           "load_callable", "run_digits_example"]
