"""Pruning: importance scores, exact masks (layer/global, N:M, block, structured), the
linear-time global threshold, training with sparsity, and hard pruning.

Modules, one per idea:
  scores   importance scores (magnitude, Taylor, SNIP, OBD with Fisher/Hutchinson
           Hessian diagonals, neuron entropy)
  masks    make_masks / apply_masks / prune and the magnitude_pruning factory
  summary  per-layer and total sparsity
  schedules  sparsity as a function of the step (Zhu-Gupta cubic, linear, one-shot)
  optim    optax transforms: keep_masked, l1 / l2, gradual_pruning, soft_filter_pruning
  dynamic  RigL and SET dynamic sparse training
  lottery  iterative magnitude pruning with rewinding (lottery tickets) and its controls
  iterative  prune, evaluate, undo when accuracy drops, repeat
  surgery  hard pruning: physically remove neurons / channels / filters
Training-time pruning (schedules, optim, dynamic, lottery, iterative, surgery) builds on
these; import those submodules directly (``from jcompress.pruning import optim``).
"""

from jcompress.pruning import dynamic, iterative, lottery, masks, optim, schedules, scores, summary, surgery
from jcompress.pruning.dynamic import rigl, sparse_evolutionary
from jcompress.pruning.iterative import iterative_pruning
from jcompress.pruning.lottery import find_ticket, prune_round, rewind, snapshot
from jcompress.pruning.optim import find_masks, gradual_pruning, keep_masked, l1, l2, soft_filter_pruning
from jcompress.pruning.surgery import complete_masks, hard_prune, hard_prune_report, unit_masks
from jcompress.pruning.masks import PruneAux, apply_masks, erk_densities, magnitude_pruning, make_masks, nm_masks, prune
from jcompress.pruning.summary import format_summary, sparsity_summary

__all__ = [
    "dynamic",
    "iterative",
    "lottery",
    "optim",
    "schedules",
    "surgery",
    "rigl",
    "sparse_evolutionary",
    "iterative_pruning",
    "find_ticket",
    "prune_round",
    "rewind",
    "snapshot",
    "find_masks",
    "gradual_pruning",
    "keep_masked",
    "l1",
    "l2",
    "soft_filter_pruning",
    "complete_masks",
    "hard_prune",
    "hard_prune_report",
    "unit_masks",
    "PruneAux",
    "apply_masks",
    "erk_densities",
    "format_summary",
    "magnitude_pruning",
    "make_masks",
    "masks",
    "nm_masks",
    "prune",
    "scores",
    "sparsity_summary",
    "summary",
]
