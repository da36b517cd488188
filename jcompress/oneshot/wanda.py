"""Wanda (Sun et al. 2024): prune by weight magnitude times input norm, no weight update.

For a Dense layer with Flax kernel ``K`` ``(in, out)`` and calibration statistic
``H = sum x x^T``, the score of weight ``K[j, i]`` (input ``j`` -> output ``i``) is

    S[j, i] = |K[j, i]| * ||X_j||_2,      ||X_j||_2 = sqrt(H[j, j]),

and the weights with the smallest scores are removed **within each output unit** (each
column of ``K``, each row of the papers' ``W``): exactly ``round(sparsity * in)`` per
output, or for ``NM(n, m)`` the ``m - n`` smallest of every ``m`` consecutive inputs. The
kept weights are left as they are. The papers' magnitude baseline (``|K|`` compared
across the whole layer) is ``jc.pruning.magnitude(sparsity=...)``.

:func:`prune_matrix` computes scores and mask in one compiled function and zeroes the
pruned weights in a second: op by op they were a compile per op and shape and a pass over
the kernel per op; one function for all three was slower still on CPU (about 2.5x op by
op's time for a 4096 x 4096 kernel at 2:4; see BENCHMARKS.md).

Unstructured masks of concrete kernels on one CPU device are selected on the host: one
compiled function writes the score keys transposed to ``(out, in)``, ``np.partition`` of
each contiguous row gives the ``count``-th smallest key per output, and a second compiled
function keeps the weights above it (ties at it settled by index in numpy, rarely needed).
That is the same mask as ``topk.remove_smallest`` (used under ``jax.jit`` and on other
devices, a 32-pass bisection) in a fraction of its time on CPU (see BENCHMARKS.md, B9).

Example:
  >>> params, aux = jc.oneshot.wanda(stats, sparsity=0.5)(params)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jcompress.core import base, spec, topk
from jcompress.core.patterns import Unstructured
from jcompress.oneshot.calibration import layer_transform, mask_tree, per_layer
from jcompress.oneshot.sparsegpt import check_sparsity, nm_of

__all__ = ["prune_matrix", "wanda", "wanda_scores"]


def wanda_scores(kernel: jax.Array, h: jax.Array) -> jax.Array:
    """``|K| * sqrt(diag(H))[:, None]``, shape ``(in, out)``."""
    return jnp.abs(kernel) * jnp.sqrt(jnp.maximum(jnp.diag(h), 0.0))[:, None]


@functools.partial(jax.jit, static_argnames=("count", "n_m"))
def _keep_mask(kernel, h, *, count, n_m):
    score = wanda_scores(kernel, h)
    if n_m is not None:
        return topk.nm_keep_mask(score, n=n_m[0], m=n_m[1], axis=0)
    return ~topk.remove_smallest(score, count, axis=0)


@jax.jit
def _zero_pruned(kernel, keep):
    return jnp.where(keep, kernel, jnp.zeros((), kernel.dtype))


@jax.jit
def _score_keys_by_output(kernel, h):
    """:func:`topk.float_to_key` of the scores, transposed to ``(out, in)`` (uint32)."""
    return topk.float_to_key(wanda_scores(kernel, h)).T


@jax.jit
def _keep_above(kernel, h, threshold):
    """Keep mask ``key > threshold[i]`` per output ``i`` and the pruned kernel, in one pass."""
    keep = topk.float_to_key(wanda_scores(kernel, h)) > threshold[None, :]
    return jnp.where(keep, kernel, jnp.zeros((), kernel.dtype)), keep


def _prune_on_host(kernel: jax.Array, h: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
    """Unstructured Wanda of a concrete CPU kernel with numpy's selection; the same kernel and
    mask as ``_keep_mask`` (``topk.remove_smallest`` along the inputs).

    ``np.partition`` of every row of the ``(out, in)`` keys puts the ``count``-th smallest
    key ``t`` of each output at position ``count - 1``, the smaller ones before it and the
    larger or equal ones after. Where no entry after it equals ``t``, removing ``key <= t``
    removes exactly ``count``; otherwise (ties at ``t`` beyond the count) the tied entries
    with the lowest input index are removed first, as ``remove_smallest`` does.
    """
    if count == 0:
        keep = jnp.ones(kernel.shape, bool)
        return _zero_pruned(kernel, keep), keep
    keys = np.asarray(_score_keys_by_output(kernel, h))  # (out, in), rows contiguous
    part = np.partition(keys, count - 1, axis=1)
    threshold = part[:, count - 1]
    new_kernel, keep = _keep_above(kernel, h, jnp.asarray(threshold))
    tied_beyond = np.flatnonzero(np.any(part[:, count:] == threshold[:, None], axis=1))
    if tied_beyond.size == 0:
        return new_kernel, keep
    rows, t = keys[tied_beyond], threshold[tied_beyond, None]
    tie = rows == t
    needed = count - np.count_nonzero(rows < t, axis=1, keepdims=True)
    removed = (rows < t) | (tie & (np.cumsum(tie, axis=1) <= needed))
    keep = np.array(keep)
    keep[:, tied_beyond] = ~removed.T
    keep = jnp.asarray(keep)
    return _zero_pruned(kernel, keep), keep


def prune_matrix(
    kernel: jax.Array, h: jax.Array, *, count: int | None = None, n_m: tuple[int, int] | None = None
) -> tuple[jax.Array, jax.Array]:
    """Wanda on one Flax kernel (two compiled functions per shape: the mask, the zeroing).

    Args:
      kernel: ``(in, out)`` float.
      h: ``(in, in)`` float32 ``sum x x^T`` (only its diagonal is read).
      count: weights removed per output unit (unstructured), in ``[0, in]``; or None with
        ``n_m``. Concrete kernels on one CPU device are selected with numpy (see the module
        docstring), others compiled; the masks are the same.
      n_m: ``(n, m)``: keep ``n`` of every ``m`` consecutive inputs of each output
        (``in`` a multiple of ``m``).

    Returns:
      ``(new_kernel (in, out) of kernel's dtype, keep mask (in, out) bool)``.

    Example:
      >>> new_k, keep = prune_matrix(kernel, stats['fc/kernel'].h, n_m=(2, 4))
    """
    if (count is None) == (n_m is None):
        raise ValueError(f"give exactly one of count={count} and n_m={n_m}")
    if n_m is None and topk.on_host([kernel, h]):
        count = int(count)
        if not 0 <= count <= kernel.shape[0]:
            raise ValueError(f"count={count} must be in [0, {kernel.shape[0]}] (the inputs of each output unit)")
        return _prune_on_host(kernel, h, count)
    keep = _keep_mask(kernel, h, count=count, n_m=None if n_m is None else (int(n_m[0]), int(n_m[1])))
    return _zero_pruned(kernel, keep), keep


def wanda(stats: dict, *, sparsity: spec.Spec = None, pattern=Unstructured()) -> base.Transform:
    """Wanda on the calibrated Dense kernels.

    Args:
      stats: ``{kernel name: LayerStats}`` from :func:`jcompress.oneshot.calibrate`; the
        transform touches these kernels (narrow them with :func:`jcompress.core.masked`).
      sparsity: fraction removed per output unit, in [0, 1): a value or a ``{regex:
        value}`` spec, required (as in ``jc.pruning``) unless the pattern is ``NM``, which sets it
        (None, or the pattern's ``1 - n/m``).
      pattern: ``Unstructured()`` or ``NM(n, m)`` (groups along the inputs, ``axis=-2``).

    Returns:
      a :class:`~jcompress.core.base.Transform`: ``(params, MaskAux)``; pruned entries
      are set to 0, everything else is unchanged; masks params-shaped (True = kept).

    Example:
      >>> params, aux = jc.oneshot.wanda(stats, pattern=jc.NM(2, 4))(params)
    """
    n_m = nm_of(pattern, method="wanda")
    check_sparsity(sparsity, pattern)
    sparsity_of = per_layer(sparsity, stats, arg="sparsity")

    def solve(name, kernel, h):
        if n_m is not None:
            if kernel.shape[0] % n_m[1]:
                raise ValueError(f"{name} has {kernel.shape[0]} inputs, not a multiple of m={n_m[1]}")
            new_k, keep = prune_matrix(kernel, h, n_m=n_m)
        else:
            new_k, keep = prune_matrix(kernel, h, count=topk.pruned_count(sparsity_of(name), kernel.shape[0]))
        return new_k, {"mask": keep}

    def make_aux(params, extras, errors):
        return base.MaskAux(mask_tree(params, {n: e["mask"] for n, e in extras.items()}), None, errors)

    return layer_transform(stats, solve, make_aux, name="wanda")
