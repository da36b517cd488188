"""Pruning masks with exact counts: unstructured, N:M, block and structured; layer or global.

A *mask* tree has the structure of the params and holds bool arrays: True keeps a
weight, False prunes it. Leaves outside the selection get all-True masks, so applying a
mask tree never touches them.

Counting rules (exact, deterministic):

* ``scope='layer'``: every selected leaf asked for sparsity ``s`` loses exactly
  ``round(s * size)`` entries (or units / blocks for the structured patterns).
* ``scope='global'``: exactly ``round(s * total)`` entries over all selected leaves,
  chosen by one threshold (see :mod:`jcompress.core.topk`).
* ``distribution='erk'``: per-layer densities by Erdos-Renyi-Kernel (Evci et al. 2020,
  RigL): density proportional to ``sum(shape) / prod(shape)``, layers that would exceed
  density 1 kept dense, and the total count exact.
* Ties: entries are ranked by score, and among equal scores the lower flat index
  (row-major, leaves in tree order for global scope) is pruned first.

Patterns: ``'unstructured'``; ``'nm'`` (in every group of ``m`` consecutive entries
along ``axis`` exactly ``n`` are kept, default ``axis=-2``: the input axis of a Dense
kernel ``(in, out)`` or of a conv kernel ``(kh, kw, cin, cout)``); ``'block'`` (blocks
of ``block=(r, c)`` entries of the kernel seen as a matrix ``(prod(shape[:-1]),
shape[-1])``, scored by the sum of their scores); ``'structured'`` (whole output units
along ``axis``, default ``-1``: neurons of a Dense kernel, filters of a conv kernel,
scored by the L1 or L2 norm of their scores over the other axes).

Example:
  >>> from jcompress.pruning import scores
  >>> masks = make_masks(scores.magnitude(params), sparsity=0.9, scope='global')
  >>> pruned = apply_masks(params, masks)
  >>> new_params, aux = magnitude_pruning(sparsity=0.9)(params)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import tree as jtree
from jcompress.core import topk
from jcompress.core.spec import check_value
from jcompress.pruning import scores as scores_lib

__all__ = [
    "PruneAux",
    "apply_masks",
    "erk_densities",
    "magnitude_pruning",
    "make_masks",
    "nm_masks",
    "prune",
]

PyTree = Any
_PATTERNS = ("unstructured", "nm", "block", "structured")


class PruneAux(NamedTuple):
    """What a pruning step reports besides the new params.

    Attributes:
      masks: bool tree with the params' structure (True = kept).
      scores: the float score tree the masks were made from.
      thresholds: ``{leaf name: float32 scalar}`` for the selected leaves: the smallest
        score that was kept in that leaf (for block/structured patterns, the smallest
        kept block/unit score); ``inf`` if the leaf was pruned entirely.
    """

    masks: PyTree
    scores: PyTree
    thresholds: dict


# ----------------------------------------------------------------------------- checks


def _check_sparsity(value: Any, arg: str) -> float:
    return check_value(value, arg=arg, kind=float, lo=0.0, hi=1.0, hi_open=True)


def _selected_scores(scores: PyTree, selection) -> dict[str, jax.Array]:
    """``{name: float score array}`` for the selected leaves, checked for dtype and NaN."""
    out = {}
    for name, leaf in jtree.iter_selected(scores, selection):
        arr = jtree.as_float_array(leaf, f"scores/{name}")
        if arr.size == 0:
            raise ValueError(f"{name} is empty (shape {arr.shape}); there is nothing to prune. Exclude it from the selection.")
        if not isinstance(arr, jax.core.Tracer) and bool(jnp.any(jnp.isnan(arr))):
            raise ValueError(f"scores/{name} contains NaN; scores must be comparable numbers")
        out[name] = arr
    return out


def _per_layer_sparsity(sparsity, names: list[str]) -> dict[str, float]:
    if isinstance(sparsity, Mapping):
        unknown = sorted(set(sparsity) - set(names))
        missing = [n for n in names if n not in sparsity]
        if unknown or missing:
            raise ValueError(
                f"sparsity dict must name exactly the selected leaves {names}; unknown: {unknown}, missing: {missing}"
            )
        return {n: _check_sparsity(sparsity[n], f"sparsity[{n!r}]") for n in names}
    s = _check_sparsity(sparsity, "sparsity")
    return {n: s for n in names}


# ----------------------------------------------------------------------------- ERK


def erk_densities(shapes: Mapping[str, tuple[int, ...]], *, sparsity: float) -> dict[str, int]:
    """Number of entries kept per layer under the Erdos-Renyi-Kernel distribution.

    Density of layer ``l`` is ``eps * sum(shape_l) / prod(shape_l)``; ``eps`` is solved
    so that the total kept equals ``total - round(sparsity * total)``; layers whose
    density would exceed 1 are kept dense and ``eps`` re-solved (Evci et al. 2020).
    Fractional counts are rounded by largest remainder so the total is exact.

    Args:
      shapes: ``{leaf name: shape}`` of the selected kernels.
      sparsity: overall fraction pruned, in ``[0, 1)``.

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


