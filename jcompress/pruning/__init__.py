"""Pruning: transforms with exact counts (layer/global, ERK, N:M, block, units), importance
scores, and training with sparsity.

The transforms ``magnitude``, ``random``, ``taylor(grads)``, ``snip(loss_fn, batch)``,
``obd(hessian_diag)`` and ``by_scores(scores)`` each take ``sparsity=``, ``pattern=``,
``scope=`` and ``distribution=`` and return ``(params, MaskAux)``:

  >>> params, aux = jc.pruning.magnitude(sparsity=0.9, scope='global')(params)

Modules, one per idea:
  masks    the pruning transforms, make_masks / apply_masks, ERK densities
  scores   importance scores (magnitude, Taylor, SNIP, OBD with Fisher/Hutchinson
           Hessian diagonals, neuron entropy)
  summary  per-layer and total sparsity
  schedules  sparsity as a function of the step (Zhu-Gupta cubic, linear, one-shot)
  optim    optax transforms: keep_masked, l1 / l2, gradual_pruning, soft_filter_pruning
  dynamic  RigL and SET dynamic sparse training
  lottery  iterative magnitude pruning with rewinding (lottery tickets) and its controls
  iterative  prune, evaluate, undo when accuracy drops, repeat
Training-time pruning (schedules, optim, dynamic, lottery, iterative) builds on
these; import those submodules directly (``from jcompress.pruning import optim``).
"""

from jcompress.pruning import dynamic, iterative, lottery, masks, optim, schedules, scores, summary
from jcompress.pruning.dynamic import rigl, sparse_evolutionary
from jcompress.pruning.iterative import iterative_pruning
from jcompress.pruning.lottery import find_ticket, prune_round, rewind, snapshot
from jcompress.pruning.masks import (
    apply_masks,
    by_scores,
    erk_densities,
    magnitude,
    make_masks,
    obd,
    random,
    snip,
    taylor,
)
from jcompress.pruning.optim import find_masks, gradual_pruning, keep_masked, l1, l2, soft_filter_pruning
from jcompress.pruning.summary import format_summary, sparsity_summary

__all__ = [
    "apply_masks",
    "by_scores",
    "dynamic",
    "erk_densities",
    "find_masks",
    "find_ticket",
    "format_summary",
    "gradual_pruning",
    "iterative",
    "iterative_pruning",
    "keep_masked",
    "l1",
    "l2",
    "lottery",
    "magnitude",
    "make_masks",
    "masks",
    "obd",
    "optim",
    "prune_round",
    "random",
    "rewind",
    "rigl",
    "schedules",
    "scores",
    "snapshot",
    "snip",
    "soft_filter_pruning",
    "sparse_evolutionary",
    "sparsity_summary",
    "summary",
    "taylor",
]
