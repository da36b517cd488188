"""Wanda (Sun et al. 2024): prune by weight magnitude times input norm, no weight update.

For a Dense layer with Flax kernel ``K`` ``(in, out)`` and calibration statistic
``H = sum x x^T``, the score of weight ``K[j, i]`` (input ``j`` -> output ``i``) is

    S[j, i] = |K[j, i]| * ||X_j||_2,      ||X_j||_2 = sqrt(H[j, j]),

and the weights with the smallest scores are removed **within each output unit** (each
column of ``K``, each row of the papers' ``W``): exactly ``round(sparsity * in)`` per
output, or for N:M the ``M - N`` smallest of every ``M`` consecutive inputs. The kept
weights are left as they are.

:func:`magnitude` is the usual baseline of the Wanda and SparseGPT papers: score ``|K|``
compared across the whole layer (exactly ``round(sparsity * in * out)`` zeros), or per
N:M group. :func:`smallest_mask` is the exact selection both use.

Example:
  >>> new_params, aux = prune(params, stats, sparsity=0.5)
  >>> new_params, aux = magnitude(params, n_m=(2, 4))
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jcompress import tree
from jcompress.oneshot import calibration
from jcompress.oneshot.sparsegpt import check_sparsity_args
from jcompress.core import topk

__all__ = ["WandaAux", "magnitude", "prune", "smallest_mask", "wanda_scores"]


class WandaAux(NamedTuple):
    """Per-layer results keyed by kernel name.

    Attributes:
      masks: bool ``(in, out)``, True where the weight is kept.
      errors: float32 relative output error (only when calibration stats are given).
    """

    masks: dict
    errors: dict


def smallest_mask(
    score: jax.Array, *, sparsity: float | None = None, n_m: tuple | None = None, per_output: bool = True
) -> jax.Array:
    """Keep-mask ``(in, out)`` removing the lowest ``score`` entries, with exact counts.

    Args:
      score: ``(in, out)`` scores (kernel layout).
      sparsity: remove ``round(sparsity * in)`` per output column when ``per_output``,
        else ``round(sparsity * in * out)`` over the whole matrix.
      n_m: ``(N, M)``: keep the ``N`` largest of every ``M`` consecutive inputs of each
        output (``in`` must be a multiple of ``M``).
      per_output: compare within each output unit (Wanda) or across the layer.

    Returns:
      bool ``(in, out)``; ties are broken by position (the lower index is removed first, as a stable sort would).
    """
    check_sparsity_args(sparsity, n_m)
    n_in, n_out = score.shape
    if n_m is not None:
        n, m = n_m
        if n_in % m:
            raise ValueError(f"{n_in} inputs are not a multiple of M={m}; N:M groups need whole groups")
        groups = score.reshape(n_in // m, m, n_out)
        return ~topk.remove_smallest(groups, m - n, axis=1).reshape(n_in, n_out)
    if per_output:
        return ~topk.remove_smallest(score, round(float(sparsity) * n_in), axis=0)
    return ~topk.remove_smallest(score, round(float(sparsity) * score.size))


def wanda_scores(kernel: jax.Array, h: jax.Array) -> jax.Array:
    """``|K| * sqrt(diag(H))[:, None]``, shape ``(in, out)``."""
    return jnp.abs(kernel) * jnp.sqrt(jnp.maximum(jnp.diag(h), 0.0))[:, None]


def prune(
    params: tree.PyTree,
    stats: dict,
    *,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    include: tree.Selection = None,
) -> tuple[tree.PyTree, WandaAux]:
    """Wanda on the calibrated Dense kernels of ``params``.

    Args:
      params: parameter pytree (dict or NNX State); kernels named in ``stats`` (narrowed
        by ``include``) get their pruned entries set to 0, all else is unchanged.
      stats: ``{kernel name: LayerStats}`` from
        :func:`jcompress.oneshot.calibration.linear_input_stats`.
      sparsity: fraction removed per output unit, in [0, 1).
      n_m: ``(N, M)`` semi-structured pattern instead of ``sparsity``.
      include: optional selection narrowing the calibrated layers.

    Returns:
      ``(new_params, WandaAux)``.
    """
    check_sparsity_args(sparsity, n_m)

    def one(name, kernel, h):
        keep = smallest_mask(wanda_scores(kernel, h), sparsity=sparsity, n_m=n_m, per_output=True)
        return jnp.where(keep, kernel, 0), {"mask": keep}

    new_params, extras = calibration.map_layers(params, stats, include, one)
    return new_params, _aux(extras)


def magnitude(
    params: tree.PyTree,
    *,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    include: tree.Selection = None,
    stats: dict | None = None,
) -> tuple[tree.PyTree, WandaAux]:
    """Layer-wise magnitude pruning (the papers' baseline), exact counts.

    Args:
      params: parameter pytree.
      sparsity, n_m: as in :func:`prune`, but unstructured sparsity compares ``|K|``
        across the whole layer.
      include: the kernels to prune (default: all 2-D Dense kernels) when ``stats`` is
        ``None``; with ``stats``, the calibrated layers narrowed by it.
      stats: optional calibration stats, only used to report ``errors``.
    """
    check_sparsity_args(sparsity, n_m)

    def one(name, kernel, h):
        keep = smallest_mask(jnp.abs(kernel), sparsity=sparsity, n_m=n_m, per_output=False)
        return jnp.where(keep, kernel, 0), {"mask": keep}

    new_params, extras = calibration.map_layers(params, stats, include, one)
    return new_params, _aux(extras)


def _aux(extras: dict) -> WandaAux:
    return WandaAux(
        {n: e["mask"] for n, e in extras.items()}, {n: e["error"] for n, e in extras.items() if "error" in e}
    )