# ----------------------------------------------------------------------------- patterns


def nm_masks(score: jax.Array, *, n: int, m: int, axis: int = -2, name: str = "scores") -> jax.Array:
    """N:M mask of one array: in each group of ``m`` consecutive entries along ``axis``
    the ``n`` highest scores are kept (ties: the higher index is kept).

    Raises ValueError if ``m`` does not divide ``score.shape[axis]``.
    """
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise ValueError(f"N:M needs integers 0 < n <= m, got n={n!r}, m={m!r}")
    score = jnp.asarray(score)
    axis = _axis(axis, score.ndim, name)
    if score.shape[axis] % m:
        raise ValueError(f"{name}: m={m} does not divide axis {axis} of shape {score.shape}; choose another axis= or m")
    moved = jnp.moveaxis(score, axis, -1)
    grouped = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    si, sj = grouped[..., :, None], grouped[..., None, :]
    idx = jnp.arange(m)
    beats = (sj > si) | ((sj == si) & (idx[None, :] > idx[:, None]))  # j outranks i
    keep = jnp.sum(beats, axis=-1) < n
    return jnp.moveaxis(keep.reshape(moved.shape), -1, axis)


def _axis(axis: int, ndim: int, name: str) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}: axis={axis} is out of range for an array with {ndim} dimensions")
    return axis % ndim


def _units(score: jax.Array, axis: int, norm: str, name: str) -> jax.Array:
    """Per-unit score along ``axis`` (the norm of the scores over all other axes)."""
    axis = _axis(axis, score.ndim, name)
    others = tuple(i for i in range(score.ndim) if i != axis)
    if norm == "l1":
        return jnp.sum(jnp.abs(score), axis=others)
    if norm == "l2":
        return jnp.sqrt(jnp.sum(jnp.square(score), axis=others))
    raise ValueError(f"norm={norm!r} must be 'l1' or 'l2'")


def _expand_units(keep: jax.Array, shape: tuple[int, ...], axis: int) -> jax.Array:
    axis = axis % len(shape)
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return jnp.broadcast_to(keep.reshape(view), shape)


