"""Exact OBS / OBC row-wise pruning (Hassibi & Stork 1993; Frantar & Alistarh 2022).

For a Dense layer the output error ``||W X - W' X||^2`` separates over output units, so
each row ``w`` of ``W = kernel.T`` (one output unit, ``in`` weights) is pruned on its own
with the full inverse Hessian ``H^-1`` (``H = sum x x^T``, dampened by ``damp`` of its
mean diagonal). One weight at a time, greedily:

1. the weight with the smallest OBS loss ``w_q^2 / [H^-1]_qq`` among the remaining
   ones is removed;
2. the remaining weights take the optimal correction ``w -= (w_q / [H^-1]_qq) H^-1 e_q``;
3. ``H^-1`` is downdated to the inverse Hessian of the remaining weights,
   ``H^-1 -= H^-1 e_q e_q^T H^-1 / [H^-1]_qq`` (one Gaussian elimination step).

After ``k`` steps the weights are exactly the least-squares reconstruction for the
chosen set of ``k`` zeros (each step is exact, not an approximation), and the step
losses ``w_q^2 / (2 [H^-1]_qq)`` add up to the row's share of ``1/2 ||W X - W' X||^2``.

How many weights each row loses (``allocation``):

- ``'row'`` (default): every row removes the same ``round(sparsity * in)`` weights.
- ``'global'`` (OBC's unstructured mode): every row is first run greedily to the end,
  recording the loss of each step; the layer removes ``round(sparsity * in * out)``
  weights in all, taking the globally smallest step losses, each row's steps in their
  order (a row can only stop after a prefix of its greedy sequence, so a step is ranked
  by the largest loss up to and including it; this is the authors' rule, the smallest
  step losses of the whole layer, whenever a row's step losses do not decrease, the
  usual case). Each row is then the exact reconstruction after its own count of steps,
  so the summed loss (the layer's output error) is the smallest over per-row counts with
  that total when every row's step losses increase. Rows that matter little to the
  output (small weights, quiet inputs) lose more weights.

Cost: ``O(in^2)`` per removed weight and row with a private ``(in, in)`` inverse per row
(``'global'`` runs every row to ``in`` steps, then again to its own count), so this is for
small layers (rows are processed ``row_batch`` at a time to bound memory); SparseGPT
(:mod:`jcompress.oneshot.sparsegpt`) approximates it at scale.

Example:
  >>> params, aux = jc.oneshot.obs(stats, sparsity=0.5)(params)
  >>> params, aux = jc.oneshot.obs(stats, sparsity=0.5, allocation='global')(params)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jcompress.core import base, spec, topk
from jcompress.core.obs_loop import check_factor_ok, inverse_hessian_factor
from jcompress.core.patterns import Unstructured
from jcompress.oneshot.calibration import layer_transform, mask_tree, per_layer
from jcompress.oneshot.sparsegpt import check_sparsity

__all__ = ["ALLOCATIONS", "global_counts", "obs", "prune_matrix", "prune_row"]

ALLOCATIONS = ("row", "global")


def prune_row(
    w: jax.Array, hinv: jax.Array, k: int, *, count: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Greedy OBS on one row.

    Args:
      w: ``(in,)`` float32 weights of one output unit.
      hinv: ``(in, in)`` inverse Hessian.
      k: how many weights to remove (static), or with ``count`` the number of steps run.
      count: optional int scalar (may be traced; under ``vmap`` one per row): run only
        ``min(count, k)`` steps; the losses of the steps not run are 0.

    Returns:
      ``(new_w (in,), pruned (in,) bool, losses (k,))``.
    """

    def step(t, carry):
        w, hinv, pruned, losses = carry
        d = jnp.diag(hinv)
        score = jnp.where(pruned, jnp.inf, w**2 / jnp.where(pruned, 1.0, d))
        q = jnp.argmin(score)
        col = hinv[:, q]
        w = w - (w[q] / d[q]) * col
        w = jnp.where(pruned, 0.0, w).at[q].set(0.0)
        hinv = hinv - jnp.outer(col, col) / d[q]
        return w, hinv, pruned.at[q].set(True), losses.at[t].set(score[q] / 2)

    if k == 0:  # nothing to remove (the loop body cannot even be traced with no losses to write)
        return w, jnp.zeros(w.shape, bool), jnp.zeros((0,), w.dtype)
    init = (w, hinv, jnp.zeros(w.shape, bool), jnp.zeros((k,), w.dtype))
    w, _, pruned, losses = lax.fori_loop(0, k if count is None else jnp.minimum(count, k), step, init)
    return w, pruned, losses


@functools.partial(jax.jit, static_argnames=("k", "row_batch"))
def _prune_rows(w: jax.Array, hinv: jax.Array, *, k: int, row_batch: int):
    return lax.map(lambda row: prune_row(row, hinv, k), w, batch_size=row_batch)


@functools.partial(jax.jit, static_argnames=("k", "row_batch"))
def _prune_rows_to(w: jax.Array, hinv: jax.Array, counts: jax.Array, *, k: int, row_batch: int):
    return lax.map(lambda rc: prune_row(rc[0], hinv, k, count=rc[1]), (w, counts), batch_size=row_batch)


def global_counts(losses: jax.Array, *, total: int) -> jax.Array:
    """Per-row removal counts of OBC's global allocation.

    Args:
      losses: ``(rows, steps)`` float, the loss of every greedy step of every row, in
        step order (from :func:`prune_row` run to ``steps``).
      total: how many steps to take in all, ``0 <= total <= rows * steps``.

    Returns:
      ``(rows,)`` int32 counts summing to ``total``: the ``total`` smallest steps of the
      layer, a step ranked by the largest loss of its row up to it (so each row takes a
      prefix of its steps); ties go to the lower row, then the earlier step.

    Example:
      >>> global_counts(jnp.array([[1., 5.], [2., 3.]]), total=3)  # -> [1, 2]
    """
    rows, steps = jnp.shape(losses)
    total = spec.check_value(total, arg="total", kind=int, lo=0, hi=rows * steps)
    return _global_counts(losses, total)


