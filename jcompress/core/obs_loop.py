"""The OBS column loop shared by SparseGPT, GPTQ and OBS (Frantar & Alistarh 2022, 2023).

A Dense layer ``y = x @ K`` is compressed in the papers' layout ``W = K.T`` ``(rows =
outputs, cols = inputs)``, with ``H = sum x x^T`` ``(cols, cols)`` of the calibration
inputs. ``U`` is the upper Cholesky factor of the dampened inverse,
``U^T U = (H + damp * mean(diag H) I)^-1`` (:func:`inverse_hessian_factor`). The loop
visits the columns left to right, block by block; for column ``i``:

1. ``q`` = the column with its pruned entries set to 0 and, when a grid is given, the
   kept entries rounded to their row's grid (:mod:`jcompress.core.grid`);
2. ``err = (w - q) / U_ii`` and ``W[:, i:] -= err U[i, i:]`` inside the block, so the
   columns not yet visited absorb the error;
3. after the block: ``W[:, end:] -= Err U[block, end:]`` (the lazy batched update).

What is pruned: in each block the ``counts[b]`` entries of smallest OBS saliency
``w^2 / U_ii^2`` over all rows together (unstructured SparseGPT); for N:M, the smallest
``m - n`` of every ``m`` columns in each row, chosen when the loop reaches the group;
and always the entries of a fixed mask (``fixed``: GPTQ keeps exact zeros at zero).

Speed: each block is one jitted function (a ``lax.fori_loop`` over its columns, then the
lazy update) taking the block's first column as a traced argument, so a layer compiles one
program for its full blocks and at most one more for a narrower last block, however many
blocks it has; its mask comes from :func:`jcompress.core.topk.remove_smallest` (bisection
on the scores' bits: an XLA sort of the block's ~100k scores on CPU cost more than all its
OBS updates).

Example:
  >>> u, dead = inverse_hessian_factor(h, damp=0.01)
  >>> new_w, pruned, _, _ = obs_column_loop(w, u, block=128, counts=block_prune_counts(*w.shape, 128, 0.5))
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
from jax import lax

from jcompress.core import grid, topk

__all__ = ["block_prune_counts", "check_factor_ok", "inverse_hessian_factor", "obs_column_loop"]


def inverse_hessian_factor(h: jax.Array, *, damp: float) -> tuple[jax.Array, jax.Array]:
    """``(U, dead)``: upper Cholesky factor of the dampened ``H^-1`` and the dead-input mask.

    Args:
      h: ``(in, in)`` float32, ``sum x x^T``.
      damp: fraction of the mean diagonal added to the diagonal (0.01 in the papers).

    Returns:
      ``U`` ``(in, in)`` upper triangular with ``U^T U = (H + damp * mean(diag H) I)^-1``
      (``H_ii`` of dead inputs set to 1 first) and ``dead`` ``(in,)`` bool.

    One Cholesky factorisation and one triangular inverse: with ``J`` the order-reversing
    permutation and ``J H J = L L^T``, ``H^-1 = J L^-T L^-1 J``, so ``U = J L^-1 J`` (upper
    triangular, positive diagonal) satisfies ``U^T U = H^-1``, with no need to form
    ``H^-1`` and factor it again.
    """
    h = h.astype(jnp.float32)
    diag = jnp.diag(h)
    dead = diag == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(h.shape[0], dtype=h.dtype)
    chol = jnp.linalg.cholesky(h[::-1, ::-1])
    chol_inv = jax.scipy.linalg.solve_triangular(chol, jnp.eye(h.shape[0], dtype=h.dtype), lower=True)
    return chol_inv[::-1, ::-1], dead


def check_factor_ok(u: jax.Array) -> None:
    """ValueError when the Cholesky factor is not finite (concrete values only)."""
    ok = jnp.all(jnp.isfinite(u))
    if not isinstance(ok, jax.core.Tracer) and not bool(ok):
        raise ValueError("the dampened H is not positive definite (Cholesky failed); raise damp= (e.g. 0.1)")


def block_prune_counts(rows: int, cols: int, block: int, sparsity: float) -> tuple[int, ...]:
    """Zeros per block of ``block`` columns so that the total is exactly ``round(sparsity * rows * cols)``
    (cumulative rounding, halves up as :func:`jcompress.core.topk.pruned_count`)."""
    ends = list(range(block, cols, block)) + [cols]
    cum = [0] + [topk.pruned_count(sparsity, rows * e) for e in ends]
    return tuple(b - a for a, b in itertools.pairwise(cum))


def obs_column_loop(
    w: jax.Array,
    u: jax.Array,
    *,
    block: int,
    counts: tuple | None = None,
    n_m: tuple[int, int] | None = None,
    fixed: jax.Array | None = None,
    quant: tuple[int, bool] | None = None,
    scale: jax.Array | None = None,
    zero_point: jax.Array | None = None,
    regrid: int | None = None,
):
    """The column loop on ``W`` ``(rows, cols)`` (papers' layout); see the module docstring.

    Args:
      w: ``(rows, cols)`` float32 weights.
      u: ``(cols, cols)`` upper Cholesky factor of ``H^-1``.
      block: columns per block.
      counts: weights to prune in each block (unstructured), or ``None``.
      n_m: ``(n, m)``: keep ``n`` of every ``m`` consecutive columns of each row, or ``None``.
      fixed: ``(rows, cols)`` bool, entries always pruned (set to 0), or ``None``.
      quant: ``(bits, symmetric)`` to round the kept weights to a grid, or ``None``.
      scale, zero_point: ``(rows, cols)`` float32 / int32, the grid of every weight
        (its row's grid, or its row-and-group grid), used with ``quant``.
      regrid: a group size: at the start of each block, every group of ``regrid`` columns
        starting inside it gets its row grids from the weights as they are then (all
        earlier blocks' updates applied), as the reference GPTQ does; ``None`` keeps
        ``scale``/``zero_point`` as given.

    Returns:
      ``(new_w, pruned, scale, zero_point)``: ``(rows, cols)`` float32, bool (True where set
      to zero), and the grids the loop used (``None`` without ``quant``).
    """
    cols = w.shape[1]
    if quant is not None and regrid is not None:
        scale = jnp.zeros(w.shape, jnp.float32) if scale is None else scale
        zero_point = jnp.zeros(w.shape, jnp.int32) if zero_point is None else zero_point
    pruned_blocks = []
    for b, b0 in enumerate(range(0, cols, block)):
        b1 = min(b0 + block, cols)
        if quant is not None and regrid is not None:
            for g0 in range(-(-b0 // regrid) * regrid, b1, regrid):
                s, z = grid.range_grid(w[:, g0 : g0 + regrid], axis=1, bits=quant[0], symmetric=quant[1])
                width = min(regrid, cols - g0)
                scale = scale.at[:, g0 : g0 + width].set(jnp.broadcast_to(s, (w.shape[0], width)))
                zero_point = zero_point.at[:, g0 : g0 + width].set(jnp.broadcast_to(z, (w.shape[0], width)))
        count = jnp.int32(0 if counts is None else counts[b])
        grids = None if quant is None else (scale, zero_point)
        w, pruned1 = _block_step(w, u, jnp.int32(b0), count, fixed, grids, width=b1 - b0, n_m=n_m, quant=quant)
        pruned_blocks.append(pruned1)
    return w, jnp.concatenate(pruned_blocks, axis=1), scale, zero_point


def _block_step(w, u, b0, count, fixed, grids, *, width, n_m, quant):
    """One block at column offset ``b0``: solve it, write it back and apply the lazy update
    ``W[:, end:] -= Err U[block, end:]``: ``(w, pruned1)``.

    The offset is a traced argument of the compiled slicing and update programs, not a
    constant, so each compiles once for all blocks of the same ``width`` (all blocks but a
    narrower last one); compiling per-block slices and updates cost seconds per layer shape.
    """
    w1, u1, fixed1, grid1 = _block_inputs(w, u, b0, fixed, grids, width=width)
    w1, pruned1, err1 = _solve_block(w1, u1, count, fixed1, grid1, n_m=n_m, quant=quant)
    return _lazy_update(w, w1, err1, u, b0), pruned1


@functools.partial(jax.jit, static_argnames=("width",))
def _block_inputs(w, u, b0, fixed, grids, *, width):
    """The block's columns ``b0 : b0 + width`` of ``w``, ``fixed`` and the grids, and ``U``'s
    diagonal block."""
    def cols_of(x):
        return lax.dynamic_slice_in_dim(x, b0, width, axis=1)

    u1 = lax.dynamic_slice(u, (b0, b0), (width, width))
    fixed1 = None if fixed is None else cols_of(fixed)
    grid1 = None if grids is None else (cols_of(grids[0]), cols_of(grids[1]))
    return cols_of(w), u1, fixed1, grid1


@jax.jit
def _lazy_update(w, w1, err1, u, b0):
    """Write the finished block at ``b0`` and apply ``W[:, end:] -= Err U[block, end:]``.

    ``Err`` is multiplied by ``U``'s whole block rows (zero before ``b0``: ``U`` is upper
    triangular) and the product kept only after the block, so the shapes do not depend on
    ``b0``."""
    width = w1.shape[1]
    u_rows = lax.dynamic_slice_in_dim(u, b0, width, axis=0)
    w = lax.dynamic_update_slice_in_dim(w, w1, b0, axis=1)
    later = jnp.arange(w.shape[1]) >= b0 + width
    return jnp.where(later[None, :], w + -(err1 @ u_rows), w)


@functools.partial(jax.jit, static_argnames=("n_m", "quant"))
def _solve_block(w1, u1, count, fixed1, grid1, *, n_m, quant):
    """Mask selection and column-by-column OBS updates inside one block: ``(w1, pruned1, err1)``.

    The loop runs on the transposed block (one weight column per row of the array), so
    every column it reads or writes is contiguous in memory.
    """
    d = jnp.diag(u1)
    score = w1**2 / d[None, :] ** 2  # unstructured: the block's `count` smallest scores, over all rows
    pruned_t = topk.remove_smallest(score, count).T
    if fixed1 is not None:
        pruned_t = pruned_t | fixed1.T

    def nm_mask(i, w_t, pruned_t):
        n, m = n_m
        group = lax.dynamic_slice_in_dim(w_t, i, m) ** 2 / lax.dynamic_slice_in_dim(d, i, m)[:, None] ** 2
        return lax.dynamic_update_slice_in_dim(pruned_t, topk.remove_smallest(group, m - n, axis=0), i, axis=0)

    def column(i, carry):
        w_t, pruned_t, err_t = carry
        if n_m is not None:
            pruned_t = lax.cond(i % n_m[1] == 0, nm_mask, lambda i, w, p: p, i, w_t, pruned_t)
        col = w_t[i]
        q = col
        if quant is not None:
            codes = grid.round_codes(col, scale_t[i], zero_t[i], bits=quant[0], symmetric=quant[1])
            q = (codes - zero_t[i]).astype(jnp.float32) * scale_t[i]
        q = jnp.where(pruned_t[i], 0.0, q)
        e = (col - q) / d[i]
        w_t = w_t - u1[i][:, None] * e[None, :]  # U is upper triangular: columns < i are untouched
        return w_t.at[i].set(q), pruned_t, err_t.at[i].set(e)

    scale_t, zero_t = (None, None) if grid1 is None else (grid1[0].T, grid1[1].T)
    w_t, pruned_t, err_t = lax.fori_loop(0, w1.shape[1], column, (w1.T, pruned_t, jnp.zeros_like(w1.T)))
    return w_t.T, pruned_t.T, err_t.T
