"""The OBS column loop shared by SparseGPT, GPTQ and OBS (Frantar & Alistarh 2022, 2023).

A Dense layer ``y = x @ K`` is compressed in the papers' terms with ``W = K.T`` ``(rows
= outputs, cols = inputs)`` and ``H = sum x x^T`` ``(cols, cols)`` of the calibration
inputs. ``U`` is the upper Cholesky factor of the dampened inverse,
``U^T U = (H + damp * mean(diag H) I)^-1`` (:func:`inverse_hessian_factor`). The loop
visits the columns of ``W`` (the rows of ``K``) left to right, block by block; for
column ``i``:

1. ``q`` = the column with its pruned entries set to 0 and, when a grid is given, the
   kept entries rounded to their row's grid (:mod:`jcompress.core.grid`);
2. ``err = (w - q) / U_ii`` and ``W[:, i:] -= err U[i, i:]`` inside the block, so the
   columns not yet visited absorb the error;
3. after the block: ``W[:, end:] -= Err U[block, end:]`` (the lazy batched update).

What is pruned: in each block the ``counts[b]`` entries of smallest OBS saliency
``w^2 / U_ii^2`` over all rows together (unstructured SparseGPT); for N:M, the smallest
``m - n`` of every ``m`` columns in each row, chosen when the loop reaches the group;
and always the entries of a fixed mask (``fixed``: GPTQ keeps exact zeros at zero).

Speed: the loop works on the kernel ``K`` itself (one weight column of ``W`` per row of
``K``, so every block, sub-block and tile it reads or writes is contiguous, and the
caller needs no transposes), in three jitted programs per block (slice the block; solve
it; write it back and apply the lazy update) that take the block's first column as a
traced argument, so a layer compiles one set for its full blocks and at most one more
for a narrower last block, however many blocks it has. Grids are kept per group
(``(groups, out)`` and each input's group), gathered per block, never broadcast to the
kernel's shape. Inside a block the columns go in sub-blocks of 16: each column's error
updates only its sub-block (a cache-sized array, instead of the whole block per
column), and each sub-block's errors reach the rest of the block in one small matmul.
The lazy update touches only the columns after the block, in fixed-width tiles (a
traced trip count), in place on the loop's own copy. The unstructured mask comes from
:func:`jcompress.core.topk.remove_smallest` (bisection on the scores' bits: an XLA sort
of the block's ~100k scores on CPU cost more than all its OBS updates), and is not
compiled at all when ``counts`` is ``None``.

Example:
  >>> u, dead = inverse_hessian_factor(h, damp=0.01)
  >>> counts = block_prune_counts(kernel.shape[1], kernel.shape[0], 128, 0.5)
  >>> new_kernel, pruned, _, _ = obs_column_loop(kernel, u, block=128, counts=counts)
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
from jax import lax

from jcompress.core import grid, topk

__all__ = ["block_prune_counts", "check_factor_ok", "inverse_hessian_factor", "obs_column_loop"]

_INVERSE_LEAF = 512  # triangular inverses up to this size go to one triangular solve


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
    ``H^-1`` and factor it again. ``L^-1`` is computed by halves,
    ``[[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]``, down to blocks of
    ``_INVERSE_LEAF``: matrix products at full float32 precision do the work, ``n^3 / 3``
    multiply-adds against a triangular solve's ``n^3 / 2`` for the ``n`` columns of the
    identity.
    """
    h = h.astype(jnp.float32)
    diag = jnp.diag(h)
    dead = diag == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(h.shape[0], dtype=h.dtype)
    chol = jnp.linalg.cholesky(h[::-1, ::-1])
    return _lower_inverse(chol)[::-1, ::-1], dead


