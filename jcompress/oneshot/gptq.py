"""GPTQ (Frantar et al. 2023): one-shot weight quantization with OBS error feedback.

GPTQ runs SparseGPT's column loop (:func:`jcompress.oneshot.sparsegpt.obs_column_loop`)
with nothing pruned: each column ``w`` of ``W = kernel.T`` (``(out, in)``) is rounded to
its fixed grid, ``q = round_to_grid(w)``, and the rounding error is pushed onto the
columns not yet quantized, ``W[:, i:] -= ((w - q) / U_ii) U[i, i:]``, with ``U`` the upper
Cholesky factor of the dampened ``H^-1`` (``H = sum x x^T``).

The grid: min-max per output unit and per group of ``group_size`` consecutive inputs
(one group spanning all inputs when ``group_size`` is ``None``), asymmetric by default:
``scale = (max - min) / (2^bits - 1)`` with the range widened to contain 0,
``zero = round(-min / scale)``, code ``= clip(round(w / scale) + zero, 0, 2^bits - 1)``
and value ``scale * (code - zero)``. Symmetric grids use ``max = max|w|``, ``min = -max``
and ``zero = 2^(bits-1)``. As in the reference implementation, a group's grid is computed
when the loop reaches the block it starts in, from the weights as the earlier columns'
error feedback left them; with activation order (or ``static_groups=True``) every grid is
computed once from the original weights before the loop (the reference's
``static_groups`` variant), so the groups stay contiguous in the original input order and
need no per-input group index.

Activation order (``act_order=True``): columns are processed in decreasing ``diag(H)``
(the inputs with the most energy first, while the most unquantized columns remain to
absorb their error) and put back in their original order afterwards.

:func:`rtn` is the round-to-nearest baseline on exactly the same grid, so
``quantize`` vs ``rtn`` isolates GPTQ's error feedback. :func:`min_max_grid` and
:func:`round_to_grid` are the small grid helpers (rounding to a given scale and zero
point), shared with SparseGPT's joint quantization.

Example:
  >>> new_params, aux = quantize(params, stats, bits=4, group_size=128, act_order=True)
  >>> aux.codes['layers/0/query/kernel'].dtype, aux.errors['layers/0/query/kernel']
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jcompress import tree
from jcompress.oneshot import calibration
from jcompress.oneshot.sparsegpt import check_factor_ok, inverse_hessian_factor, obs_column_loop

__all__ = [
    "GPTQAux",
    "check_bits",
    "dequantize",
    "min_max_grid",
    "quant_params",
    "quantize",
    "quantize_matrix",
    "round_to_grid",
    "rtn",
    "storage_bits",
]


class GPTQAux(NamedTuple):
    """Per-layer results, keyed by kernel name (kernel layout: inputs first).

    Attributes:
      codes: ``(in, out)`` uint8 integer codes in ``[0, 2^bits - 1]``.
      scale: ``(groups, out)`` float32 step of each group's grid.
      zero: ``(groups, out)`` float32 (integral) zero point of each group.
      errors: float32 ``||X K - X K'||^2 / ||X K||^2`` (only with calibration stats).
      group_size: inputs per group (``in`` when one group spans the whole input).
      bits: the code width.
    """

    codes: dict
    scale: dict
    zero: dict
    errors: dict
    group_size: dict
    bits: int


def check_bits(bits) -> None:
    """ValueError unless ``bits`` is an int in 2..8."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits={bits!r} must be an int from 2 to 8")


def min_max_grid(w: jax.Array, *, bits: int, symmetric: bool = False) -> tuple[jax.Array, jax.Array]:
    """Grid of each row of ``w`` ``(rows, n)``: ``(scale, zero)``, each ``(rows, 1)`` float32.

    The row's range ``[min(w, 0), max(w, 0)]`` is split into ``2^bits - 1`` steps; an
    all-zero row gets the range [-1, 1] so that the scale is never 0.
    """
    maxq = 2**bits - 1
    lo = jnp.minimum(w.min(axis=1, keepdims=True), 0.0)
    hi = jnp.maximum(w.max(axis=1, keepdims=True), 0.0)
    if symmetric:
        hi = jnp.maximum(-lo, hi)
        lo = -hi
    empty = (lo == 0) & (hi == 0)
    lo, hi = jnp.where(empty, -1.0, lo), jnp.where(empty, 1.0, hi)
    scale = (hi - lo) / maxq
    zero = jnp.full_like(scale, (maxq + 1) / 2) if symmetric else jnp.round(-lo / scale)
    return scale, zero


def round_to_grid(w: jax.Array, scale: jax.Array, zero: jax.Array, *, bits: int) -> tuple[jax.Array, jax.Array]:
    """Round ``w`` to a given grid: ``(codes uint8, values float32)``, broadcasting ``scale``/``zero``."""
    codes = jnp.clip(jnp.round(w / scale) + zero, 0, 2**bits - 1)
    return codes.astype(jnp.uint8), scale * (codes - zero)


