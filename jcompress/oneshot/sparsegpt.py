"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with OBS error feedback.

For each calibrated Dense kernel ``K`` ``(in, out)``, in the papers' layout ``W = K.T``
``(out, in)`` with ``H = sum x x^T`` of the layer's inputs:

1. dead inputs (``H_ii = 0``) get their weights zeroed and ``H_ii = 1``;
2. ``U`` = upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``;
3. the OBS column loop (:mod:`jcompress.core.obs_loop`): block by block, the weights of
   smallest saliency ``w^2 / U_ii^2`` are removed (for N:M, the smallest ``m - n`` of each
   group of ``m`` inputs in every row, chosen when the loop reaches the group) and the
   columns not yet visited absorb the error.

Unstructured sparsity is exact: the number of zeros in a layer is
``round(sparsity * in * out)`` (spread over blocks by cumulative rounding; inside a block
the smallest scores are taken over all rows together, as the reference does). ``NM(n, m)``
keeps ``n`` of every ``m`` consecutive inputs of each output unit (hardware 2:4 sparsity).
With ``bits``, the kept weights are also rounded to a min-max grid per output unit
(:mod:`jcompress.core.grid`) inside the loop (joint sparsification and quantization).

Speed against a plain numpy/scipy implementation of the same algorithm is measured by
``jcompress.bench.b4_sparsegpt`` (see BENCHMARKS.md).

Example:
  >>> stats = jc.oneshot.calibrate(model, batches)
  >>> params, aux = jc.oneshot.sparsegpt(stats, sparsity=0.5)(params)
  >>> aux.errors['layers/0/query/kernel']     # ||WX - W'X||^2 / ||WX||^2
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jcompress.core import base, grid, spec
from jcompress.core.obs_loop import block_prune_counts, check_factor_ok, inverse_hessian_factor, obs_column_loop
from jcompress.core.patterns import NM, Unstructured, check_pattern
from jcompress.oneshot.calibration import layer_transform, mask_tree, per_layer

__all__ = ["check_sparsity", "nm_of", "prune_matrix", "sparsegpt"]


def check_sparsity(sparsity, pattern, *, arg: str = "sparsity") -> None:
    """Check a sparsity spec against a pattern (Unstructured or NM): values in [0, 1); with
    ``NM`` the sparsity is the pattern's, so it must be None or ``1 - n/m``."""
    values = [v for _, v in spec.pairs(sparsity, arg=arg)] if spec.is_pairs(sparsity) else [sparsity]
    for v in values:
        if isinstance(pattern, NM):
            if v is not None and abs(spec.check_value(v, arg=arg, kind=float) - pattern.sparsity) > 1e-9:
                raise ValueError(
                    f"{arg}={v} contradicts pattern={pattern} (which removes {pattern.sparsity}); pass {arg}=None"
                )
        elif v is None:
            raise ValueError(f"{arg} is required for pattern={pattern}")
        else:
            spec.check_value(v, arg=arg, kind=float, lo=0.0, hi=1.0, hi_open=True)


def nm_of(pattern, *, method: str) -> tuple[int, int] | None:
    """``(n, m)`` of an :class:`NM` pattern over the inputs of a Dense kernel, ``None`` for
    :class:`Unstructured`; ValueError/TypeError for the patterns ``method`` does not support."""
    pattern = check_pattern(pattern)
    if isinstance(pattern, Unstructured):
        return None
    if isinstance(pattern, NM):
        if pattern.axis not in (-2, 0):
            raise ValueError(
                f"{method} groups N:M along the inputs of a Dense kernel (in, out): use NM({pattern.n}, {pattern.m}) "
                f"with axis=-2, not axis={pattern.axis}"
            )
        return (pattern.n, pattern.m)
    raise ValueError(f"{method} supports pattern=Unstructured() or NM(n, m), not {pattern}")


@jax.jit
def _prepare(kernel, h, *, damp):
    """The kernel (in, out) with dead inputs zeroed, and ``U``."""
    u, dead = inverse_hessian_factor(h, damp=damp)
    return jnp.where(dead[:, None], 0.0, kernel.astype(jnp.float32)), u


