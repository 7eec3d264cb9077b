"""Alignment: permutation specs, weight/activation matching, OT fusion, ZipIt (issue 3).

Networks with permuted hidden units compute the same function; aligning two networks' units before
averaging removes most of the loss barrier between them.

* :class:`PermutationSpec` and its builders say which parameter axes each permutation acts on;
  :func:`apply_permutation` relabels a state dict.
* :func:`weight_matching` (Git Re-Basin) and :func:`activation_matching` find permutations.
* :func:`ot_fusion` (OTFusion) fuses layer-wise with optimal transport, hard or soft.
* :func:`zipit` merges features within and across models, fully or up to a chosen layer.
* :func:`sinkhorn_rebasin` (Peña et al.) and :func:`ste_rebasin` (Git Re-Basin's straight-through
  estimator) learn permutations by gradient descent on a merge objective.
* :func:`weight_matching_many` / :func:`activation_matching_many` (MergeMany) align K models to a
  shared universe.
* :func:`repair` (REPAIR) restores per-channel statistics after an aligned interpolation.
* :func:`align_and_merge` aligns B to A and interpolates, in one call.
"""

from .activation_matching import UnitStatistics, activation_matching, unit_statistics
from .builders import (
    infer_permutation_spec,
    mlp_permutation_spec,
    resnet_permutation_spec,
    sequential_permutation_spec,
    transformer_permutation_spec,
    vgg_permutation_spec,
)
from .learned import sinkhorn_rebasin, ste_rebasin
from .many import activation_matching_many, weight_matching_many
from .merge import align_and_merge, interpolate, interpolate_many, reset_batchnorm
from .ot_fusion import ot_fusion
from .repair import repair
from .spec import AxisSlot, PermutationSpec, apply_permutation
from .weight_matching import weight_matching
from .zipit import PartialZip, greedy_feature_matching, merge_unmerge, zipit

__all__ = [
    "AxisSlot", "PartialZip", "PermutationSpec", "UnitStatistics", "activation_matching", "activation_matching_many",
    "align_and_merge", "interpolate_many", "weight_matching_many",
    "apply_permutation", "greedy_feature_matching", "infer_permutation_spec", "interpolate", "merge_unmerge",
    "mlp_permutation_spec", "ot_fusion", "repair", "reset_batchnorm", "resnet_permutation_spec",
    "sequential_permutation_spec", "sinkhorn_rebasin", "ste_rebasin", "transformer_permutation_spec",
    "unit_statistics", "vgg_permutation_spec",
    "weight_matching", "zipit",
]