def _blocks(score: jax.Array, block: tuple[int, int], name: str) -> jax.Array:
    """Block scores ``(rows/r, cols/c)`` of the score seen as ``(prod(shape[:-1]), shape[-1])``."""
    if score.ndim < 2:
        raise ValueError(f"{name}: the block pattern needs a kernel with >= 2 dims, got shape {score.shape}")
    if not (isinstance(block, (tuple, list)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"block={block!r} must be a pair of positive ints (rows, cols)")
    r, c = block
    mat = score.reshape(-1, score.shape[-1])
    if mat.shape[0] % r or mat.shape[1] % c:
        raise ValueError(
            f"{name}: block {block} does not tile the kernel seen as a matrix {mat.shape}; "
            "choose a block whose sides divide it"
        )
    return jnp.abs(mat).reshape(mat.shape[0] // r, r, mat.shape[1] // c, c).sum(axis=(1, 3))


def _expand_blocks(keep: jax.Array, shape: tuple[int, ...], block: tuple[int, int]) -> jax.Array:
    r, c = block
    return jnp.repeat(jnp.repeat(keep, r, axis=0), c, axis=1).reshape(shape)


# ----------------------------------------------------------------------------- masks


def make_masks(
    scores: PyTree,
    *,
    sparsity: float | Mapping[str, float] | None,
    selection=None,
    scope: str = "layer",
    distribution: str = "uniform",
    pattern: str = "unstructured",
    n: int = 2,
    m: int = 4,
    axis: int | None = None,
    block: tuple[int, int] = (1, 4),
    norm: str = "l1",
    existing: PyTree | None = None,
) -> PyTree:
    """Bool masks (True = keep) pruning the lowest-scored entries, with exact counts.

    Args:
      scores: float tree with the params' structure (e.g. from
        :mod:`jcompress.pruning.scores`); higher score = more important.
      sparsity: fraction pruned in ``[0, 1)``; with ``scope='layer'`` also a dict
        ``{leaf name: sparsity}`` naming every selected leaf. For ``pattern='nm'`` it
        may be ``None`` and otherwise must equal ``1 - n/m``.
      selection: which leaves to prune (any form of ``jcompress.tree.select``'s
        ``include``: regexes, predicate, bool tree; ``None`` selects kernels).
      scope: ``'layer'`` (each leaf pruned to its sparsity) or ``'global'`` (one
        threshold over all selected leaves).
      distribution: ``'uniform'`` (the same sparsity per layer) or ``'erk'``
        (Erdos-Renyi-Kernel per-layer densities; layer scope only).
      pattern: ``'unstructured'``, ``'nm'``, ``'block'`` or ``'structured'``.
      n, m: keep ``n`` of every ``m`` along ``axis`` (pattern ``'nm'``).
      axis: ``'nm'`` group axis (default ``-2``); ``'structured'`` unit axis (default
        ``-1``, the output units).
      block: ``(r, c)`` block shape for pattern ``'block'``.
      norm: ``'l1'`` or ``'l2'``, how unit scores are aggregated (``'structured'``).
      existing: optional previous mask tree; entries it prunes get score ``-inf`` so
        they stay pruned whenever the new sparsity is at least the old one.

    Returns:
      bool tree with the structure of ``scores``; unselected leaves all True.

    Raises:
      ValueError: sparsity outside ``[0, 1)``, unknown scope/pattern/distribution,
        ``m`` not dividing the axis, a block not tiling a kernel, a selection matching
        nothing, NaN scores, an ``existing`` tree that does not match.
      TypeError: non-floating scores.
    """
    if scope not in ("layer", "global"):
        raise ValueError(f"scope={scope!r} must be 'layer' or 'global'")
    if distribution not in ("uniform", "erk"):
        raise ValueError(f"distribution={distribution!r} must be 'uniform' or 'erk'")
    if pattern not in _PATTERNS:
        raise ValueError(f"pattern={pattern!r} must be one of {_PATTERNS}")
    if scope == "global" and (distribution != "uniform" or isinstance(sparsity, Mapping)):
        raise ValueError(
            "scope='global' sets per-layer sparsities itself: use distribution='uniform' and a float sparsity"
        )
    sel = _selected_scores(scores, selection)
    if existing is not None:
        jtree.check_same_structure(scores, existing, "scores", "existing")
        old = dict(jtree.named_leaves(existing))
        sel = {k: jnp.where(jnp.asarray(old[k], bool), v, -jnp.inf) for k, v in sel.items()}
    if pattern == "nm":
        if scope == "global" or distribution == "erk":
            raise ValueError(
                "pattern='nm' fixes the sparsity of every group; use scope='layer', distribution='uniform'"
            )
        if sparsity is not None and abs(_check_sparsity(sparsity, "sparsity") - (1 - n / m)) > 1e-9:
            raise ValueError(
                f"sparsity={sparsity} contradicts n:m={n}:{m} (which prunes {1 - n / m}); pass sparsity=None"
            )
    elif sparsity is None:
        raise ValueError(f"sparsity is required for pattern={pattern!r}")
    if isinstance(sparsity, Mapping):
        sparsity = tuple(sorted(_per_layer_sparsity(sparsity, list(sel)).items()))
    plan = (pattern, n, m, axis, tuple(block), norm, scope, distribution, sparsity)
    new = _masks_of(sel, plan=plan)
    return jtree.map_with_names(lambda k, x: new[k] if k in new else jnp.ones(jnp.shape(x), bool), scores)


@functools.partial(jax.jit, static_argnames=("plan",))
def _masks_of(sel: dict, plan: tuple) -> dict:
    """Masks of the selected score arrays; ``plan`` holds the static hyperparameters."""
    pattern, n, m, axis, block, norm, scope, distribution, sparsity = plan
    if isinstance(sparsity, tuple):
        sparsity = dict(sparsity)
    names = list(sel)
    if pattern == "nm":
        ax = -2 if axis is None else axis
        return {k: nm_masks(v, n=n, m=m, axis=ax, name=f"scores/{k}") for k, v in sel.items()}
    unit_axis = -1 if axis is None else axis
    if pattern == "unstructured":
        units = sel
    elif pattern == "structured":
        units = {k: _units(v, unit_axis, norm, f"scores/{k}") for k, v in sel.items()}
    else:
        units = {k: _blocks(v, block, f"scores/{k}") for k, v in sel.items()}
    keep_units = _keep_units(units, sparsity, scope, distribution, sel)
    if pattern == "unstructured":
        return keep_units
    if pattern == "structured":
        return {k: _expand_units(keep_units[k], sel[k].shape, unit_axis) for k in names}
    return {k: _expand_blocks(keep_units[k], sel[k].shape, block) for k in names}


def _keep_units(units: dict, sparsity, scope: str, distribution: str, sel: dict) -> dict:
    """Masks over the unit arrays (entries, units or blocks), exact per layer or globally."""
    names = list(units)
    sizes = {k: int(np.prod(v.shape)) for k, v in units.items()}
    if scope == "global":
        s = _check_sparsity(sparsity, "sparsity")
        total = sum(sizes.values())
        kept = topk.keep_largest_global([units[k] for k in names], total - topk.pruned_count(s, total))
        return dict(zip(names, kept))
    if distribution == "erk":
        # ERK gives entries kept per kernel; units and blocks keep the same fraction.
        shapes = {k: tuple(sel[k].shape) for k in names}
        entry_keep = erk_densities(shapes, sparsity=_check_sparsity(sparsity, "sparsity"))
        keep_n = {k: math.floor(entry_keep[k] * sizes[k] / max(1, int(np.prod(shapes[k]))) + 0.5) for k in names}
    else:
        per = _per_layer_sparsity(sparsity, names)
        keep_n = {k: sizes[k] - topk.pruned_count(per[k], sizes[k]) for k in names}
    return {k: topk.keep_largest_global([units[k]], keep_n[k])[0] for k in names}


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


@functools.partial(jax.jit, static_argnames=("pattern", "block", "axis", "norm"))
def _thresholds(masks_sel: dict, sel: dict, pattern: str, block, axis, norm) -> dict:
    out = {}
    for k, v in sel.items():
        mask = masks_sel[k]
        if pattern == "structured":
            ax = -1 if axis is None else axis
            v = _units(v, ax, norm, k)
            mask = jnp.any(mask, axis=tuple(i for i in range(mask.ndim) if i != ax % mask.ndim))
        elif pattern == "block":
            v = _blocks(v, block, k)
            mask = _blocks(mask.astype(jnp.float32), block, k) > 0
        out[k] = jnp.min(jnp.where(mask, v, jnp.inf)).astype(jnp.float32)
    return out


def prune(
    params: PyTree,
    scores: PyTree,
    *,
    sparsity: float | Mapping[str, float] | None,
    selection=None,
    scope: str = "layer",
    distribution: str = "uniform",
    pattern: str = "unstructured",
    n: int = 2,
    m: int = 4,
    axis: int | None = None,
    block: tuple[int, int] = (1, 4),
    norm: str = "l1",
    existing: PyTree | None = None,
) -> tuple[PyTree, PruneAux]:
    """Prune ``params`` by ``scores``: ``make_masks`` then ``apply_masks``.

    Arguments are those of :func:`make_masks`. Returns ``(new_params, PruneAux(masks,
    scores, thresholds))``. Jit it with the hyperparameters bound (they are static).

    Example:
      >>> new, aux = prune(params, scores.taylor(params, grads), sparsity=0.8, scope='global')
    """
    jtree.check_same_structure(params, scores, "params", "scores")
    masks = make_masks(
        scores,
        sparsity=sparsity,
        selection=selection,
        scope=scope,
        distribution=distribution,
        pattern=pattern,
        n=n,
        m=m,
        axis=axis,
        block=block,
        norm=norm,
        existing=existing,
    )
    sel = _selected_scores(scores, selection)
    msel = dict(jtree.named_leaves(masks))
    thresholds = _thresholds({k: msel[k] for k in sel}, sel, pattern=pattern, block=tuple(block), axis=axis, norm=norm)
    return apply_masks(params, masks), PruneAux(masks, scores, thresholds)


def magnitude_pruning(
    *,
    sparsity: float | Mapping[str, float] | None,
    include=None,
    exclude=None,
    scope: str = "layer",
    distribution: str = "uniform",
    pattern: str = "unstructured",
    n: int = 2,
    m: int = 4,
    axis: int | None = None,
    block: tuple[int, int] = (1, 4),
    norm: str = "l1",
):
    """Factory for one-shot magnitude pruning (score ``|w|``).

    Args:
      sparsity, scope, distribution, pattern, n, m, axis, block, norm: as in
        :func:`make_masks`.
      include, exclude: which leaves to prune (regexes / predicate / bool tree, as in
        ``jcompress.tree.select``; default: kernels).

    Returns:
      ``fn(params) -> (new_params, PruneAux)``, a pure function safe to ``jax.jit``.

    Example:
      >>> new_params, aux = jax.jit(magnitude_pruning(sparsity=0.9, scope='global'))(params)
    """

    def fn(params: PyTree) -> tuple[PyTree, PruneAux]:
        selection = jtree.select(params, include, exclude)
        return prune(
            params,
            scores_lib.magnitude(params, selection=selection),
            sparsity=sparsity,
            selection=selection,
            scope=scope,
            distribution=distribution,
            pattern=pattern,
            n=n,
            m=m,
            axis=axis,
            block=block,
            norm=norm,
        )

    return fn