def prune_matrix(
    kernel: jax.Array,
    h: jax.Array,
    *,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    bits: int | None = None,
    symmetric: bool = True,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[jax.Array, jax.Array, grid.QuantParams | None]:
    """SparseGPT on one Flax kernel.

    Args:
      kernel: ``(in, out)`` float.
      h: ``(in, in)`` float32, ``sum x x^T`` of the layer's inputs.
      sparsity: fraction of the layer's weights set to zero (unstructured), or None with ``n_m``.
      n_m: ``(n, m)``: keep ``n`` of every ``m`` consecutive inputs of each output.
      bits, symmetric: quantize the kept weights on a grid per output unit, or ``bits=None``.
      block_size: columns per block (a multiple of ``m`` for N:M).
      damp: diagonal dampening as a fraction of the mean of ``diag(H)``.

    Returns:
      ``(new_kernel (in, out) float32, keep mask (in, out) bool, QuantParams or None)``;
      with ``bits`` the new kernel is exactly ``dequantize`` of the grid.
    """
    cols, rows = kernel.shape
    if n_m is not None and cols % n_m[1]:
        raise ValueError(f"kernel has {cols} inputs, not a multiple of m={n_m[1]}; N:M groups need whole groups")
    if n_m is not None and block_size % n_m[1]:
        raise ValueError(f"block_size={block_size} must be a multiple of m={n_m[1]}")
    counts = None if n_m is not None else block_prune_counts(rows, cols, block_size, float(sparsity))
    k, u = _prepare(kernel, h, damp=damp)
    check_factor_ok(u)
    quant = scale = zero_point = None
    if bits is not None:
        quant = (bits, symmetric)
        scale, zero_point = grid.range_grid(k, axis=0, bits=bits, symmetric=symmetric)  # (1, out): one grid per output
    new_k, pruned, _, _ = obs_column_loop(
        k, u, block=block_size, counts=counts, n_m=n_m, quant=quant, scale=scale, zero_point=zero_point
    )
    if bits is None:
        return new_k, ~pruned, None
    codes = grid.round_codes(new_k, scale, zero_point, bits=bits, symmetric=symmetric)
    qp = grid.QuantParams(codes, scale, zero_point, bits, bool(symmetric), 1, None)
    return grid.dequantize(qp), ~pruned, qp


def sparsegpt(
    stats: dict,
    *,
    sparsity: spec.Spec = None,
    pattern=Unstructured(),
    bits: int | None = None,
    symmetric: bool = True,
    block_size: int = 128,
    damp: float = 0.01,
) -> base.Transform:
    """SparseGPT on the calibrated Dense kernels.

    Args:
      stats: ``{kernel name: LayerStats}`` from :func:`jcompress.oneshot.calibrate`; the
        transform touches these kernels (narrow them with :func:`jcompress.core.masked`).
      sparsity: fraction of each layer's weights set to zero, in [0, 1): a value or a
        ``{regex: value}`` spec, required (as in ``jc.pruning``) unless the pattern is ``NM``, which sets it
        (None, or the pattern's ``1 - n/m``).
      pattern: ``Unstructured()`` or ``NM(n, m)`` (groups along the inputs, ``axis=-2``).
      bits: also quantize the kept weights (joint sparse + quantized, 2..8 bits usual) on
        a grid per output unit; ``None`` keeps float weights.
      symmetric: the grid's convention (:mod:`jcompress.core.grid`); symmetric by default.
      block_size: columns per block (128 in the paper; a multiple of m for N:M).
      damp: diagonal dampening as a fraction of the mean of ``diag(H)``.

    Returns:
      a :class:`~jcompress.core.base.Transform`: ``(params, MaskAux)``, or with ``bits``
      ``(params, ChainAux(('prune', 'quantize'), (MaskAux, GridAux)))``. Masks are
      params-shaped (True = kept); ``errors`` are relative output errors on the
      calibration data.

    Example:
      >>> params, aux = jc.oneshot.sparsegpt(stats, pattern=jc.NM(2, 4))(params)
    """
    n_m = nm_of(pattern, method="sparsegpt")
    check_sparsity(sparsity, pattern)
    if bits is not None:
        grid.check_bits(bits, symmetric)
    block_size = spec.check_value(block_size, arg="block_size", kind=int, lo=1)
    if n_m is not None and block_size % n_m[1]:
        raise ValueError(f"block_size={block_size} must be a multiple of m={n_m[1]}")
    damp = spec.check_value(damp, arg="damp", kind=float, lo=0.0, hi=10.0, hi_open=True)
    sparsity_of = per_layer(sparsity, stats, arg="sparsity")

    def solve(name, kernel, h):
        new_k, keep, qp = prune_matrix(
            kernel, h, sparsity=None if n_m else sparsity_of(name), n_m=n_m, bits=bits, symmetric=symmetric,
            block_size=block_size, damp=damp,
        )  # fmt: skip
        return new_k, {"mask": keep, "grid": qp}

    def make_aux(params, extras, errors):
        masks = base.MaskAux(mask_tree(params, {n: e["mask"] for n, e in extras.items()}), None, errors)
        if bits is None:
            return masks
        grids = base.GridAux({n: e["grid"] for n, e in extras.items()}, errors)
        return base.ChainAux(("prune", "quantize"), (masks, grids))

    return layer_transform(stats, solve, make_aux, name="sparsegpt")
