"""Data-aware fusion: Fisher estimation and merging, RegMean (and RegMean++), AdaMerging (issue 5).

    fisher = [estimate_fisher(m, batches) for m, batches in zip(models, task_batches)]
    merged = fisher_merge_models(models, fisher)
    merged = regmean_merge(models, [collect_gram(m, b) for m, b in zip(models, task_batches)])
    result = adamerging(pretrained, models, unlabeled_batches, mode="layer")
"""

from .._lazy import lazy_exports

# public name -> the module defining it, imported on first access (the command line stays light)
__getattr__, __dir__ = lazy_exports(__name__, {
    "AdaMergingResult": ".adamerging", "adamerging": ".adamerging", "merge_with_coefficients": ".adamerging",
    "estimate_fisher": ".fisher", "fisher_merge_models": ".fisher", "collect_gram": ".regmean",
    "regmean_merge": ".regmean",
})

__all__ = ["AdaMergingResult", "adamerging", "collect_gram", "estimate_fisher", "fisher_merge_models",
           "merge_with_coefficients", "regmean_merge"]
