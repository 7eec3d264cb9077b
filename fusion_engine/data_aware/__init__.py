"""Data-aware fusion: Fisher estimation and merging, RegMean (and RegMean++), AdaMerging (issue 5).

    fisher = [estimate_fisher(m, batches) for m, batches in zip(models, task_batches)]
    merged = fisher_merge_models(models, fisher)
    merged = regmean_merge(models, [collect_gram(m, b) for m, b in zip(models, task_batches)])
    result = adamerging(pretrained, models, unlabeled_batches, mode="layer")
"""

from .adamerging import AdaMergingResult, adamerging, merge_with_coefficients
from .fisher import estimate_fisher, fisher_merge_models
from .regmean import collect_gram, regmean_merge

__all__ = ["AdaMergingResult", "adamerging", "collect_gram", "estimate_fisher", "fisher_merge_models",
           "merge_with_coefficients", "regmean_merge"]
