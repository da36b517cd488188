"""Pruning: importance scores, exact masks (layer/global, N:M, block, structured), the
linear-time global threshold, and sparsity summaries.

Modules, one per idea:
  scores   importance scores (magnitude, Taylor, SNIP, OBD with Fisher/Hutchinson
           Hessian diagonals, neuron entropy)
  masks    make_masks / apply_masks / prune and the magnitude_pruning factory
  kth      exact k-th largest value by radix selection (no sort), global thresholds
  summary  per-layer and total sparsity
"""

from jcompress.pruning import kth, masks, scores, summary
from jcompress.pruning.kth import global_magnitude_masks, global_threshold, keep_top_masks, kth_largest
from jcompress.pruning.masks import PruneAux, apply_masks, erk_densities, magnitude_pruning, make_masks, nm_masks, prune
from jcompress.pruning.summary import format_summary, sparsity_summary

__all__ = [
    "kth",
    "masks",
    "scores",
    "summary",
    "PruneAux",
    "make_masks",
    "apply_masks",
    "prune",
    "magnitude_pruning",
    "erk_densities",
    "nm_masks",
    "kth_largest",
    "keep_top_masks",
    "global_threshold",
    "global_magnitude_masks",
    "sparsity_summary",
    "format_summary",
]
