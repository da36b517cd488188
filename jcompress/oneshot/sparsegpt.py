"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with OBS weight updates.

For one Dense layer with weight ``W = kernel.T`` (``(out, in)``, the papers' layout) and
calibration statistic ``H = sum x x^T`` (``(in, in)``, from
:func:`jcompress.oneshot.calibration.linear_input_stats`), SparseGPT approximately solves
``min ||W X - W' X||^2`` over ``W'`` with the required zeros:

1. dampen ``H`` by ``damp`` (1%) of its mean diagonal; a column that never saw input
   (``H_ii = 0``) gets ``H_ii = 1`` and its weights are zeroed, as in the reference code;
2. ``U`` = the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``);
3. go through the columns (inputs) in blocks of ``block_size`` (128). At the start of a
   block, pick its pruned weights by the OBS saliency ``w^2 / U_ii^2`` (the smallest
   ones; for N:M, the smallest ``M - N`` of each group of ``M`` columns in every row,
   chosen when the loop reaches the group);
4. for each column ``i``: ``q`` = the column with its pruned entries set to 0 (and, for
   joint quantization, the kept entries rounded to the row's fixed grid),
   ``err = (w - q) / U_ii`` and ``W[:, i:] -= err U[i, i:]`` (within the block), so the
   not-yet-visited columns absorb the error;
5. after the block: ``W[:, end:] -= Err U[block, end:]`` (the lazy batched update).

Unstructured sparsity is exact: the number of zeros in a layer is
``round(sparsity * in * out)`` (spread over blocks by cumulative rounding; inside a block
the smallest scores are taken over all rows together, as the reference does). N:M
(``n_m=(2, 4)``) means at most ``N`` nonzeros in every ``M`` consecutive inputs of each
output unit (hardware 2:4 sparsity).

Speed: each block is one jitted function (a ``lax.fori_loop`` over its columns, compiled
once per block shape however many blocks a layer has), its mask is found by bisection on
the scores' bits (:func:`jcompress.core.topk.remove_smallest`; an XLA sort of the block's
~100k scores on CPU cost more than all of the block's OBS updates), and each lazy update
multiplies exactly the remaining columns. Its speed against a plain numpy/scipy implementation of the
same algorithm is measured by ``jcompress.bench.b4_sparsegpt`` (see BENCHMARKS.md).

Example:
  >>> stats = calibration.linear_input_stats(model, fwd, batches)
  >>> new_params, aux = prune(params, stats, sparsity=0.5)
  >>> aux.errors['layers/0/query/kernel']     # ||WX - W'X||^2 / ||WX||^2
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jcompress import tree
from jcompress.oneshot import calibration
from jcompress.core import topk

__all__ = [
    "SparseGPTAux",
    "check_factor_ok",
    "check_sparsity_args",
    "inverse_hessian_factor",
    "obs_column_loop",
    "prune",
    "prune_matrix",
]


class SparseGPTAux(NamedTuple):
    """Per-layer results of :func:`prune`, keyed by kernel name.

    Attributes:
      masks: bool ``(in, out)``, True where the weight is kept.
      errors: float32 scalars, ``||X K - X K'||^2 / ||X K||^2`` on the calibration data.
      scale, zero: with ``bits``: the quantization grid per output unit, ``(1, out)``
        float32 each; kept weights equal ``scale * (code - zero)``. Empty otherwise.
    """

    masks: dict
    errors: dict
    scale: dict
    zero: dict


def check_sparsity_args(sparsity, n_m, *, block_size: int | None = None) -> None:
    """ValueError unless exactly one of ``sparsity`` in [0, 1) or ``n_m = (N, M)`` is given."""
    if (sparsity is None) == (n_m is None):
        raise ValueError("give exactly one of sparsity= (unstructured) or n_m=(N, M) (semi-structured)")
    if sparsity is not None and not (isinstance(sparsity, (int, float)) and 0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"sparsity={sparsity!r} must be a float in [0, 1)")
    if n_m is not None:
        if not (
            isinstance(n_m, tuple) and len(n_m) == 2 and all(isinstance(v, int) for v in n_m) and 0 <= n_m[0] < n_m[1]
        ):
            raise ValueError(f"n_m={n_m!r} must be a tuple (N, M) of ints with 0 <= N < M, e.g. (2, 4)")
        if block_size is not None and block_size % n_m[1]:
            raise ValueError(f"block_size={block_size} must be a multiple of M={n_m[1]}")


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


def _block_prune_counts(rows: int, cols: int, block: int, sparsity: float) -> tuple[int, ...]:
    """Zeros per block so that the total is exactly round(sparsity * rows * cols)."""
    ends = list(range(block, cols, block)) + [cols]
    cum = [0] + [round(sparsity * rows * e) for e in ends]
    return tuple(b - a for a, b in itertools.pairwise(cum))


def _round_to_grid(w, scale, zero, maxq):
    q = jnp.clip(jnp.round(w / scale) + zero, 0, maxq)
    return scale * (q - zero)


def obs_column_loop(
    w,
    u,
    scale,
    zero,
    *,
    block: int,
    counts: tuple | None,
    n_m: tuple | None,
    maxq: int | None,
    regrid: tuple | None = None,
):
    """The SparseGPT/GPTQ column loop on ``W`` ``(rows, cols)`` (papers' layout).

    Each block is one call of a jitted function (compiled once per block shape, however
    many blocks there are); the lazy update of the columns after the block is one matmul.

    Args:
      w: ``(rows, cols)`` float32 weights.
      u: ``(cols, cols)`` upper Cholesky factor of ``H^-1``.
      scale, zero: ``(rows, cols)`` float32 quantization grid of every weight's column,
        used when ``maxq`` is given (ignored otherwise).
      block: columns per block.
      counts: weights to prune in each block (unstructured), or ``None``.
      n_m: ``(N, M)`` for semi-structured pruning, or ``None``.
      maxq: ``2**bits - 1`` for quantization of the kept weights, or ``None``.
      regrid: ``(group_size, grid_fn)`` to compute the grids during the loop, as the
        reference GPTQ does: at the start of each block, every group of ``group_size``
        columns that starts inside it gets ``grid_fn(w[:, group]) -> (scale, zero)``
        (each ``(rows, 1)``) from the weights as they are then (all earlier blocks'
        updates applied); ``None`` keeps the ``scale``/``zero`` given.

    Returns:
      ``(new_w, pruned, scale, zero)``: ``(rows, cols)`` float32 and bool (True where set
      to zero), and the grids the loop used.
    """
    cols = w.shape[1]
    pruned_blocks = []
    for b, b0 in enumerate(range(0, cols, block)):
        b1 = min(b0 + block, cols)
        if regrid is not None:
            g, grid_fn = regrid
            for g0 in range(-(-b0 // g) * g, b1, g):
                s, z = grid_fn(w[:, g0 : g0 + g])
                width = min(g, cols - g0)
                scale = scale.at[:, g0 : g0 + width].set(jnp.broadcast_to(s, (w.shape[0], width)))
                zero = zero.at[:, g0 : g0 + width].set(jnp.broadcast_to(z, (w.shape[0], width)))
        count = jnp.int32(0 if counts is None else counts[b])
        w1, pruned1, err1 = _solve_block(
            w[:, b0:b1], u[b0:b1, b0:b1], scale[:, b0:b1], zero[:, b0:b1], count, n_m=n_m, maxq=maxq
        )
        w = _lazy_update(w, w1, err1, u[b0:b1], b0=b0)
        pruned_blocks.append(pruned1)
    return w, jnp.concatenate(pruned_blocks, axis=1), scale, zero


def _lazy_update(w, w1, err1, u_rows, *, b0):
    """Write the finished block and apply ``W[:, end:] -= Err U[block, end:]`` (plain ops:
    their shapes change from block to block, so they are not worth a compiled function each)."""
    b1 = b0 + w1.shape[1]
    w = w.at[:, b0:b1].set(w1)
    return w.at[:, b1:].add(-(err1 @ u_rows[:, b1:]))


@functools.partial(jax.jit, static_argnames=("n_m", "maxq"))
def _solve_block(w1, u1, scale1, zero1, count, *, n_m, maxq):
    """Mask selection and column-by-column OBS updates inside one block: ``(w1, pruned1, err1)``.

    The loop runs on the transposed block (one weight column per row of the array), so
    every column it reads or writes is contiguous in memory.
    """
    d = jnp.diag(u1)
    score = w1**2 / d[None, :] ** 2  # unstructured: the block's `count` smallest scores, over all rows
    pruned_t = topk.remove_smallest(score, count).T

    def nm_mask(i, w_t, pruned_t):
        n, m = n_m
        group = lax.dynamic_slice_in_dim(w_t, i, m) ** 2 / lax.dynamic_slice_in_dim(d, i, m)[:, None] ** 2
        return lax.dynamic_update_slice_in_dim(pruned_t, topk.remove_smallest(group, m - n, axis=0), i, axis=0)

    def column(i, carry):
        w_t, pruned_t, err_t = carry
        if n_m is not None:
            pruned_t = lax.cond(i % n_m[1] == 0, nm_mask, lambda i, w, p: p, i, w_t, pruned_t)
        col = w_t[i]
        q = col if maxq is None else _round_to_grid(col, scale_t[i], zero_t[i], maxq)
        q = jnp.where(pruned_t[i], 0.0, q)
        e = (col - q) / d[i]
        w_t = w_t - u1[i][:, None] * e[None, :]  # U is upper triangular: columns < i are untouched
        return w_t.at[i].set(q), pruned_t, err_t.at[i].set(e)

    scale_t, zero_t = scale1.T, zero1.T
    w_t, pruned_t, err_t = lax.fori_loop(0, w1.shape[1], column, (w1.T, pruned_t, jnp.zeros_like(w1.T)))
    return w_t.T, pruned_t.T, err_t.T


def prune_matrix(
    kernel: jax.Array,
    h: jax.Array,
    *,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    bits: int | None = None,
    symmetric: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
    """SparseGPT on one Flax kernel.

    Args:
      kernel: ``(in, out)`` float.
      h: ``(in, in)`` float32, ``sum x x^T`` of the layer's inputs.
      sparsity, n_m, bits, symmetric, block_size, damp: see :func:`prune`.

    Returns:
      ``(new_kernel (in, out) float32, keep mask (in, out) bool, scale, zero)``; the
      grid ``(1, out)`` is ``None`` without ``bits``.
    """
    check_sparsity_args(sparsity, n_m, block_size=block_size)
    cols, rows = kernel.shape
    if n_m is not None and cols % n_m[1]:
        raise ValueError(f"kernel has {cols} inputs, not a multiple of M={n_m[1]}; N:M groups need whole groups")
    if bits is not None:
        from jcompress.oneshot import gptq  # the grid is GPTQ's; imported here to keep the modules acyclic

        gptq.check_bits(bits)
    counts = None if sparsity is None else _block_prune_counts(rows, cols, block_size, float(sparsity))
    new_k, keep, scale, zero, ok = _prune_matrix_impl(
        kernel, h, damp=damp, counts=counts, n_m=n_m, bits=bits, symmetric=symmetric, block=block_size
    )
    check_factor_ok(ok)
    return (new_k, keep, None, None) if bits is None else (new_k, keep, scale, zero)


def check_factor_ok(ok: jax.Array) -> None:
    """ValueError when the Cholesky factor was not finite (eager values only)."""
    if not isinstance(ok, jax.core.Tracer) and not bool(ok):
        raise ValueError("the dampened H is not positive definite (Cholesky failed); raise damp= (e.g. 0.1)")


def _prune_matrix_impl(kernel, h, *, damp, counts, n_m, bits, symmetric, block):
    w, u, scale, zero = _prepare(kernel, h, damp=damp, bits=bits, symmetric=symmetric)
    maxq = None if bits is None else 2**bits - 1
    new_w, pruned, _, _ = obs_column_loop(w, u, scale, zero, block=block, counts=counts, n_m=n_m, maxq=maxq)
    return new_w.T, ~pruned.T, scale[:, :1].T, zero[:, :1].T, jnp.all(jnp.isfinite(u))


@functools.partial(jax.jit, static_argnames=("bits", "symmetric"))
def _prepare(kernel, h, *, damp, bits, symmetric):
    """``W`` (out, in) with dead inputs zeroed, ``U``, and the per-row grid broadcast to ``W``."""
    w = kernel.astype(jnp.float32).T
    u, dead = inverse_hessian_factor(h, damp=damp)
    w = jnp.where(dead[None, :], 0.0, w)
    scale = zero = jnp.zeros((w.shape[0], 1), jnp.float32)
    if bits is not None:
        from jcompress.oneshot import gptq

        scale, zero = gptq.min_max_grid(w, bits=bits, symmetric=symmetric)  # (rows, 1)
    return w, u, jnp.broadcast_to(scale, w.shape), jnp.broadcast_to(zero, w.shape)


def prune(
    params: tree.PyTree,
    stats: dict,
    *,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    bits: int | None = None,
    symmetric: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
    include: tree.Selection = None,
) -> tuple[tree.PyTree, SparseGPTAux]:
    """Prune the calibrated Dense kernels of ``params`` with SparseGPT.

    Args:
      params: the parameter pytree (plain dict or NNX State); only the kernels named in
        ``stats`` (narrowed by ``include``) change, everything else passes through.
      stats: ``{kernel name: LayerStats}`` from
        :func:`jcompress.oneshot.calibration.linear_input_stats` (or ``{name: H}``).
      sparsity: fraction of weights set to zero in each layer, in [0, 1).
      n_m: ``(N, M)``: at most N nonzeros in every M consecutive inputs of each output
        unit, instead of ``sparsity``.
      bits: also quantize the kept weights (joint sparse + quantized, 2..8 bits) on a
        min-max grid per output unit; ``None`` keeps float weights.
      symmetric: symmetric grid (zero point in the middle) instead of asymmetric.
      block_size: columns per block (128 in the paper; a multiple of M for N:M).
      damp: diagonal dampening as a fraction of the mean of ``diag(H)``.
      include: optional selection narrowing the calibrated layers.

    Returns:
      ``(new_params, SparseGPTAux)``.

    Example:
      >>> new_params, aux = prune(params, stats, n_m=(2, 4))
    """
    check_sparsity_args(sparsity, n_m, block_size=block_size)
    if not (isinstance(block_size, int) and block_size > 0):
        raise ValueError(f"block_size={block_size!r} must be a positive int")
    if not (0.0 <= float(damp) < 10.0):
        raise ValueError(f"damp={damp!r} must be a small non-negative fraction such as 0.01")

    def one(name, kernel, h):
        new_k, keep, scale, zero = prune_matrix(
            kernel, h, sparsity=sparsity, n_m=n_m, bits=bits, symmetric=symmetric, block_size=block_size, damp=damp
        )
        return new_k, {"mask": keep, "scale": scale, "zero": zero}

    new_params, extras = calibration.map_layers(params, stats, include, one)
    quantized = bits is not None
    return new_params, SparseGPTAux(
        masks={n: e["mask"] for n, e in extras.items()},
        errors={n: e["error"] for n, e in extras.items()},
        scale={n: e["scale"] for n, e in extras.items()} if quantized else {},
        zero={n: e["zero"] for n, e in extras.items()} if quantized else {},
    )
