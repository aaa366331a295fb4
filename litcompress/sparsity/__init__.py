"""Sparsity in pure torch: masks, importance scores, the `Pruner` that enforces them and the `MaskPruner` protocol
every pruner implements."""

from litcompress.sparsity.importance import IMPORTANCES, accumulate_, magnitude, random_scores
from litcompress.sparsity.masks import check_nm, global_masks, nm_mask, parse_nm, unstructured_mask
from litcompress.sparsity.protocol import MaskPruner
from litcompress.sparsity.pruner import Pruner, default_scope

__all__ = [
    "IMPORTANCES",
    "MaskPruner",
    "Pruner",
    "accumulate_",
    "check_nm",
    "default_scope",
    "global_masks",
    "magnitude",
    "nm_mask",
    "parse_nm",
    "random_scores",
    "unstructured_mask",
]