@jax.jit
def _global_counts(losses: jax.Array, total: jax.Array) -> jax.Array:
    rows, steps = losses.shape
    losses = losses.astype(jnp.float32)
    key = lax.cummax(jnp.where(jnp.isnan(losses), jnp.inf, losses), axis=1).reshape(-1)  # a NaN step goes last
    order = jnp.argsort(key, stable=True)
    rank = jnp.zeros(key.shape, jnp.int32).at[order].set(jnp.arange(key.size, dtype=jnp.int32))
    return jnp.sum((rank < total).reshape(rows, steps), axis=1, dtype=jnp.int32)


def prune_matrix(
    kernel: jax.Array, h: jax.Array, *, sparsity: float, damp: float = 0.01, row_batch: int = 32, allocation: str = "row"
):
    """OBS on one Flax kernel ``(in, out)`` with ``h`` ``(in, in)``.

    ``H^-1 = U^T U`` from :func:`jcompress.core.obs_loop.inverse_hessian_factor` (the
    dampening and dead-input rule of SparseGPT and GPTQ; dead inputs' weights are zeroed).
    ``allocation`` as in :func:`obs`.

    Returns:
      ``(new_kernel (in, out) float32, keep mask (in, out) bool, losses (steps, out))``:
      with ``'row'`` ``steps = round(sparsity * in)``, every step taken; with
      ``'global'`` ``steps = in``, the losses of the steps each output unit took and 0
      after its count (the count of output ``i`` is ``in - keep[:, i].sum()``).
    """
    allocation = _check_allocation(allocation)
    n_in, n_out = kernel.shape
    u, dead = inverse_hessian_factor(h, damp=damp)
    check_factor_ok(u)
    hinv = u.T @ u
    w = jnp.where(dead[None, :], 0.0, kernel.astype(jnp.float32).T)
    if allocation == "row":
        new_w, pruned, losses = _prune_rows(w, hinv, k=topk.pruned_count(sparsity, n_in), row_batch=row_batch)
    else:
        _, _, all_losses = _prune_rows(w, hinv, k=n_in, row_batch=row_batch)
        counts = global_counts(all_losses, total=topk.pruned_count(sparsity, n_in * n_out))
        new_w, pruned, losses = _prune_rows_to(w, hinv, counts, k=n_in, row_batch=row_batch)
    return new_w.T, ~pruned.T, losses.T


def _check_allocation(allocation) -> str:
    if allocation not in ALLOCATIONS:
        raise ValueError(
            f"allocation={allocation!r} must be one of {ALLOCATIONS}: 'row' removes round(sparsity * in) weights "
            "of every output unit, 'global' spreads round(sparsity * in * out) over the units by their OBS losses"
        )
    return allocation


def obs(
    stats: dict, *, sparsity: spec.Spec = None, damp: float = 0.01, row_batch: int = 32, allocation: str = "row"
) -> base.Transform:
    """Exact greedy OBS pruning of the calibrated Dense kernels (small layers).

    Args:
      stats: ``{kernel name: LayerStats}`` from :func:`jcompress.oneshot.calibrate`; the
        transform touches these kernels (narrow them with :func:`jcompress.core.masked`).
      sparsity: fraction of the weights removed, in [0, 1): a value or a ``{regex: value}``
        spec (required). With ``allocation='row'`` each output unit (column of the
        ``(in, out)`` kernel) loses ``round(sparsity * in)``; with ``'global'`` the layer
        loses ``round(sparsity * in * out)`` spread unevenly over its output units.
      damp: diagonal dampening as a fraction of the mean of ``diag(H)``; 0 for the
        undampened problem when ``H`` is well conditioned.
      row_batch: rows solved at once (memory ``row_batch * in^2`` floats).
      allocation: ``'row'`` (the same count per output unit) or ``'global'`` (OBC: the
        counts that minimise the summed greedy losses, see the module docstring; about
        ``1 / sparsity + 1`` times the greedy steps of ``'row'``).

    Returns:
      a :class:`~jcompress.core.base.Transform`: ``(params, MaskAux)`` with params-shaped
      masks (True = kept) and relative output errors.

    Example:
      >>> params, aux = jc.oneshot.obs(stats, sparsity=0.5, allocation='global')(params)
      >>> (~aux.masks['fc']['kernel']).sum(axis=0)   # (out,) per-unit counts, summing to round(0.5 * in * out)
    """
    check_sparsity(sparsity, Unstructured())
    allocation = _check_allocation(allocation)
    damp = spec.check_value(damp, arg="damp", kind=float, lo=0.0, hi=10.0, hi_open=True)
    row_batch = spec.check_value(row_batch, arg="row_batch", kind=int, lo=1)
    sparsity_of = per_layer(sparsity, stats, arg="sparsity")

    def solve(name, kernel, h):
        new_k, keep, _ = prune_matrix(
            kernel, h, sparsity=sparsity_of(name), damp=damp, row_batch=row_batch, allocation=allocation
        )
        return new_k, {"mask": keep}

    def make_aux(params, extras, errors):
        return base.MaskAux(mask_tree(params, {n: e["mask"] for n, e in extras.items()}), None, errors)

    return layer_transform(stats, solve, make_aux, name="obs")