def _group_grid(w: jax.Array, *, bits: int, group_size: int, symmetric: bool) -> tuple[jax.Array, jax.Array]:
    """Per-group grid of ``w`` ``(rows, cols)``: ``(scale, zero)`` ``(rows, groups)``."""
    rows, cols = w.shape
    groups = -(-cols // group_size)
    padded = jnp.pad(w, ((0, 0), (0, groups * group_size - cols)))
    pieces = padded.reshape(rows, groups, group_size)
    # padding zeros never move a range that is already widened to contain 0
    scale, zero = min_max_grid(pieces.reshape(rows * groups, group_size), bits=bits, symmetric=symmetric)
    return scale.reshape(rows, groups), zero.reshape(rows, groups)


def _check_group_size(group_size, cols: int) -> int:
    if group_size is None:
        return cols
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be a positive int or None")
    return min(group_size, cols)


def quantize_matrix(
    kernel: jax.Array,
    h: jax.Array,
    *,
    bits: int,
    group_size: int | None = None,
    act_order: bool = False,
    static_groups: bool | None = None,
    symmetric: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """GPTQ on one Flax kernel ``(in, out)`` with ``h`` ``(in, in)``; arguments as in :func:`quantize`.

    Returns:
      ``(dequantized kernel (in, out) float32, codes (in, out) uint8, scale (groups, out),
      zero (groups, out))``.
    """
    check_bits(bits)
    g = _check_group_size(group_size, kernel.shape[0])
    static = _check_static_groups(static_groups, act_order)
    values, codes, scale, zero, ok = _quantize_matrix_impl(
        kernel,
        h,
        bits=bits,
        group_size=g,
        act_order=act_order,
        static=static or g >= kernel.shape[0],  # one group: both ways are the same grid
        symmetric=symmetric,
        block=block_size,
        damp=damp,
    )
    check_factor_ok(ok)
    return values, codes, scale, zero


def _check_static_groups(static_groups, act_order: bool) -> bool:
    if static_groups is None:
        return bool(act_order)
    if not isinstance(static_groups, bool):
        raise ValueError(f"static_groups={static_groups!r} must be True, False or None")
    if act_order and not static_groups:
        raise ValueError(
            "static_groups=False with act_order=True would form groups in activation order, which are not "
            "contiguous inputs and cannot be stored as (groups, out) grids; use static_groups=True (or None)"
        )
    return static_groups


def _quantize_matrix_impl(kernel, h, *, bits, group_size, act_order, static, symmetric, block, damp):
    wp, u, perm, scale, zero, scale_cols, zero_cols = _prepare(
        kernel, h, bits=bits, group_size=group_size, act_order=act_order, symmetric=symmetric, damp=damp
    )
    regrid = None if static else (group_size, functools.partial(min_max_grid, bits=bits, symmetric=symmetric))
    new_wp, _, used_scale, used_zero = obs_column_loop(
        wp,
        u,
        scale_cols[:, perm],
        zero_cols[:, perm],
        block=block,
        counts=None,
        n_m=None,
        maxq=2**bits - 1,
        regrid=regrid,
    )
    if not static:  # no act_order here, so the loop's columns are the original ones
        scale_cols, zero_cols = used_scale, used_zero
        scale, zero = used_scale[:, ::group_size], used_zero[:, ::group_size]
    new_w = jnp.zeros_like(new_wp).at[:, perm].set(new_wp)
    codes, values = round_to_grid(new_w, scale_cols, zero_cols, bits=bits)
    return values.T, codes.T, scale.T, zero.T, jnp.all(jnp.isfinite(u))


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "act_order", "symmetric"))
def _prepare(kernel, h, *, bits, group_size, act_order, symmetric, damp):
    """Permuted ``W`` (out, in), ``U`` of the permuted H, the permutation and the grids."""
    cols = kernel.shape[0]
    w = kernel.astype(jnp.float32).T
    scale, zero = _group_grid(w, bits=bits, group_size=group_size, symmetric=symmetric)
    col_group = jnp.arange(cols) // group_size
    perm = jnp.argsort(-jnp.diag(h)) if act_order else jnp.arange(cols)
    u, dead = inverse_hessian_factor(h[perm][:, perm], damp=damp)
    wp = jnp.where(dead[None, :], 0.0, w[:, perm])
    return wp, u, perm, scale, zero, scale[:, col_group], zero[:, col_group]


def dequantize(codes: jax.Array, scale: jax.Array, zero: jax.Array, *, group_size: int) -> jax.Array:
    """Kernel ``(in, out)`` float32 from codes ``(in, out)`` and per-group ``scale``/``zero`` ``(groups, out)``."""
    group = jnp.arange(codes.shape[0]) // group_size
    return scale[group] * (codes.astype(jnp.float32) - zero[group])