def _lower_inverse(l: jax.Array) -> jax.Array:
    """The inverse of a lower triangular ``l`` (by halves; see :func:`inverse_hessian_factor`)."""
    n = l.shape[0]
    if n <= _INVERSE_LEAF:
        return jax.scipy.linalg.solve_triangular(l, jnp.eye(n, dtype=l.dtype), lower=True)
    k = n // 2 if n < 256 else n // 2 // 128 * 128  # large matrices split at a multiple of 128
    a_inv, c_inv = _lower_inverse(l[:k, :k]), _lower_inverse(l[k:, k:])
    highest = lax.Precision.HIGHEST  # accelerators' default matmul precision is too coarse for a factor
    b = -jnp.matmul(c_inv, jnp.matmul(l[k:, :k], a_inv, precision=highest), precision=highest)
    return jnp.block([[a_inv, jnp.zeros((k, n - k), l.dtype)], [b, c_inv]])


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
    kernel: jax.Array,
    u: jax.Array,
    *,
    block: int,
    counts: tuple | None = None,
    n_m: tuple[int, int] | None = None,
    fixed: jax.Array | None = None,
    quant: tuple[int, bool] | None = None,
    scale: jax.Array | None = None,
    zero_point: jax.Array | None = None,
    group_of: jax.Array | None = None,
    regrid: int | None = None,
):
    """The column loop on a Flax kernel ``K`` ``(in, out)`` (``W = K.T``); see the module docstring.

    Args:
      kernel: ``(in, out)`` float32 weights: row ``i`` is column ``i`` of ``W``.
      u: ``(in, in)`` upper Cholesky factor of ``H^-1``.
      block: inputs (columns of ``W``) per block.
      counts: weights to prune in each block (unstructured), or ``None`` (no unstructured
        selection is compiled at all).
      n_m: ``(n, m)``: keep ``n`` of every ``m`` consecutive inputs of each output, or ``None``.
      fixed: ``(in, out)`` bool, entries always pruned (set to 0), or ``None``.
      quant: ``(bits, symmetric)`` to round the kept weights to a grid, or ``None``.
      scale, zero_point: ``(groups, out)`` float32 / int32 grids, used with ``quant``
        (``None`` with ``regrid``: the loop makes them).
      group_of: ``(in,)`` int32, the grid row each input is rounded on; ``None``: row
        ``i // regrid`` with ``regrid``, else row 0 (one grid per output).
      regrid: a group size: at the start of each block, every group of ``regrid`` inputs
        starting inside it gets its grids from the weights as they are then (all earlier
        blocks' updates applied), as the reference GPTQ does; ``None`` keeps
        ``scale``/``zero_point`` as given.

    Returns:
      ``(new_kernel, pruned, scale, zero_point)``: ``(in, out)`` float32, ``(in, out)``
      bool (True where set to zero), and the grids the loop used (``None`` without
      ``quant``).
    """
    cols, rows = kernel.shape
    # The loop's own copy: the lazy updates write into it in place (donated).
    w_t = jnp.array(kernel, jnp.float32, copy=True)
    if quant is not None:
        if regrid is not None:
            n_groups = -(-cols // regrid)
            scale = jnp.zeros((n_groups, rows), jnp.float32) if scale is None else scale
            zero_point = jnp.zeros((n_groups, rows), jnp.int32) if zero_point is None else zero_point
            group_of = jnp.arange(cols, dtype=jnp.int32) // regrid if group_of is None else group_of
        elif group_of is None:
            group_of = jnp.zeros(cols, jnp.int32)
    pruned_blocks = []
    for b, b0 in enumerate(range(0, cols, block)):
        b1 = min(b0 + block, cols)
        if quant is not None and regrid is not None:
            for g0 in range(-(-b0 // regrid) * regrid, b1, regrid):
                s, z = grid.range_grid(w_t[g0 : g0 + regrid], axis=0, bits=quant[0], symmetric=quant[1])
                scale, zero_point = scale.at[g0 // regrid].set(s[0]), zero_point.at[g0 // regrid].set(z[0])
        count = None if counts is None else jnp.int32(counts[b])
        grids = None if quant is None else (scale, zero_point, group_of)
        w_t, pruned1_t = _block_step(w_t, u, jnp.int32(b0), count, fixed, grids, width=b1 - b0, n_m=n_m, quant=quant)
        pruned_blocks.append(pruned1_t)
    return w_t, jnp.concatenate(pruned_blocks, axis=0), scale, zero_point


def _block_step(w_t, u, b0, count, fixed_t, grids, *, width, n_m, quant):
    """One block at input offset ``b0`` of the kernel-layout weights ``w_t`` ``(in, out)``:
    solve it, write it back and apply the lazy update: ``(w_t, pruned1_t)``.

    The offset is a traced argument of the compiled slicing and update programs, not a
    constant, so each compiles once for all blocks of the same ``width`` (all blocks but a
    narrower last one); compiling per-block slices and updates cost seconds per layer shape.
    """
    w1_t, u1, fixed1_t, grid1_t = _block_inputs(w_t, u, b0, fixed_t, grids, width=width)
    w1_t, pruned1_t, err1_t = _solve_block(w1_t, u1, count, fixed1_t, grid1_t, n_m=n_m, quant=quant)
    return _lazy_update(w_t, w1_t, err1_t, u, b0), pruned1_t


@functools.partial(jax.jit, static_argnames=("width",))
def _block_inputs(w_t, u, b0, fixed_t, grids, *, width):
    """The block's inputs ``b0 : b0 + width`` of the weights, ``fixed`` and the grids
    (``(width, out)`` each, the grids gathered by ``group_of``), and ``U``'s diagonal block."""

    def cols_of(x):
        return lax.dynamic_slice_in_dim(x, b0, width, axis=0)

    u1 = lax.dynamic_slice(u, (b0, b0), (width, width))
    fixed1 = None if fixed_t is None else cols_of(fixed_t)
    grid1 = None
    if grids is not None:
        scale, zero_point, group_of = grids
        groups = cols_of(group_of)
        grid1 = (scale[groups], zero_point[groups])
    return cols_of(w_t), u1, fixed1, grid1


_TILE = 256  # columns per tile of the lazy update


@functools.partial(jax.jit, donate_argnums=0)
def _lazy_update(w_t, w1_t, err1_t, u, b0):
    """Write the finished block at ``b0`` and apply ``W[:, end:] -= Err U[block, end:]``.

    ``w_t`` ``(in, out)`` is updated in place (donated). The columns after the block go
    in tiles of ``_TILE`` from the last column down, one small matmul each, as many tiles
    as the block leaves (a traced trip count, so one program serves all offsets); the
    first tile is clipped to the matrix, and the rows of ``U`` it shares with the block
    or with the previous tile are zeroed so no column is updated twice.
    """
    width, cols = w1_t.shape[0], w_t.shape[0]
    tile = min(_TILE, cols)
    end = b0 + width
    w_t = lax.dynamic_update_slice_in_dim(w_t, w1_t, b0, axis=0)
    u_cols = lax.dynamic_slice_in_dim(u, b0, width, axis=0).T  # (cols, width): U[block, :]^T
    u_cols = jnp.where((jnp.arange(cols) >= end)[:, None], u_cols, 0.0)

    def one_tile(k, w_t):
        stop = cols - k * tile
        start = jnp.maximum(stop - tile, 0)
        u_tile = lax.dynamic_slice_in_dim(u_cols, start, tile, axis=0)
        u_tile = jnp.where((start + jnp.arange(tile) < stop)[:, None], u_tile, 0.0)
        w_tile = lax.dynamic_slice_in_dim(w_t, start, tile, axis=0)
        return lax.dynamic_update_slice_in_dim(w_t, w_tile - u_tile @ err1_t, start, axis=0)

    return lax.fori_loop(0, (cols - end + tile - 1) // tile, one_tile, w_t)


_SUB = 16  # columns per sub-block of the in-block loop


def _sub_width(width: int, n_m) -> int:
    """Sub-block width: ``_SUB`` rounded up to a multiple of ``m`` (N:M groups stay whole),
    at most the block."""
    m = 1 if n_m is None else n_m[1]
    return min(-(-_SUB // m) * m, width)


@functools.partial(jax.jit, static_argnames=("n_m", "quant"))
def _solve_block(w1_t, u1, count, fixed1_t, grid1_t, *, n_m, quant):
    """Mask selection and column-by-column OBS updates inside one block, on its transposed
    columns ``w1_t`` ``(width, rows)``: ``(w1_t, pruned1_t, err1_t)``, each ``(width, rows)``.

    Two levels, so each column's update touches a cache-sized array: the columns go in
    sub-blocks of ``_sub_width`` columns; inside a sub-block each column's error is pushed
    onto the sub-block's later columns one by one, and after it the sub-block's errors go
    onto the rest of the block at once (``W1[rest] -= U1[sub, rest]^T Err_sub``), as the
    lazy update does for blocks. A block whose width is not a multiple of the sub-block
    is padded with zero columns whose ``U`` rows and columns are those of the identity:
    their error is 0 and they receive none.
    """
    width, rows = w1_t.shape
    d = jnp.diag(u1)
    pruned_t = jnp.zeros(w1_t.shape, bool)
    if count is not None:  # unstructured: the block's `count` smallest scores, over all rows
        score = w1_t.T**2 / d[None, :] ** 2
        pruned_t = topk.remove_smallest(score, count).T
    if fixed1_t is not None:
        pruned_t = pruned_t | fixed1_t
    sub = _sub_width(width, n_m)
    pad = -width % sub
    w_t = jnp.pad(w1_t, ((0, pad), (0, 0)))
    pruned_t = jnp.pad(pruned_t, ((0, pad), (0, 0)))
    u_p = jnp.pad(u1, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(width + pad) >= width).astype(u1.dtype)
    d = jnp.diag(u_p)
    scale_t = zero_t = None
    if grid1_t is not None:
        scale_t = jnp.pad(grid1_t[0], ((0, pad), (0, 0)), constant_values=1.0)
        zero_t = jnp.pad(grid1_t[1], ((0, pad), (0, 0)))

    def nm_mask(j, ws, ps, ds):
        n, m = n_m
        group = lax.dynamic_slice_in_dim(ws, j, m) ** 2 / lax.dynamic_slice_in_dim(ds, j, m)[:, None] ** 2
        group_pruned = lax.dynamic_slice_in_dim(ps, j, m) | topk.remove_smallest(group, m - n, axis=0)
        return lax.dynamic_update_slice_in_dim(ps, group_pruned, j, axis=0)  # a fixed mask stays pruned

    def sub_block(s, carry):
        w_t, pruned_t, err_t = carry
        s0 = s * sub

        def rows_of(x):
            return lax.dynamic_slice_in_dim(x, s0, sub, axis=0)

        us = lax.dynamic_slice(u_p, (s0, s0), (sub, sub))
        ds = jnp.diag(us)
        grid_s = None if scale_t is None else (rows_of(scale_t), rows_of(zero_t))

        def column(j, carry):
            ws, ps, qs, es = carry
            if n_m is not None:
                ps = lax.cond(j % n_m[1] == 0, nm_mask, lambda j, w, p, d: p, j, ws, ps, ds)
            col = ws[j]
            q = col
            if quant is not None:
                codes = grid.round_codes(col, grid_s[0][j], grid_s[1][j], bits=quant[0], symmetric=quant[1])
                q = (codes - grid_s[1][j]).astype(jnp.float32) * grid_s[0][j]
            q = jnp.where(ps[j], 0.0, q)
            e = (col - q) / ds[j]
            # U is upper triangular: columns < j are untouched. The finished columns go to
            # `qs`, not back into `ws`: writing into the array the column was read from
            # made XLA copy the whole carry every iteration.
            ws = ws - us[j][:, None] * e[None, :]
            return ws, ps, qs.at[j].set(q), es.at[j].set(e)

        zeros = jnp.zeros((sub, rows), w_t.dtype)
        _, ps, qs, es = lax.fori_loop(0, sub, column, (rows_of(w_t), rows_of(pruned_t), zeros, zeros))
        w_t = lax.dynamic_update_slice_in_dim(w_t, qs, s0, axis=0)
        # the rest of the block: U's sub-block rows, zero up to the sub-block's end
        u_rest = lax.dynamic_slice_in_dim(u_p, s0, sub, axis=0)
        u_rest = jnp.where(jnp.arange(width + pad)[None, :] >= s0 + sub, u_rest, 0.0)
        w_t = w_t - u_rest.T @ es
        return (
            w_t,
            lax.dynamic_update_slice_in_dim(pruned_t, ps, s0, axis=0),
            lax.dynamic_update_slice_in_dim(err_t, es, s0, axis=0),
        )

    carry = (w_t, pruned_t, jnp.zeros_like(w_t))
    w_t, pruned_t, err_t = lax.fori_loop(0, (width + pad) // sub, sub_block, carry)
    return w_t[:width], pruned_t[:width], err_t[:width]
