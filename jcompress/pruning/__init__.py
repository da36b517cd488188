"""Pruning: importance scores, exact masks (layer/global, N:M, block, structured), the
linear-time global threshold, and sparsity summaries.

Modules, one per idea:
  scores   importance scores (magnitude, Taylor, SNIP, OBD with Fisher/Hutchinson
           Hessian diagonals, neuron entropy)
  masks    make_masks / apply_masks / prune and the magnitude_pruning factory
  kth      exact k-th largest value by radix selection (no sort), global thresholds
  summary  per-layer and total sparsity
Training-time pruning (schedules, optim, dynamic, lottery, iterative, surgery) builds on
these; import those submodules directly (``from jcompress.pruning import optim``).
"""

from jcompress.pruning import kth, masks, scores, summary
from jcompress.pruning.kth import global_magnitude_masks, global_threshold, keep_top_masks, kth_largest, pruned_count
from jcompress.pruning.masks import PruneAux, apply_masks, erk_densities, magnitude_pruning, make_masks, nm_masks, prune
from jcompress.pruning.summary import format_summary, sparsity_summary

__all__ = [
    "PruneAux",
    "apply_masks",
    "erk_densities",
    "format_summary",
    "global_magnitude_masks",
    "global_threshold",
    "keep_top_masks",
    "kth",
    "kth_largest",
    "magnitude_pruning",
    "make_masks",
    "masks",
    "nm_masks",
    "prune",
    "pruned_count",
    "scores",
    "sparsity_summary",
    "summary",
]
