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
  >>> new_params, aux = prune(params, stats, sparsity=0.5)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jcompress import tree
from jcompress.oneshot import calibration

__all__ = ["OBSAux", "prune", "prune_matrix", "prune_row"]


class OBSAux(NamedTuple):
    """Per-layer results keyed by kernel name.

    Attributes:
      masks: bool ``(in, out)``, True where kept.
      errors: float32 relative output error ``||X K - X K'||^2 / ||X K||^2``.
      losses: ``(k, out)`` float32, the OBS loss ``w_q^2 / (2 [H^-1]_qq)`` of each removal
        in order (their sum is half the output error of the row on the dampened H).
    """

    masks: dict
    errors: dict
    losses: dict


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

    init = (w, hinv, jnp.zeros(w.shape, bool), jnp.zeros((k,), w.dtype))
    w, _, pruned, losses = lax.fori_loop(0, k, step, init)
    return w, pruned, losses


@functools.partial(jax.jit, static_argnames=("k", "row_batch"))
def _prune_rows(w: jax.Array, hinv: jax.Array, *, k: int, row_batch: int):
    return lax.map(lambda row: prune_row(row, hinv, k), w, batch_size=row_batch)


def prune_matrix(kernel: jax.Array, h: jax.Array, *, sparsity: float, damp: float = 0.01, row_batch: int = 32):
    """OBS on one Flax kernel ``(in, out)`` with ``h`` ``(in, in)``.

    Returns:
      ``(new_kernel (in, out) float32, keep mask (in, out) bool, losses (k, out))``.
    """
    if not (isinstance(sparsity, (int, float)) and 0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"sparsity={sparsity!r} must be a float in [0, 1)")
    n_in = kernel.shape[0]
    k = round(float(sparsity) * n_in)
    h = h.astype(jnp.float32)
    h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(n_in, dtype=h.dtype)
    hinv = jnp.linalg.inv(h)
    if not isinstance(hinv, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(hinv))):
        raise ValueError("H is singular even after dampening; raise damp= (e.g. 0.1)")
    new_w, pruned, losses = _prune_rows(kernel.astype(jnp.float32).T, hinv, k=k, row_batch=row_batch)
    return new_w.T, ~pruned.T, losses.T


def prune(
    params: tree.PyTree,
    stats: dict,
    *,
    sparsity: float,
    damp: float = 0.01,
    row_batch: int = 32,
    include: tree.Selection = None,
) -> tuple[tree.PyTree, OBSAux]:
    """Exact greedy OBS pruning of the calibrated Dense kernels of ``params``.

    Args:
      params: parameter pytree (dict or NNX State); only kernels named in ``stats``
        (narrowed by ``include``) change.
      stats: ``{kernel name: LayerStats}`` from
        :func:`jcompress.oneshot.calibration.linear_input_stats`.
      sparsity: fraction of each output unit's weights removed, in [0, 1).
      damp: diagonal dampening as a fraction of the mean of ``diag(H)``; use 0 for the
        undampened problem when ``H`` is well conditioned.
      row_batch: rows solved at once (memory ``row_batch * in^2`` floats).
      include: optional selection narrowing the calibrated layers.

    Returns:
      ``(new_params, OBSAux)``.
    """

    def one(name, kernel, h):
        new_k, keep, losses = prune_matrix(kernel, h, sparsity=sparsity, damp=damp, row_batch=row_batch)
        return new_k, {"mask": keep, "losses": losses}

    new_params, extras = calibration.map_layers(params, stats, include, one)
    return new_params, OBSAux(
        masks={n: e["mask"] for n, e in extras.items()},
        errors={n: e["error"] for n, e in extras.items()},
        losses={n: e["losses"] for n, e in extras.items()},
    )
