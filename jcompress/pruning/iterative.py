"""Iterative pruning with undo: prune a step, evaluate, keep the step only if it is good.

The loop (after Han et al. 2015, who found that pruning in several steps with
retraining in between reaches higher sparsity than pruning once):

1. raise the sparsity by ``step`` (magnitude masks of the current weights; weights pruned
   earlier stay pruned), optionally fine-tune with the new masks;
2. evaluate; if the metric dropped more than ``tolerance`` below the *starting* value,
   undo the step (the params and masks go back to the last accepted ones) and halve
   ``step``;
3. repeat until the target sparsity is reached, or the step falls below ``min_step``.

The user's functions do the work: ``eval_fn(params) -> float or dict`` (higher is
better; pass ``-loss`` for a loss) and ``finetune_fn(params, masks) -> params``. Whether
a step is kept is a choice, so ``eval_fn`` should read the validation split; measure the
test split once, on the result.

Example:
  >>> ev = lambda p: train.evaluate(fn.apply, p, fn.extra, ds.x_val, ds.y_val)['accuracy']
  >>> res = iterative_pruning(fn.params, eval_fn=ev, target_sparsity=0.9, step=0.2, tolerance=0.01)
  >>> res.sparsity, res.reached_target, res.history[-1]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jcompress.core.base import default_leaves
from jcompress.core.patterns import NM, Pattern, Unstructured
from jcompress.pruning import masks as masks_lib
from jcompress.pruning import scores as scores_lib
from jcompress.pruning.optim import as_mask_tree
from jcompress.pruning.schedules import check_sparsity

__all__ = ["IterativeResult", "iterative_pruning"]

PyTree = Any


class IterativeResult(NamedTuple):
    """What :func:`iterative_pruning` returns.

    Attributes:
      params: the last accepted params (masked).
      masks: their masks (params structure, True = kept).
      sparsity: the last accepted sparsity.
      reached_target: whether ``sparsity == target_sparsity``.
      baseline: the metric of the starting params.
      history: one dict per attempt: ``attempt``, ``sparsity`` tried, ``step``,
        ``metric``, ``drop`` (baseline - metric), ``accepted``.
    """

    params: PyTree
    masks: PyTree
    sparsity: float
    reached_target: bool
    baseline: float
    history: list


def _metric(value: Any, key: str) -> float:
    if isinstance(value, dict):
        if key not in value:
            raise ValueError(f"eval_fn returned a dict without {key!r} (keys: {sorted(value)}); pass metric=")
        value = value[key]
    out = float(value)
    if math.isnan(out):
        raise ValueError("eval_fn returned NaN")
    return out


def iterative_pruning(
    params: PyTree,
    *,
    eval_fn: Callable[[PyTree], Any],
    target_sparsity: float,
    step: float = 0.1,
    tolerance: float = 0.01,
    finetune_fn: Callable[[PyTree, PyTree], PyTree] | None = None,
    min_step: float = 0.01,
    metric: str = "accuracy",
    scope: str = "layer",
    pattern: Pattern = Unstructured(),
    masks: PyTree | None = None,
    start_sparsity: float = 0.0,
) -> IterativeResult:
    """Raise magnitude sparsity step by step, undoing steps that cost more than ``tolerance``.

    Args:
      params: starting params (dict or NNX State).
      eval_fn: ``eval_fn(params) -> float`` or a dict holding ``metric``; higher is better
        (on validation data: it decides which steps are kept).
      target_sparsity: the sparsity to reach, in ``[0, 1)``.
      step: the first sparsity increment (halved after each undone step).
      tolerance: the largest allowed drop of the metric below its value on ``params``.
      finetune_fn: optional ``finetune_fn(params, masks) -> params`` run after each
        pruning step, before evaluation (the masks are re-applied to its result).
      min_step: stop, short of the target, when the step falls below this.
      metric: the key to read when ``eval_fn`` returns a dict.
      scope: ``'layer'`` (every leaf at the same sparsity) or ``'global'``.
      pattern: what is removed together: ``Unstructured()``, ``Block(...)`` or
        ``Units()`` (``NM`` fixes the sparsity, so it cannot be raised step by step).
        The Dense and conv kernels are pruned.
      masks, start_sparsity: resume from these masks at this sparsity.

    Returns:
      :class:`IterativeResult`.

    Raises:
      ValueError: sparsities outside ``[0, 1)``, ``step`` or ``min_step`` not positive,
        ``start_sparsity > target_sparsity``, NaN metrics.
    """
    target = check_sparsity(target_sparsity, "target_sparsity")
    current = check_sparsity(start_sparsity, "start_sparsity")
    if current > target:
        raise ValueError(f"start_sparsity={current} is above target_sparsity={target}")
    if not (isinstance(step, (int, float)) and step > 0 and isinstance(min_step, (int, float)) and min_step > 0):
        raise ValueError(f"step={step!r} and min_step={min_step!r} must be positive floats")
    if not tolerance >= 0:
        raise ValueError(f"tolerance={tolerance!r} must be >= 0")
    if isinstance(pattern, NM):
        raise TypeError(f"pattern={pattern} fixes the sparsity; iterative pruning needs Unstructured, Block or Units")
    names = default_leaves(params)
    if masks is None:
        masks = jax.tree.map(lambda x: jnp.ones(jnp.shape(x), bool), params)
    masks = as_mask_tree(params, masks)
    params = masks_lib.apply_masks(params, masks)
    baseline = _metric(eval_fn(params), metric)
    history: list = []
    attempt = 0
    while current < target and step >= min_step:
        trial = min(current + step, target)
        trial_masks = masks_lib.make_masks(
            scores_lib.magnitude_scores(params, names=names),
            names,
            sparsity=trial,
            pattern=pattern,
            scope=scope,
            existing=masks,
        )
        candidate = masks_lib.apply_masks(params, trial_masks)
        if finetune_fn is not None:
            candidate = masks_lib.apply_masks(finetune_fn(candidate, trial_masks), trial_masks)
        value = _metric(eval_fn(candidate), metric)
        accepted = baseline - value <= tolerance
        history.append(
            {
                "attempt": attempt,
                "sparsity": trial,
                "step": step,
                "metric": value,
                "drop": baseline - value,
                "accepted": accepted,
            }
        )
        attempt += 1
        if accepted:
            params, masks, current = candidate, trial_masks, trial
        else:
            step = step / 2
    return IterativeResult(params, masks, current, current >= target, baseline, history)