def quantize(
    params: tree.PyTree,
    stats: dict,
    *,
    bits: int,
    group_size: int | None = None,
    act_order: bool = False,
    static_groups: bool | None = None,
    symmetric: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
    include: tree.Selection = None,
) -> tuple[tree.PyTree, GPTQAux]:
    """Quantize the calibrated Dense kernels of ``params`` with GPTQ.

    Args:
      params: the parameter pytree (plain dict or NNX State); only the kernels named in
        ``stats`` (narrowed by ``include``) change, and they come back dequantized
        (float, exactly on the grid); the codes and grids are in the aux.
      stats: ``{kernel name: LayerStats}`` from
        :func:`jcompress.oneshot.calibration.linear_input_stats`.
      bits: code width, 2..8.
      group_size: inputs sharing one scale/zero point (e.g. 128); ``None`` for one grid
        per output unit.
      act_order: process inputs in decreasing ``diag(H)``.
      static_groups: ``False``: a group's grid is computed when the loop reaches its block,
        from the weights updated by all earlier columns (the reference implementation's
        default); ``True``: every grid is computed from the original weights before the
        loop (its ``static_groups`` option, needed with ``act_order`` to keep groups of
        contiguous inputs). ``None`` (default): static with ``act_order``, else not.
      symmetric: symmetric grid instead of asymmetric (min-max).
      block_size: columns per lazy-update block (128).
      damp: diagonal dampening as a fraction of the mean of ``diag(H)`` (0.01).
      include: optional selection narrowing the calibrated layers.

    Returns:
      ``(new_params, GPTQAux)``.
    """
    check_bits(bits)
    if not (isinstance(block_size, int) and block_size > 0):
        raise ValueError(f"block_size={block_size!r} must be a positive int")
    _check_static_groups(static_groups, act_order)

    def one(name, kernel, h):
        values, codes, scale, zero = quantize_matrix(
            kernel,
            h,
            bits=bits,
            group_size=group_size,
            act_order=act_order,
            static_groups=static_groups,
            symmetric=symmetric,
            block_size=block_size,
            damp=damp,
        )
        return values, {
            "codes": codes,
            "scale": scale,
            "zero": zero,
            "g": _check_group_size(group_size, kernel.shape[0]),
        }

    new_params, extras = calibration.map_layers(params, stats, include, one)
    return new_params, _aux(extras, bits)


def _aux(extras: dict, bits: int) -> GPTQAux:
    return GPTQAux(
        codes={n: e["codes"] for n, e in extras.items()},
        scale={n: e["scale"] for n, e in extras.items()},
        zero={n: e["zero"] for n, e in extras.items()},
        errors={n: e["error"] for n, e in extras.items() if "error" in e},
        group_size={n: e["g"] for n, e in extras.items()},
        bits=bits,
    )


def rtn(
    params: tree.PyTree,
    *,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = False,
    include: tree.Selection = None,
    stats: dict | None = None,
) -> tuple[tree.PyTree, GPTQAux]:
    """Round-to-nearest baseline on the same grid as :func:`quantize` (no data needed).

    Args:
      params: the parameter pytree; the selected 2-D kernels come back dequantized.
      bits, group_size, symmetric: as in :func:`quantize`.
      include: selection of kernels (default: all Dense/conv kernels, which must be 2-D)
        when ``stats`` is ``None``; with ``stats``, the calibrated layers narrowed by it.
      stats: optional calibration stats; only used to report ``errors``.
    """
    check_bits(bits)

    def one(name, kernel, h):
        g = _check_group_size(group_size, kernel.shape[0])
        w = kernel.astype(jnp.float32).T
        scale, zero = _group_grid(w, bits=bits, group_size=g, symmetric=symmetric)
        col_group = jnp.arange(w.shape[1]) // g
        codes, values = round_to_grid(w, scale[:, col_group], zero[:, col_group], bits=bits)
        return values.T, {"codes": codes.T, "scale": scale.T, "zero": zero.T, "g": g}

    new_params, extras = calibration.map_layers(params, stats, include, one)
    return new_params, _aux(extras, bits)


def quant_params(aux: GPTQAux) -> dict:
    """``{name: jcompress.quant.QuantParams}`` for the layers of ``aux`` (for
    ``jcompress.compressed.compress`` / ``jcompress.export``): unsigned codes with an
    integer zero point, ``axis=1`` (one grid per output unit and group)."""
    from jcompress import quant

    out = {}
    for n, codes in aux.codes.items():
        g = aux.group_size[n]
        out[n] = quant.QuantParams(
            codes=jnp.asarray(codes, jnp.int32),
            scale=jnp.asarray(aux.scale[n], jnp.float32),
            zero_point=jnp.asarray(aux.zero[n], jnp.int32),
            bits=aux.bits,
            symmetric=False,
            axis=1,
            group_size=None if g >= codes.shape[0] else g,
        )
    return out


def storage_bits(aux: GPTQAux) -> dict[str, int]:
    """Bits to store each quantized kernel: codes at ``bits`` each, plus per group a
    float32 scale and a ``bits``-wide zero point."""
    return {n: int(aux.codes[n].size * aux.bits + aux.scale[n].size * (32 + aux.bits)) for n in aux.codes}
