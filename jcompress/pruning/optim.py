"""Training with sparsity: optax transformations that keep, grow and schedule masks.

Everything here is an ``optax.GradientTransformation``, so it composes with
``optax.chain``, lives in the optimizer state (and so is checkpointed and sharded with
it) and works under ``jax.jit``.

* :func:`keep_masked` holds a fixed mask tree and zeroes the updates of pruned weights,
  so weights that are zero stay exactly zero with any optimizer. Put it *last* in the
  chain: Adam's weight decay and momentum would otherwise move them again.
* :func:`l1` and :func:`l2` add the (sub)gradient of ``lambda |w|`` or
  ``lambda w^2 / 2`` to the kernels' gradients. Put them *first*, before the
  optimizer, so they act on the loss (Han et al. 2015 train with L1/L2 before pruning).
* :func:`gradual_pruning` is Zhu & Gupta (2017): every ``frequency`` steps from
  ``begin_step`` to ``end_step`` the magnitude masks are recomputed inside ``update``
  for the sparsity of the cubic schedule (:mod:`jcompress.pruning.schedules`), the newly
  pruned weights are set to exactly zero and masked weights get no update.
  With ``regrow=True`` and ``pattern=Units()`` it is soft filter pruning (He et al.
  2018): the filters with the smallest L2 norm are zeroed at every pruning step but keep
  receiving updates until the next one, so a pruned filter can grow back.
* :func:`find_masks` reads the current masks out of any optimizer state that contains
  one of these transformations.

Which leaves: the Dense and conv kernels (:func:`jcompress.core.base.default_leaves`)
of the tree the transformation is given. To act on fewer leaves wrap it in
``optax.masked(tx, jc.core.spec.selection_tree(spec))``: the leaves outside the
selection are hidden from it and pass through unchanged.

Counting is exact: a leaf of ``n`` units (entries, or output filters for :class:`Units`) asked for sparsity ``s`` has exactly ``round(s * n)`` of them pruned
(:func:`jcompress.core.topk.pruned_count`); ties are broken as in :mod:`jcompress.pruning.masks` (the lower
flat index is pruned first). Because the sparsity of a step is only known inside the
traced ``update``, masks there are computed by :func:`jcompress.core.topk.keep_largest`, which
takes a traced count.

Example:
  >>> tx = optax.chain(optax.adamw(1e-3, weight_decay=1e-4),
  ...                  gradual_pruning(final_sparsity=0.9, begin_step=0, end_step=1000, frequency=100))
  >>> result = train.fit(fn.apply, fn.params, fn.extra, ds, tx=tx, epochs=10)
  >>> masks = find_masks(result.state.opt_state)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jcompress import tree as jtree
from jcompress.core.base import default_leaves
from jcompress.core.patterns import Pattern, Units, Unstructured, check_pattern
from jcompress.core.topk import keep_largest
from jcompress.pruning import schedules as schedules_lib

__all__ = [
    "GradualPruningState",
    "KeepMaskedState",
    "as_mask_tree",
    "find_masks",
    "gradual_pruning",
    "keep_masked",
    "l1",
    "l2",
    "soft_filter_pruning",
]

PyTree = Any


# ----------------------------------------------------------------------------- helpers


def as_mask_tree(params: PyTree, masks: PyTree, arg: str = "masks") -> PyTree:
    """``masks`` rearranged into the structure of ``params`` (e.g. a pure dict into an NNX State).

    Leaves are matched by name; every mask must be bool with its leaf's shape.

    Raises:
      ValueError: names differ (listing them), a mask is not bool or has the wrong shape.
    """
    jtree.check_same_structure(params, masks, "params", arg)
    shapes = {n: jnp.shape(x) for n, x in jtree.named_leaves(params)}
    for name, m in jtree.named_leaves(masks):
        dtype = getattr(m, "dtype", None)
        if dtype is None or jnp.dtype(dtype) != jnp.bool_:
            raise ValueError(f"{arg}/{name} has dtype {dtype}; masks must be bool arrays (True = keep)")
        if jnp.shape(m) != shapes[name]:
            raise ValueError(f"{arg}/{name} has shape {jnp.shape(m)} but params/{name} has shape {shapes[name]}")
    return jtree.from_pure_dict(params, masks)


def _need_params(params, who: str):
    if params is None:
        raise ValueError(f"{who} needs the current params: call tx.update(updates, state, params)")


def _selected(params: PyTree) -> list[str]:
    return default_leaves(params)


def _zero_pruned(updates: PyTree, masks: PyTree, params: PyTree) -> PyTree:
    """``where(mask, u, -w)``: kept weights take their update, pruned ones go to exactly 0."""
    return jax.tree.map(lambda u, m, p: jnp.where(m, u, -p).astype(u.dtype), updates, masks, params)


# ----------------------------------------------------------------------------- fixed masks


class KeepMaskedState(NamedTuple):
    """State of :func:`keep_masked`: the bool mask tree (params structure, True = keep)."""

    masks: PyTree


def keep_masked(masks: PyTree) -> optax.GradientTransformation:
    """Zero the updates of pruned weights so they stay exactly zero during training.

    ``update`` returns ``where(mask, update, 0)`` leaf by leaf. Applied last in a chain
    (after Adam, weight decay, clipping, ...), the final update of a pruned weight is 0,
    so a weight that is 0 stays exactly 0 through any number of steps. Applied first, it
    zeroes the gradients instead (the optimizer's moments of pruned weights stay 0); both
    positions may be used together.

    Args:
      masks: bool tree with the structure of the params (a pure dict is accepted for
        an NNX State; leaves are matched by name). True = keep. Prune the params with
        ``apply_masks(params, masks)`` before training: this transformation only keeps
        zeros, it does not create them.

    Returns:
      an optax GradientTransformation whose state is ``KeepMaskedState(masks)``.

    Example:
      >>> params = apply_masks(params, masks)
      >>> tx = optax.chain(optax.adamw(1e-3, weight_decay=1e-4), keep_masked(masks))
    """

    def init(params):
        return KeepMaskedState(as_mask_tree(params, masks))

    def update(updates, state, params=None):
        del params
        jtree.check_same_structure(updates, state.masks, "updates", "masks")
        new = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros((), u.dtype)), updates, state.masks)
        return new, state

    return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------- regularisers


def _check_strength(strength: float, who: str) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not strength >= 0:
        raise ValueError(f"{who}: strength={strength!r} must be a float >= 0")
    return float(strength)


def _regulariser(strength: float, grad: Callable, who: str) -> optax.GradientTransformation:
    strength = _check_strength(strength, who)

    def update(updates, state, params=None):
        _need_params(params, who)
        picked = set(_selected(params))
        new = jtree.map_with_names(
            lambda n, u, w: (u + strength * grad(w)).astype(u.dtype) if n in picked else u, updates, params
        )
        return new, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def l1(strength: float) -> optax.GradientTransformation:
    """Add ``strength * sign(w)``, the subgradient of ``strength * |w|``, to the kernels.

    Args:
      strength: ``lambda >= 0``.

    Put it before the optimizer: ``optax.chain(l1(1e-5), optax.sgd(0.1))``. At ``w = 0``
    the subgradient used is 0, so pruned weights stay at 0. Only some kernels:
    ``optax.masked(l1(1e-5), jc.core.spec.selection_tree(r'fc1/kernel'))``.
    """
    return _regulariser(strength, jnp.sign, "l1")


def l2(strength: float) -> optax.GradientTransformation:
    """Add ``strength * w``, the gradient of ``strength * w^2 / 2``, to the kernels.

    Unlike ``optax.add_decayed_weights`` it leaves biases and norm scales alone, and
    placed before Adam it is a true L2 penalty (not decoupled weight decay).

    Example:
      >>> tx = optax.chain(optax.masked(l2(1e-4), jc.core.spec.selection_tree(r'^fc')), optax.adam(1e-3))
    """
    return _regulariser(strength, lambda w: w, "l2")


# ----------------------------------------------------------------------------- Zhu-Gupta


class GradualPruningState(NamedTuple):
    """State of :func:`gradual_pruning`.

    Attributes:
      count: int32 number of updates done so far (the step ``t`` of the schedule).
      masks: bool tree (params structure, True = keep) of the last pruning step.
    """

    count: jax.Array
    masks: PyTree


def _others(ndim: int, pattern: Units) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != pattern.axis % ndim)


def _unit_scores(w: jax.Array, pattern: Pattern) -> jax.Array:
    """Magnitudes per entry, or per unit (the pattern's norm over the other axes)."""
    w = w.astype(jnp.float32)
    if not isinstance(pattern, Units):
        return jnp.abs(w)
    if pattern.norm == "l1":
        return jnp.sum(jnp.abs(w), axis=_others(w.ndim, pattern))
    return jnp.sqrt(jnp.sum(jnp.square(w), axis=_others(w.ndim, pattern)))


def _unit_alive(mask: jax.Array, pattern: Pattern) -> jax.Array:
    return jnp.any(mask, axis=_others(mask.ndim, pattern)) if isinstance(pattern, Units) else mask


def _expand(keep_units: jax.Array, shape: tuple[int, ...], pattern: Pattern) -> jax.Array:
    if not isinstance(pattern, Units):
        return keep_units
    view = [1] * len(shape)
    view[pattern.axis % len(shape)] = shape[pattern.axis % len(shape)]
    return jnp.broadcast_to(keep_units.reshape(view), shape)


def gradual_pruning(
    *,
    final_sparsity: float,
    initial_sparsity: float = 0.0,
    begin_step: int,
    end_step: int,
    frequency: int,
    scope: str = "layer",
    pattern: Pattern = Unstructured(),
    regrow: bool = False,
    schedule: schedules_lib.Schedule | None = None,
) -> optax.GradientTransformation:
    """Gradual magnitude pruning (Zhu & Gupta 2017) as the last link of an optax chain.

    At every pruning step ``t = begin_step + i * frequency <= end_step`` the masks are
    recomputed inside ``update`` (under ``lax.cond``, so it jits) from the current weights
    for the sparsity ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3``; the update of
    every pruned weight is ``-w``, so it becomes exactly 0, and pruned weights get no
    update afterwards. Weights pruned once stay pruned (their score is ``-inf``), unless
    ``regrow``. Before ``begin_step`` nothing is pruned.

    Args:
      final_sparsity: ``s_f`` in ``[0, 1)``.
      initial_sparsity: ``s_i`` in ``[0, 1)``, the sparsity at ``begin_step``.
      begin_step, end_step, frequency: ``t0``, ``t0 + n dt`` and ``dt`` in optimizer
        steps; ``end_step - begin_step`` must be a multiple of ``frequency``.
      scope: ``'layer'`` (each kernel at ``s_t``) or ``'global'`` (one magnitude
        ranking over all kernels; unstructured only).
      pattern: ``Unstructured()`` (single weights) or ``Units(axis, norm)`` (whole
        units, e.g. the output filters of each kernel, scored by their norm).
      regrow: soft pruning. Pruned weights are zeroed at each pruning step but still
        updated until the next one, and the masks are recomputed from all weights, so
        pruned ones can come back. After ``end_step`` the masks are hard.
      schedule: ``schedule(step) -> sparsity`` to use instead of the cubic one (from
        :mod:`jcompress.pruning.schedules`); it is read at the pruning steps only.

    Returns:
      an optax GradientTransformation with state :class:`GradualPruningState`; it
      needs ``params`` in ``update``. Put it last in the chain. It prunes the Dense
      and conv kernels; ``optax.masked(tx, jc.core.spec.selection_tree(spec))``
      restricts it (the other leaves are never masked).

    Example:
      >>> tx = optax.chain(optax.sgd(0.1, momentum=0.9),
      ...                  gradual_pruning(final_sparsity=0.8, begin_step=100, end_step=1100, frequency=100))
    """
    if scope not in ("layer", "global"):
        raise ValueError(f"scope={scope!r} must be 'layer' or 'global'")
    if not isinstance(check_pattern(pattern), (Unstructured, Units)):
        raise TypeError(f"pattern={pattern} is not supported by gradual pruning: use Unstructured() or Units()")
    if isinstance(pattern, Units) and scope == "global":
        raise ValueError("pattern=Units() compares units within a layer; use scope='layer'")
    steps = schedules_lib.pruning_steps(begin_step=begin_step, end_step=end_step, frequency=frequency)
    if schedule is None:
        schedule = schedules_lib.cubic(
            final_sparsity=final_sparsity,
            initial_sparsity=initial_sparsity,
            begin_step=begin_step,
            end_step=end_step,
            frequency=frequency,
        )
    else:
        schedules_lib.check_sparsity(final_sparsity, "final_sparsity")
    # The sparsity of every pruning step, read once with Python int steps (float64 for
    # the schedules of this package), so counts are those of topk.pruned_count(schedule(t)).
    table = np.asarray([float(schedule(t)) for t in steps], np.float64)
    if np.any(~np.isfinite(table)) or np.any(table < 0) or np.any(table >= 1):
        raise ValueError(f"schedule returned sparsities outside [0, 1) at the pruning steps: {table[:8]}")
    structured = isinstance(pattern, Units)

    def units_of(leaf) -> int:
        return int(jnp.shape(leaf)[pattern.axis]) if structured else int(np.prod(jnp.shape(leaf)))

    def init(params):
        names = _selected(params)
        for name, leaf in jtree.named_leaves(params):
            if name in names:
                jtree.as_float_array(leaf, f"params/{name}")
                if structured and not -jnp.ndim(leaf) <= pattern.axis < jnp.ndim(leaf):
                    raise ValueError(f"params/{name} has shape {jnp.shape(leaf)}; {pattern} has no such axis")
        jtree.check_finite(params)
        masks = jax.tree.map(lambda x: jnp.ones(jnp.shape(x), bool), params)
        return GradualPruningState(jnp.zeros((), jnp.int32), masks)

    def recompute(params, masks, event):
        names = _selected(params)
        leaves = dict(jtree.named_leaves(params))
        old = dict(jtree.named_leaves(masks))
        scores = {}
        for n in names:
            s = _unit_scores(leaves[n], pattern)
            scores[n] = s if regrow else jnp.where(_unit_alive(old[n], pattern), s, -jnp.inf)
        if scope == "global":
            sizes = [units_of(leaves[n]) for n in names]
            total = sum(sizes)
            keep_total = total - np.floor(table * total + 0.5).astype(np.int32)
            flat = keep_largest(jnp.concatenate([jnp.ravel(scores[n]) for n in names]), jnp.asarray(keep_total)[event])
            pieces = jnp.split(flat, np.cumsum(sizes)[:-1])
            new = {n: p.reshape(jnp.shape(leaves[n])) for n, p in zip(names, pieces)}
        else:
            new = {}
            for n in names:
                size = units_of(leaves[n])
                keep = size - np.floor(table * size + 0.5).astype(np.int32)
                new[n] = _expand(keep_largest(scores[n], jnp.asarray(keep)[event]), jnp.shape(leaves[n]), pattern)
        return jtree.map_with_names(lambda n, m: new.get(n, m), masks)

    def update(updates, state, params=None):
        _need_params(params, "gradual_pruning")
        t = state.count
        offset = t - begin_step
        is_event = (t >= begin_step) & (t <= end_step) & (offset % frequency == 0)
        event = jnp.clip(offset // frequency, 0, len(steps) - 1)
        masks = lax.cond(is_event, lambda: recompute(params, state.masks, event), lambda: state.masks)
        new = _zero_pruned(updates, masks, params)
        if regrow:
            soft = ~is_event & (t > begin_step) & (t < end_step)
            new = jax.tree.map(lambda u, v: jnp.where(soft, u, v), updates, new)
        return new, GradualPruningState(t + 1, masks)

    return optax.GradientTransformation(init, update)


def soft_filter_pruning(
    *,
    sparsity: float,
    frequency: int,
    end_step: int,
    begin_step: int = 0,
    norm: str = "l2",
) -> optax.GradientTransformation:
    """Soft filter pruning (He et al. 2018): every ``frequency`` steps (one epoch) zero the
    ``sparsity`` fraction of each kernel's output filters with the smallest L2 norm,
    keep training them until the next pruning step, and prune for good at ``end_step``.

    Equivalent to ``gradual_pruning(pattern=Units(norm=norm), regrow=True)`` with a
    constant schedule; it prunes the output filters (last axis) of every kernel (wrap
    it in ``optax.masked`` for fewer). Afterwards, remove the zero filters with
    :func:`jcompress.nnx.surgery.hard_prune`.

    Example:
      >>> tx = optax.chain(optax.sgd(0.1, momentum=0.9),
      ...                  soft_filter_pruning(sparsity=0.3, frequency=steps_per_epoch, end_step=10 * steps_per_epoch))
    """
    schedules_lib.check_sparsity(sparsity, "sparsity")
    return gradual_pruning(
        final_sparsity=sparsity,
        initial_sparsity=sparsity,
        begin_step=begin_step,
        end_step=end_step,
        frequency=frequency,
        pattern=Units(axis=-1, norm=norm),
        regrow=True,
        schedule=schedules_lib.constant(sparsity),
    )


# ----------------------------------------------------------------------------- reading state


def find_masks(opt_state: PyTree) -> PyTree:
    """The masks held by the first mask-carrying state inside ``opt_state``.

    Searches tuples (``optax.chain`` states), NamedTuples and dicts depth first for a
    NamedTuple with a ``masks`` field (:class:`KeepMaskedState`,
    :class:`GradualPruningState`, the dynamic sparse training states).

    Raises:
      ValueError: when no such state is present.
    """
    stack = [opt_state]
    while stack:
        node = stack.pop(0)
        if isinstance(node, tuple) and hasattr(node, "_fields") and "masks" in node._fields:
            return node.masks
        if isinstance(node, (tuple, list)):
            stack = list(node) + stack
        elif isinstance(node, dict):
            stack = list(node.values()) + stack
    raise ValueError(
        "opt_state holds no masks: it contains no keep_masked, gradual_pruning, rigl or sparse_evolutionary state"
    )
