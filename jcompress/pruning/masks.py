"""Pruning transforms and the masks behind them, with exact counts.

The transforms (factories returning a :class:`jcompress.core.base.Transform`):

* :func:`magnitude`: score ``|w|`` (Han et al. 2015).
* :func:`random`: uniform random scores (the baseline); needs ``key`` at call time.
* :func:`taylor`: ``|w * g|`` from a gradient tree.
* :func:`snip`: connection sensitivity from one batch (Lee et al. 2019).
* :func:`obd`: ``h w^2 / 2`` from a Hessian diagonal (LeCun et al. 1990).
* :func:`by_scores`: any score tree of your own.

Each takes ``sparsity`` (a spec resolved per leaf by :func:`jcompress.core.spec.resolve`),
``pattern`` (:class:`~jcompress.core.patterns.Unstructured`, :class:`~jcompress.core.patterns.NM`,
:class:`~jcompress.core.patterns.Block` or :class:`~jcompress.core.patterns.Units`),
``scope`` and ``distribution``, and returns ``(pruned_params, MaskAux)``: the masks
(params-shaped bool tree, True = kept, all True on untouched leaves), the scores and
``errors`` (``||dW||^2 / ||W||^2`` per leaf). By default they prune the Dense and conv
kernels; ``jc.masked(t, selection)`` picks other leaves.

Counting rules (exact, deterministic):

* ``scope='layer'``: a leaf asked for sparsity ``s`` loses exactly ``round(s * size)``
  entries (units or blocks for the structured patterns).
* ``scope='global'``: exactly ``round(s * total)`` entries over all the leaves, chosen
  by one threshold (see :mod:`jcompress.core.topk`). Called eagerly on concrete arrays on
  one CPU device, the ranking runs with numpy on the host (more than 65,536 entries); under
  ``jax.jit``, on sharded arrays or accelerators it is compiled. The masks are the same.
* ``distribution='erk'``: per-layer densities by Erdos-Renyi-Kernel (Evci et al. 2020,
  RigL): density proportional to ``sum(shape) / prod(shape)``, layers that would exceed
  density 1 kept dense, and the total count exact.
* Ties: among equal scores the lower flat index (row-major, leaves in tree order for
  global scope) is pruned first.
* A leaf is never emptied silently: pruning every weight (or unit, or block) of a leaf
  raises a ValueError naming it, unless ``allow_empty=True``.

Patterns: :class:`NM` keeps ``n`` of every ``m`` consecutive entries along its axis;
:class:`Block` removes ``rows x cols`` tiles of the kernel seen as a matrix
``(prod(shape[:-1]), shape[-1])``, scored by the l1/l2 norm of their scores;
:class:`Units` removes whole slices along its axis (output neurons or filters for
``axis=-1``), scored by the l1/l2 norm of their scores over the other axes.

Example:
  >>> params, aux = jc.pruning.magnitude(sparsity=0.9, scope='global')(params)
  >>> params, aux = jc.pruning.taylor(grads, sparsity={'fc3': 0.5, '.*': 0.9})(params)
  >>> t = jc.masked(jc.pruning.magnitude(sparsity=0.5, pattern=jc.NM(2, 4)), r'conv')
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import tree as jtree
from jcompress.core import topk
from jcompress.core.base import MaskAux, Transform, default_leaves, relative_error, require_key
from jcompress.core.patterns import NM, Block, Pattern, Units, Unstructured, check_pattern
from jcompress.core.spec import Spec, check_flag, check_value, is_pairs, resolve
from jcompress.pruning import scores as scores_lib

__all__ = [
    "apply_masks",
    "by_scores",
    "erk_densities",
    "magnitude",
    "make_masks",
    "obd",
    "random",
    "snip",
    "taylor",
]

PyTree = Any


# ----------------------------------------------------------------------------- checks


def _check_sparsity(value: Any, arg: str) -> float:
    return check_value(value, arg=arg, kind=float, lo=0.0, hi=1.0)


def _named_scores(scores: PyTree, names: Sequence[str]) -> dict[str, jax.Array]:
    """``{name: float score array}`` for ``names``, checked for dtype, size and NaN."""
    leaves = dict(jtree.named_leaves(scores))
    out = {}
    for name in names:
        if name not in leaves:
            raise ValueError(f"{name!r} is not a leaf of the scores; leaves are {sorted(leaves)[:12]}")
        arr = jtree.as_float_array(leaves[name], f"scores/{name}")
        if arr.size == 0:
            raise ValueError(
                f"{name} is empty (shape {arr.shape}); there is nothing to prune. Leave it out of the selection."
            )
        if not isinstance(arr, jax.core.Tracer) and np.isnan(np.asarray(arr, np.float32)).any():
            raise ValueError(f"scores/{name} contains NaN; scores must be comparable numbers")
        out[name] = arr
    return out


def _check_finite_leaves(params: PyTree, names: Sequence[str]) -> None:
    """ValueError naming the first of ``names`` whose (concrete) weights hold NaN or inf."""
    leaves = dict(jtree.named_leaves(params))
    for name in names:
        w = leaves[name]
        if isinstance(w, jax.core.Tracer):
            continue
        w = jtree.as_float_array(w, f"params/{name}")
        if not np.isfinite(np.asarray(w, np.float32)).all():
            raise ValueError(
                f"params/{name} contains NaN or inf; pruning non-finite weights is undefined. "
                "Check the training run that produced these params."
            )


def _empty_error(name: str, shape: tuple, what: str) -> ValueError:
    size = int(np.prod(shape))
    return ValueError(
        f"{name} (shape {tuple(shape)}, {size} weights) would lose every {what}: the layer would be emptied. "
        "Lower its sparsity, leave it out with jc.masked, or pass allow_empty=True if that is intended."
    )


# ----------------------------------------------------------------------------- ERK


def erk_densities(shapes: Mapping[str, tuple[int, ...]], *, sparsity: float) -> dict[str, int]:
    """Number of entries kept per layer under the Erdos-Renyi-Kernel distribution.

    Density of layer ``l`` is ``eps * sum(shape_l) / prod(shape_l)``; ``eps`` is solved
    so that the total kept equals ``total - round(sparsity * total)``; layers whose
    density would exceed 1 are kept dense and ``eps`` re-solved (Evci et al. 2020).
    Fractional counts are rounded by largest remainder so the total is exact.

    Args:
      shapes: ``{leaf name: shape}`` of the selected kernels.
      sparsity: overall fraction pruned, in ``[0, 1]``.

    Returns:
      ``{leaf name: number of entries kept}`` (ints).
    """
    sparsity = _check_sparsity(sparsity, "sparsity")
    sizes = {n: int(np.prod(s)) for n, s in shapes.items()}
    raw = {n: sum(s) / sizes[n] if sizes[n] else 0.0 for n, s in shapes.items()}
    total = sum(sizes.values())
    keep_total = total - topk.pruned_count(sparsity, total)
    dense: set[str] = set()
    while True:
        free = [n for n in sizes if n not in dense]
        budget = keep_total - sum(sizes[n] for n in dense)
        denom = sum(raw[n] * sizes[n] for n in free)
        eps = budget / denom if denom > 0 else 0.0
        over = [n for n in free if eps * raw[n] > 1.0]
        if not over:
            break
        dense.add(max(over, key=lambda n: raw[n]))
    want = {n: float(sizes[n]) if n in dense else eps * raw[n] * sizes[n] for n in sizes}
    keep = {n: min(sizes[n], math.floor(want[n])) for n in sizes}
    short = keep_total - sum(keep.values())
    order = sorted(sizes, key=lambda n: (-(want[n] - keep[n]), n))
    while short > 0:  # largest remainder first, skipping full layers
        progressed = False
        for n in order:
            if short and keep[n] < sizes[n]:
                keep[n] += 1
                short -= 1
                progressed = True
        if not progressed:
            break
    return keep


# ----------------------------------------------------------------------------- masks


def _check_plan(pattern, scope: str, distribution: str, sparsity) -> Pattern:
    """The checked pattern; ValueError for a scope/distribution/sparsity that do not fit it."""
    pattern = check_pattern(pattern)
    if scope not in ("layer", "global"):
        raise ValueError(f"scope={scope!r} must be 'layer' or 'global'")
    if distribution not in ("uniform", "erk"):
        raise ValueError(f"distribution={distribution!r} must be 'uniform' or 'erk'")
    if scope == "global" and distribution != "uniform":
        raise ValueError("scope='global' sets per-layer sparsities itself: use distribution='uniform'")
    if isinstance(pattern, NM):
        if scope == "global" or distribution == "erk":
            raise ValueError(
                f"pattern={pattern} fixes the sparsity of every group; use scope='layer', distribution='uniform'"
            )
        return pattern
    if sparsity is None:
        raise ValueError(f"sparsity is required for pattern={pattern} (only an NM pattern fixes it): pass sparsity=0.9")
    if (scope == "global" or distribution == "erk") and is_pairs(sparsity):
        raise ValueError(
            f"scope={scope!r}, distribution={distribution!r} derive the per-layer sparsities from one overall value: "
            "pass sparsity as a single float"
        )
    if not is_pairs(sparsity):
        _check_sparsity(sparsity, "sparsity")
    return pattern


def _axis(axis: int, shape: tuple, name: str) -> int:
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"{name}: axis={axis} is out of range for shape {tuple(shape)}")
    return axis % len(shape)


def _unit_count(pattern: Pattern, shape: tuple, name: str) -> int:
    """Number of prunable units of a leaf (entries, units or blocks), checking the pattern fits."""
    if isinstance(pattern, Units):
        return shape[_axis(pattern.axis, shape, name)]
    if isinstance(pattern, Block):
        if len(shape) < 2:
            raise ValueError(f"{name}: Block needs a kernel with >= 2 dims, got shape {tuple(shape)}")
        rows, cols = int(np.prod(shape[:-1])), shape[-1]
        if rows % pattern.rows or cols % pattern.cols:
            raise ValueError(
                f"{name}: {pattern} does not tile the kernel seen as a matrix ({rows}, {cols}); "
                "choose a block whose sides divide it"
            )
        return (rows // pattern.rows) * (cols // pattern.cols)
    if isinstance(pattern, NM):
        ax = _axis(pattern.axis, shape, name)
        if shape[ax] % pattern.m:
            raise ValueError(
                f"{name}: m={pattern.m} does not divide axis {pattern.axis} of shape {tuple(shape)}; "
                "choose another NM axis or m, or leave the leaf out with jc.masked"
            )
    return int(np.prod(shape))


def make_masks(
    scores: PyTree,
    names: Sequence[str] | None = None,
    *,
    sparsity: Spec = None,
    pattern: Pattern = Unstructured(),
    scope: str = "layer",
    distribution: str = "uniform",
    existing: PyTree | None = None,
    allow_empty: bool = False,
) -> PyTree:
    """Bool masks (True = keep) removing the lowest-scored entries of ``names``, exact counts.

    Args:
      scores: float tree with the params' structure (e.g. from
        :mod:`jcompress.pruning.scores`); higher score = more important.
      names: the leaves to prune (slash-joined names); default: Dense and conv kernels.
      sparsity: fraction removed, in ``[0, 1]``: a float or, with ``scope='layer'`` and
        ``distribution='uniform'``, a spec ``{regex: float}`` resolved per leaf. With
        :class:`NM` it may be None (the pattern fixes it) and must otherwise equal
        ``1 - n/m``.
      pattern: :class:`Unstructured`, :class:`NM`, :class:`Block` or :class:`Units`.
      scope: ``'layer'`` (each leaf pruned to its sparsity) or ``'global'`` (one
        threshold over all the leaves).
      distribution: ``'uniform'`` or ``'erk'`` (Erdos-Renyi-Kernel per-layer densities).
      existing: optional previous mask tree; entries (units, blocks) it prunes get score
        ``-inf``, so they stay pruned whenever the new sparsity is at least the old one.
      allow_empty: allow a leaf to lose every weight; otherwise that is a ValueError.

    Returns:
      bool tree with the structure of ``scores``; leaves not in ``names`` all True.

    Raises:
      ValueError: sparsity outside ``[0, 1]``, a pattern that does not fit a leaf, a leaf
        that would be emptied, NaN scores, an ``existing`` tree that does not match.
      TypeError: non-floating scores, a pattern that is not a pattern value.

    Example:
      >>> masks = make_masks(scores.taylor_scores(params, grads), sparsity=0.8, scope='global')
    """
    pattern = _check_plan(pattern, scope, distribution, sparsity)
    names = list(default_leaves(scores) if names is None else names)
    sel = _named_scores(scores, names)
    old = None
    if existing is not None:
        jtree.check_same_structure(scores, existing, "scores", "existing")
        ex = dict(jtree.named_leaves(existing))
        old = {n: jnp.asarray(ex[n], bool) for n in names}
    shapes = {n: tuple(sel[n].shape) for n in names}
    units = {n: _unit_count(pattern, shapes[n], n) for n in names}
    if isinstance(pattern, NM):
        if sparsity is not None:
            for n, s in resolve(sparsity, names, arg="sparsity").items():
                if abs(_check_sparsity(s, f"sparsity[{n!r}]") - pattern.sparsity) > 1e-9:
                    raise ValueError(
                        f"sparsity={s} for {n} contradicts {pattern} (which removes {pattern.sparsity}); pass sparsity=None"
                    )
        keep: Any = None
    elif scope == "global":
        total = sum(units.values())
        keep = total - topk.pruned_count(_check_sparsity(sparsity, "sparsity"), total)
        if keep == 0 and not allow_empty and names:
            raise _empty_error(names[0], shapes[names[0]], _what(pattern))
    else:
        if distribution == "erk":
            entry_keep = erk_densities(shapes, sparsity=sparsity)
            size = {n: int(np.prod(shapes[n])) for n in names}
            keep = {n: math.floor(entry_keep[n] * units[n] / max(1, size[n]) + 0.5) for n in names}
        else:
            per = resolve(sparsity, names, arg="sparsity")
            keep = {
                n: units[n] - topk.pruned_count(_check_sparsity(per[n], f"sparsity[{n!r}]"), units[n]) for n in names
            }
        if not allow_empty:
            for n in names:
                if keep[n] == 0:
                    raise _empty_error(n, shapes[n], _what(pattern))
        keep = tuple(keep[n] for n in names)
    new = _masks_of(sel, old, plan=(tuple(names), pattern, scope, keep))
    if scope == "global" and not allow_empty:
        for n in names:
            if not isinstance(new[n], jax.core.Tracer) and not bool(jnp.any(new[n])):
                raise _empty_error(n, shapes[n], _what(pattern))
    return jtree.map_with_names(lambda k, x: new[k] if k in new else jnp.ones(jnp.shape(x), bool), scores)


def _what(pattern: Pattern) -> str:
    return {Units: "unit", Block: "block"}.get(type(pattern), "weight")


def _norm(x: jax.Array, axis, norm: str) -> jax.Array:
    if norm == "l1":
        return jnp.sum(jnp.abs(x), axis=axis)
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=axis))


def _block_view(x: jax.Array, pattern: Block) -> jax.Array:
    """``(rows/r, r, cols/c, c)`` view of ``x`` seen as a ``(prod(shape[:-1]), shape[-1])`` matrix."""
    mat = x.reshape(-1, x.shape[-1])
    return mat.reshape(mat.shape[0] // pattern.rows, pattern.rows, mat.shape[1] // pattern.cols, pattern.cols)


def _unit_scores(score: jax.Array, alive: jax.Array | None, pattern: Pattern) -> jax.Array:
    """Scores of the prunable units of one leaf; units pruned in ``alive`` get ``-inf``."""
    score = score.astype(jnp.float32)
    if isinstance(pattern, Units):
        ax = pattern.axis % score.ndim
        others = tuple(i for i in range(score.ndim) if i != ax)
        out = _norm(score, others, pattern.norm)
        alive = None if alive is None else jnp.any(alive, axis=others)
    elif isinstance(pattern, Block):
        out = _norm(_block_view(score, pattern), (1, 3), pattern.norm)
        alive = None if alive is None else jnp.any(_block_view(alive, pattern), axis=(1, 3))
    else:
        out = score
    return out if alive is None else jnp.where(alive, out, -jnp.inf)


def _expand(keep: jax.Array, shape: tuple, pattern: Pattern) -> jax.Array:
    """Entry mask of a leaf from the mask of its units."""
    if isinstance(pattern, Units):
        view = [1] * len(shape)
        view[pattern.axis % len(shape)] = shape[pattern.axis % len(shape)]
        return jnp.broadcast_to(keep.reshape(view), shape)
    if isinstance(pattern, Block):
        return jnp.repeat(jnp.repeat(keep, pattern.rows, axis=0), pattern.cols, axis=1).reshape(shape)
    return keep


def _masks_of(sel: dict, old: dict | None, plan: tuple) -> dict:
    """Masks of the named score arrays; ``plan`` = (names, pattern, scope, kept counts).

    Scores that are concrete arrays on one CPU device, with more than
    ``topk.HOST_ABOVE`` units to rank (all leaves together for ``scope='global'``, each
    leaf for ``'layer'``: the smaller leaves are ranked together in one compiled program), are ranked eagerly, so that
    :func:`~jcompress.core.topk.keep_largest_global` selects them with numpy (on CPU the
    compiled histogram pass is several times slower); unit scores that are not the scores
    themselves (norms, ``-inf`` for units ``old`` pruned) still come from a compiled
    function, and the masks are the same either way. Traced, sharded or
    accelerator scores, small ones and N:M patterns run as one compiled program.
    """
    names, pattern, scope = plan[:3]
    if isinstance(pattern, NM) or not topk.on_host([*sel.values(), *(old or {}).values()]):
        return _compiled_masks(sel, old, plan)
    counts = dict(zip(names, (_unit_count(pattern, sel[n].shape, n) for n in names)))
    if scope == "global":
        big = names if sum(counts.values()) > topk.HOST_ABOVE else ()
    else:  # per leaf: the small leaves stay together in one compiled program
        big = tuple(n for n in names if counts[n] > topk.HOST_ABOVE)
    if not big:
        return _compiled_masks(sel, old, plan)
    out = {}
    if len(big) < len(names):  # scope='layer' only
        out = _compiled_masks(*_restrict(sel, old, plan, tuple(n for n in names if n not in big)))
        sel, old, plan = _restrict(sel, old, plan, big)
    if isinstance(pattern, Unstructured) and old is None and all(sel[n].dtype == jnp.float32 for n in big):
        units = sel  # the scores themselves (a compiled identity would copy them)
    else:
        units = _units_of(sel, old, plan)
    kept = _keep_units(units, plan)
    return {**out, **{n: _expand(kept[n], sel[n].shape, pattern) for n in big}}


def _restrict(sel: dict, old: dict | None, plan: tuple, names: tuple) -> tuple[dict, dict | None, tuple]:
    """``(sel, old, plan)`` for the per-leaf ranking of ``names`` only."""
    keep = dict(zip(plan[0], plan[3]))
    part = (names, plan[1], plan[2], tuple(keep[n] for n in names))
    return {n: sel[n] for n in names}, None if old is None else {n: old[n] for n in names}, part


@functools.partial(jax.jit, static_argnames=("plan",))
def _compiled_masks(sel: dict, old: dict | None, plan: tuple) -> dict:
    """:func:`_masks_of` as one compiled program."""
    names, pattern = plan[:2]
    if isinstance(pattern, NM):
        out = {}
        for n in names:
            s = sel[n] if old is None else jnp.where(old[n], sel[n], -jnp.inf)
            out[n] = topk.nm_keep_mask(s, n=pattern.n, m=pattern.m, axis=pattern.axis)
        return out
    kept = _keep_units(_units_of(sel, old, plan), plan)
    return {n: _expand(kept[n], sel[n].shape, pattern) for n in names}


@functools.partial(jax.jit, static_argnames=("plan",))
def _units_of(sel: dict, old: dict | None, plan: tuple) -> dict:
    """Float32 scores of the prunable units of every named leaf (see :func:`_unit_scores`)."""
    names, pattern = plan[:2]
    return {n: _unit_scores(sel[n], None if old is None else old[n], pattern) for n in names}


def _keep_units(units: dict, plan: tuple) -> dict:
    """Unit keep masks: the kept counts of ``plan`` over all leaves together or per leaf."""
    names, _, scope, keep = plan
    if scope == "global":
        return dict(zip(names, topk.keep_largest_global([units[n] for n in names], keep)))
    return {n: topk.keep_largest_global([units[n]], k)[0] for n, k in zip(names, keep)}


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """Zero the pruned entries: ``where(mask, w, 0)`` leaf by leaf.

    Args:
      params: parameter tree (dict, NNX State, ...).
      masks: bool tree with the same structure and leaf shapes (True = keep).

    Returns:
      a new tree like ``params``; dtypes unchanged.

    Raises:
      ValueError: structure or shape mismatch (naming the leaf), non-bool masks.
    """
    jtree.check_same_structure(params, masks, "params", "masks")

    def one(name, w, mask):
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise ValueError(f"masks/{name} has dtype {mask.dtype}; masks must be bool (True = keep)")
        if mask.shape != jnp.shape(w):
            raise ValueError(f"masks/{name} has shape {mask.shape} but params/{name} has shape {jnp.shape(w)}")
        return jnp.where(mask, w, jnp.zeros((), jnp.asarray(w).dtype))

    return jtree.map_with_names(one, params, masks)


# ----------------------------------------------------------------------------- transforms

# One fused pass per leaf instead of five eager ones (the same sums, bit for bit).
_relative_error = jax.jit(relative_error)


def _pruning(
    label: str, score_fn: Callable, sparsity: Spec, pattern: Pattern, scope: str, distribution: str, allow_empty: bool
) -> Transform:
    """A Transform pruning its leaves by ``score_fn(params, names, key) -> score tree``."""
    _check_plan(pattern, scope, distribution, sparsity)
    allow_empty = check_flag(allow_empty, arg="allow_empty")

    def apply(params, names, key):
        _check_finite_leaves(params, names)
        scores = score_fn(params, names, key)
        jtree.check_same_structure(params, scores, "params", "scores")
        masks = make_masks(
            scores,
            names,
            sparsity=sparsity,
            pattern=pattern,
            scope=scope,
            distribution=distribution,
            allow_empty=allow_empty,
        )
        kept = dict(jtree.named_leaves(masks))
        masks = jtree.map_with_names(lambda n, x: kept[n], params)  # the params' structure (State or dict)
        new = apply_masks(params, masks)
        before, after = dict(jtree.named_leaves(params)), dict(jtree.named_leaves(new))
        errors = {n: _relative_error(before[n], after[n]) for n in names}
        return new, MaskAux(masks, scores, errors)

    return Transform(apply, label)


def by_scores(
    scores: PyTree,
    *,
    sparsity: Spec = None,
    pattern: Pattern = Unstructured(),
    scope: str = "layer",
    distribution: str = "uniform",
    allow_empty: bool = False,
) -> Transform:
    """Prune the entries with the lowest ``scores`` (a float tree with the params' structure).

    Args:
      scores: float tree shaped like the params the transform is called on; higher =
        more important (e.g. from :mod:`jcompress.pruning.scores`).
      sparsity, pattern, scope, distribution, allow_empty: as in :func:`make_masks`
        (sparsity: a float in ``[0, 1]`` or a ``{regex: float}`` spec per leaf;
        required except with an ``NM`` pattern, which fixes it).

    Returns:
      a :class:`~jcompress.core.base.Transform`: ``t(params, key=None) -> (new_params,
      MaskAux)``. Pruned entries of the touched leaves (default: Dense and conv kernels)
      are exactly 0; other leaves are unchanged and their masks all True.

    Example:
      >>> s = jc.pruning.scores.obd_scores(params, h)
      >>> params, aux = jc.pruning.by_scores(s, sparsity=0.8, pattern=jc.Units())(params)
    """

    def score_fn(params, names, key):
        del key
        jtree.check_same_structure(params, scores, "params", "scores")
        return scores

    return _pruning("by_scores", score_fn, sparsity, pattern, scope, distribution, allow_empty)


def magnitude(
    *,
    sparsity: Spec = None,
    pattern: Pattern = Unstructured(),
    scope: str = "layer",
    distribution: str = "uniform",
    allow_empty: bool = False,
) -> Transform:
    """Magnitude pruning: remove the weights with the smallest ``|w|`` (Han et al. 2015).

    Args:
      sparsity, pattern, scope, distribution, allow_empty: as in :func:`make_masks`
        (sparsity: a float in ``[0, 1]`` or a ``{regex: float}`` spec per leaf;
        required except with an ``NM`` pattern, which fixes it).

    Returns:
      a :class:`~jcompress.core.base.Transform`: ``t(params, key=None) -> (new_params,
      MaskAux)``. Pruned entries of the touched leaves (default: Dense and conv kernels)
      are exactly 0; other leaves are unchanged and their masks all True.

    Example:
      >>> params, aux = jax.jit(jc.pruning.magnitude(sparsity=0.9, scope='global'))(params)
      >>> params, aux = jc.pruning.magnitude(pattern=jc.NM(2, 4))(params)
    """
    score_fn = lambda params, names, key: scores_lib.magnitude_scores(params, names=names)
    return _pruning("magnitude", score_fn, sparsity, pattern, scope, distribution, allow_empty)


def random(
    *,
    sparsity: Spec = None,
    pattern: Pattern = Unstructured(),
    scope: str = "layer",
    distribution: str = "uniform",
    allow_empty: bool = False,
) -> Transform:
    """Random pruning (the baseline): uniform random scores; call with ``key=``.

    Args:
      sparsity, pattern, scope, distribution, allow_empty: as in :func:`make_masks`
        (sparsity: a float in ``[0, 1]`` or a ``{regex: float}`` spec per leaf;
        required except with an ``NM`` pattern, which fixes it).

    Returns:
      a :class:`~jcompress.core.base.Transform`: ``t(params, key=None) -> (new_params,
      MaskAux)``. Pruned entries of the touched leaves (default: Dense and conv kernels)
      are exactly 0; other leaves are unchanged and their masks all True.

    Example:
      >>> params, aux = jc.pruning.random(sparsity=0.9)(params, key=jax.random.key(0))
    """

    def score_fn(params, names, key):
        key = require_key(key, what="pruning.random")
        return scores_lib.random_scores(params, names=names, key=key)

    return _pruning("random", score_fn, sparsity, pattern, scope, distribution, allow_empty)


def taylor(
    grads: PyTree,
    *,
    sparsity: Spec = None,
    pattern: Pattern = Unstructured(),
    scope: str = "layer",
    distribution: str = "uniform",
    allow_empty: bool = False,
) -> Transform:
    """First-order Taylor pruning: remove the smallest ``|w * g|`` (Molchanov et al. 2017).

    Args:
      grads: gradient tree with the params' structure (e.g. summed over a few batches).
      sparsity, pattern, scope, distribution, allow_empty: as in :func:`make_masks`
        (sparsity: a float in ``[0, 1]`` or a ``{regex: float}`` spec per leaf;
        required except with an ``NM`` pattern, which fixes it).

    Returns:
      a :class:`~jcompress.core.base.Transform`: ``t(params, key=None) -> (new_params,
      MaskAux)``. Pruned entries of the touched leaves (default: Dense and conv kernels)
      are exactly 0; other leaves are unchanged and their masks all True.

    Example:
      >>> grads = jax.grad(loss_fn)(params, batch)
      >>> params, aux = jc.pruning.taylor(grads, sparsity=0.8)(params)
    """
    score_fn = lambda params, names, key: scores_lib.taylor_scores(params, grads, names=names)
    return _pruning("taylor", score_fn, sparsity, pattern, scope, distribution, allow_empty)


def snip(
    loss_fn: Callable,
    batch: Any,
    *,
    sparsity: Spec = None,
    pattern: Pattern = Unstructured(),
    scope: str = "layer",
    distribution: str = "uniform",
    allow_empty: bool = False,
) -> Transform:
    """SNIP (Lee et al. 2019): remove the lowest connection sensitivity on one batch.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      batch: the batch, passed to ``loss_fn`` as is.
      sparsity, pattern, scope, distribution, allow_empty: as in :func:`make_masks`
        (sparsity: a float in ``[0, 1]`` or a ``{regex: float}`` spec per leaf;
        required except with an ``NM`` pattern, which fixes it).

    Returns:
      a :class:`~jcompress.core.base.Transform`: ``t(params, key=None) -> (new_params,
      MaskAux)``. Pruned entries of the touched leaves (default: Dense and conv kernels)
      are exactly 0; other leaves are unchanged and their masks all True.

    Example:
      >>> params, aux = jc.pruning.snip(loss_fn, batch, sparsity=0.9, scope='global')(init_params)
    """
    score_fn = lambda params, names, key: scores_lib.snip_scores(loss_fn, params, batch, names=names)
    return _pruning("snip", score_fn, sparsity, pattern, scope, distribution, allow_empty)


def obd(
    hessian_diag: PyTree,
    *,
    sparsity: Spec = None,
    pattern: Pattern = Unstructured(),
    scope: str = "layer",
    distribution: str = "uniform",
    allow_empty: bool = False,
) -> Transform:
    """Optimal Brain Damage (LeCun et al. 1990): remove the smallest ``h w^2 / 2``.

    Args:
      hessian_diag: Hessian diagonal with the params' structure (from
        :func:`~jcompress.pruning.scores.fisher_diagonal`,
        :func:`~jcompress.pruning.scores.hutchinson_diagonal` or
        :func:`~jcompress.pruning.scores.grad_squared_mean`).
      sparsity, pattern, scope, distribution, allow_empty: as in :func:`make_masks`
        (sparsity: a float in ``[0, 1]`` or a ``{regex: float}`` spec per leaf;
        required except with an ``NM`` pattern, which fixes it).

    Returns:
      a :class:`~jcompress.core.base.Transform`: ``t(params, key=None) -> (new_params,
      MaskAux)``. Pruned entries of the touched leaves (default: Dense and conv kernels)
      are exactly 0; other leaves are unchanged and their masks all True.

    Example:
      >>> h = jc.pruning.scores.fisher_diagonal(loss_fn, params, [batch])
      >>> params, aux = jc.pruning.obd(h, sparsity=0.8)(params)
    """
    score_fn = lambda params, names, key: scores_lib.obd_scores(params, hessian_diag, names=names)
    return _pruning("obd", score_fn, sparsity, pattern, scope, distribution, allow_empty)
