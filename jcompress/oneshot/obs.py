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
chosen set of ``k`` zeros (each step is exact, not an approximation). Every row removes
the same ``round(sparsity * in)`` weights. Cost: ``O(in^2)`` per removed weight and row
with a private ``(in, in)`` inverse per row, so this is for small layers (rows are
processed ``row_batch`` at a time to bound memory); SparseGPT
(:mod:`jcompress.oneshot.sparsegpt`) approximates it at scale.

Example:
  >>> params, aux = jc.oneshot.obs(stats, sparsity=0.5)(params)
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

__all__ = ["obs", "prune_matrix", "prune_row"]


def prune_row(w: jax.Array, hinv: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Greedy OBS on one row.

    Args:
      w: ``(in,)`` float32 weights of one output unit.
      hinv: ``(in, in)`` inverse Hessian.
      k: how many weights to remove (static).

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
    w, _, pruned, losses = lax.fori_loop(0, k, step, init)
    return w, pruned, losses


@functools.partial(jax.jit, static_argnames=("k", "row_batch"))
def _prune_rows(w: jax.Array, hinv: jax.Array, *, k: int, row_batch: int):
    return lax.map(lambda row: prune_row(row, hinv, k), w, batch_size=row_batch)


def prune_matrix(kernel: jax.Array, h: jax.Array, *, sparsity: float, damp: float = 0.01, row_batch: int = 32):
    """OBS on one Flax kernel ``(in, out)`` with ``h`` ``(in, in)``.

    ``H^-1 = U^T U`` from :func:`jcompress.core.obs_loop.inverse_hessian_factor` (the
    dampening and dead-input rule of SparseGPT and GPTQ; dead inputs' weights are zeroed).

    Returns:
      ``(new_kernel (in, out) float32, keep mask (in, out) bool, losses (k, out))``.
    """
    n_in = kernel.shape[0]
    k = topk.pruned_count(sparsity, n_in)
    u, dead = inverse_hessian_factor(h, damp=damp)
    check_factor_ok(u)
    hinv = u.T @ u
    w = jnp.where(dead[None, :], 0.0, kernel.astype(jnp.float32).T)
    new_w, pruned, losses = _prune_rows(w, hinv, k=k, row_batch=row_batch)
    return new_w.T, ~pruned.T, losses.T


def obs(stats: dict, *, sparsity: spec.Spec = None, damp: float = 0.01, row_batch: int = 32) -> base.Transform:
    """Exact greedy OBS pruning of the calibrated Dense kernels (small layers).

    Args:
      stats: ``{kernel name: LayerStats}`` from :func:`jcompress.oneshot.calibrate`; the
        transform touches these kernels (narrow them with :func:`jcompress.core.masked`).
      sparsity: fraction of each output unit's weights removed, in [0, 1): a value or a
        ``{regex: value}`` spec (required).
      damp: diagonal dampening as a fraction of the mean of ``diag(H)``; 0 for the
        undampened problem when ``H`` is well conditioned.
      row_batch: rows solved at once (memory ``row_batch * in^2`` floats).

    Returns:
      a :class:`~jcompress.core.base.Transform`: ``(params, MaskAux)`` with params-shaped
      masks (True = kept) and relative output errors.

    Example:
      >>> params, aux = jc.oneshot.obs(stats, sparsity=0.5)(params)
    """
    check_sparsity(sparsity, Unstructured())
    damp = spec.check_value(damp, arg="damp", kind=float, lo=0.0, hi=10.0, hi_open=True)
    row_batch = spec.check_value(row_batch, arg="row_batch", kind=int, lo=1)
    sparsity_of = per_layer(sparsity, stats, arg="sparsity")

    def solve(name, kernel, h):
        new_k, keep, _ = prune_matrix(kernel, h, sparsity=sparsity_of(name), damp=damp, row_batch=row_batch)
        return new_k, {"mask": keep}

    def make_aux(params, extras, errors):
        return base.MaskAux(mask_tree(params, {n: e["mask"] for n, e in extras.items()}), None, errors)

    return layer_transform(stats, solve, make_aux, name="obs")
