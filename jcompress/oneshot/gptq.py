"""GPTQ (Frantar et al. 2023): one-shot weight quantization with OBS error feedback.

GPTQ runs the OBS column loop (:mod:`jcompress.core.obs_loop`) with nothing pruned: each
column ``w`` of ``W = kernel.T`` (``(out, in)``) is rounded to its fixed grid and the
rounding error is pushed onto the columns not yet quantized,
``W[:, i:] -= ((w - q) / U_ii) U[i, i:]``, with ``U`` the upper Cholesky factor of the
dampened ``H^-1`` (``H = sum x x^T``). Weights that are exactly zero stay zero (they are
held at zero in the loop, their error fed forward like a pruned weight's), so a SparseGPT
result quantized by GPTQ keeps its sparsity: ``chain(sparsegpt(...), gptq(...))``.

The grid is :mod:`jcompress.core.grid`'s, per output unit and per group of
``group_size`` inputs (one group spanning all inputs when ``group_size`` is ``None``),
symmetric by default like every weight grid in jcompress (``symmetric=False`` gives the
original reference's min-max range widened to contain 0, unsigned codes, integer zero
point). As in the reference, a group's grid is computed when the loop reaches the block
it starts in, from the weights as the earlier columns' error feedback left them
(``static_groups=False``); with ``static_groups=True`` every grid is computed once from
the original weights before the loop (the reference's ``static_groups`` variant).

Activation order (``act_order=True``): columns are processed in decreasing ``diag(H)``
(the inputs with the most energy first, while the most unquantized columns remain to
absorb their error) and put back in their original order afterwards. Its groups:

* ``static_groups=True`` (the default with ``act_order``, ``static_groups=None``): groups
  of ``group_size`` consecutive inputs in the original order, their grids from the
  original weights; the grid needs no per-input group index.
* ``static_groups=False`` (the reference's and GPTQModel's ``desc_act`` default): a new
  group starts every ``group_size`` columns of the activation order, its grid computed
  from the weights as the error feedback left them; input ``i`` belongs to group
  ``g_idx[i] = (position of i in the order) // group_size``, stored in the grid's
  ``g_idx`` (int32 ``(in,)``, exactly ``group_size`` inputs per group).

The round-to-nearest baseline on the same grid is ``jc.quant.quantize(bits=b)`` (one grid
per output unit, ``axis=-1``, the same ``symmetric`` and ``group_size``), so the two
isolate GPTQ's error feedback.

Example:
  >>> params4, aux = jc.oneshot.gptq(stats, bits=4, group_size=128, act_order=True)(params)
  >>> aux.grids['layers/0/query/kernel'].codes.dtype, aux.errors['layers/0/query/kernel']
  >>> t = jc.oneshot.gptq(stats, bits=4, group_size=128, act_order=True, static_groups=False)
  >>> t(params)[1].grids['layers/0/query/kernel'].g_idx.shape     # (in,): the group of each input
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jcompress.core import base, grid, spec
from jcompress.core.obs_loop import check_factor_ok, inverse_hessian_factor, obs_column_loop
from jcompress.oneshot.calibration import layer_transform, per_layer

__all__ = ["gptq", "quantize_matrix"]


def _check_static_groups(static_groups, act_order: bool) -> bool:
    act_order = spec.check_flag(act_order, arg="act_order")
    if static_groups is None:
        return bool(act_order)
    if not isinstance(static_groups, bool):
        raise TypeError(f"static_groups={static_groups!r} must be True, False or None")
    return static_groups


def _group_grid(k, *, g: int, bits: int, symmetric: bool):
    """Per-group grids of a kernel ``k`` ``(in, out)``: ``(scale, zero_point)``, each ``(in // g, out)``."""
    cols, rows = k.shape
    s, z = grid.range_grid(k.reshape(cols // g, g, rows), axis=1, bits=bits, symmetric=symmetric)
    return s[:, 0], z[:, 0]


def quantize_matrix(
    kernel,
    h,
    *,
    bits: int,
    group_size: int | None = None,
    act_order: bool = False,
    static_groups: bool | None = None,
    symmetric: bool = True,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[jnp.ndarray, grid.QuantParams]:
    """GPTQ on one Flax kernel ``(in, out)`` with ``h`` ``(in, in)``; arguments as in :func:`gptq`.

    Returns:
      ``(dequantized kernel (in, out) float32, QuantParams)``: int32 codes ``(in, out)``,
      ``scale`` / ``zero_point`` ``(groups, out)``, ``axis=1``, ``g_idx`` int32 ``(in,)``
      with ``act_order=True, static_groups=False`` and several groups (else None); the
      kernel is exactly ``grid.dequantize`` of the grid, and is 0 wherever ``kernel`` is 0.
    """
    bits = grid.check_bits(bits, symmetric)
    cols = kernel.shape[0]
    g = grid.check_group_size(group_size, cols, where=f" (the {cols} inputs of the kernel)") or cols
    static = _check_static_groups(static_groups, act_order) or g == cols  # one group: both ways agree
    kw = {"g": g, "bits": bits, "symmetric": bool(symmetric), "static": static}
    kp, fixed, scale, zp, group_of, u, perm = _prologue(kernel, h, jnp.float32(damp), act_order=bool(act_order), **kw)
    check_factor_ok(u)
    new_kp, _, scale, zp = obs_column_loop(
        kp, u, block=block_size, fixed=fixed, quant=(bits, bool(symmetric)), scale=scale, zero_point=zp,
        group_of=group_of, regrid=None if static else g,
    )  # fmt: skip
    new_k, codes, g_idx = _epilogue(new_kp, perm, scale, zp, **kw)
    return new_k, grid.QuantParams(codes, scale, zp, bits, bool(symmetric), 1, None if g == cols else g, g_idx)


@functools.partial(jax.jit, static_argnames=("g", "bits", "symmetric", "act_order", "static"))
def _prologue(kernel, h, damp, *, g, bits, symmetric, act_order, static):
    """The loop's inputs, its rows in processing order: ``(kernel, fixed, scale, zero_point, group_of, U, perm)``.

    ``perm`` (decreasing ``diag(H)``) is ``None`` without ``act_order``. Static groups'
    grids ``(in // g, out)`` come from the kernel as given and ``group_of`` maps each
    processed row to its group; dynamic groups' grids are made by the loop (``None``).
    """
    k = kernel.astype(jnp.float32)
    perm = jnp.argsort(-jnp.diag(h)) if act_order else None

    def ordered(a):
        return a if perm is None else a[perm]

    u, dead = inverse_hessian_factor(h if perm is None else h[perm][:, perm], damp=damp)
    kp = jnp.where(dead[:, None], 0.0, ordered(k))
    fixed = ordered(k == 0)  # kept at zero
    if not static:
        return kp, fixed, None, None, None, u, perm
    scale, zp = _group_grid(k, g=g, bits=bits, symmetric=symmetric)
    return kp, fixed, scale, zp, ordered(jnp.arange(k.shape[0], dtype=jnp.int32) // g), u, perm


@functools.partial(jax.jit, static_argnames=("g", "bits", "symmetric", "static"))
def _epilogue(new_kp, perm, scale, zp, *, g, bits, symmetric, static):
    """The loop's result back in input order, on its grid: ``(kernel, codes, g_idx)``.

    Static groups' grids are in input order already; dynamic groups' grids are those of
    every ``g`` rows in the loop's (possibly permuted) order, which ``g_idx`` maps to.
    """
    cols = new_kp.shape[0]
    inverse = None if perm is None else jnp.argsort(perm)  # row i of the input sits at position inverse[i]
    new_k = new_kp if perm is None else new_kp[inverse]
    g_idx = None if static or perm is None else (inverse // g).astype(jnp.int32)
    if g_idx is None:  # contiguous groups of g inputs
        grouped = new_k.reshape(cols // g, g, -1)
        codes = grid.round_codes(grouped, scale[:, None], zp[:, None], bits=bits, symmetric=symmetric)
        codes = codes.reshape(new_k.shape)
    else:
        codes = grid.round_codes(new_k, scale[g_idx], zp[g_idx], bits=bits, symmetric=symmetric)
    qp = grid.QuantParams(codes, scale, zp, bits, symmetric, 1, None if g == cols else g, g_idx)
    return grid.dequantize(qp), codes, g_idx


def gptq(
    stats: dict,
    *,
    bits: spec.Spec = 4,
    group_size: int | None = None,
    act_order: bool = False,
    symmetric: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    static_groups: bool | None = None,
) -> base.Transform:
    """GPTQ on the calibrated Dense kernels.

    Args:
      stats: ``{kernel name: LayerStats}`` from :func:`jcompress.oneshot.calibrate`; the
        transform touches these kernels (narrow them with :func:`jcompress.core.masked`).
      bits: code width (2..8 usual): a value or a ``{regex: bits}`` spec.
      group_size: inputs sharing one grid (e.g. 128); it must divide every touched
        kernel's inputs; ``None`` for one grid per output unit.
      act_order: process inputs in decreasing ``diag(H)``.
      symmetric: the grid's convention (:mod:`jcompress.core.grid`); symmetric by default.
      damp: diagonal dampening as a fraction of the mean of ``diag(H)`` (0.01).
      block_size: columns per lazy-update block (128).
      static_groups: ``False``: a group's grid is computed when the loop reaches its
        block (the reference's default); with ``act_order`` the groups are then
        ``group_size`` consecutive columns of the activation order, recorded per input in
        the grid's ``g_idx``. ``True``: contiguous groups, grids from the original
        weights before the loop. ``None``: static with ``act_order``, else not.

    Returns:
      a :class:`~jcompress.core.base.Transform`: ``(params, GridAux)``; the touched
      kernels come back dequantized (float, exactly on the grid, zeros kept), the codes in
      ``aux.grids``, relative output errors in ``aux.errors``.

    Raises:
      ValueError: bad bits, a group size that does not divide a calibrated kernel's
        inputs (at construction). TypeError: ``static_groups`` not a bool or None.

    Example:
      >>> t = jc.chain(jc.oneshot.sparsegpt(stats, sparsity=0.5), jc.oneshot.gptq(stats, bits=4))
      >>> params, aux = t(params)
      >>> jc.compressed.compress(params, aux)      # sparse layout, 4-bit codes
    """
    values = [v for _, v in spec.pairs(bits, arg="bits")] if spec.is_pairs(bits) else [bits]
    for v in values:
        grid.check_bits(v, symmetric)
    _check_static_groups(static_groups, act_order)
    block_size = spec.check_value(block_size, arg="block_size", kind=int, lo=1)
    damp = spec.check_value(damp, arg="damp", kind=float, lo=0.0, hi=10.0, hi_open=True)
    if group_size is not None:
        group_size = spec.check_value(group_size, arg="group_size", kind=int, lo=1)
        for name, s in stats.items():
            n_in = (s.h if hasattr(s, "h") else s).shape[0]
            grid.check_group_size(group_size, n_in, where=f" (the {n_in} inputs of {name})")
    bits_of = per_layer(bits, stats, arg="bits")

    def solve(name, kernel, h):
        new_k, qp = quantize_matrix(
            kernel, h, bits=bits_of(name), group_size=group_size, act_order=act_order, static_groups=static_groups,
            symmetric=symmetric, block_size=block_size, damp=damp,
        )  # fmt: skip
        return new_k, qp

    def make_aux(params, extras, errors):
        return base.GridAux(dict(extras), errors)

    return layer_transform(stats, solve, make_aux, name="gptq")
