"""The one uniform quantization grid of jcompress (quant, qat, GPTQ and SparseGPT use it).

A float tensor ``w`` becomes integer codes ``c`` (int32) with a float32 scale ``s`` and an
int32 ``zero_point`` ``z``, so that ``w ~= (c - z) * s``. The range always contains zero
and the zero point is an integer, so an exact zero (a pruned weight, a ReLU output) stays
exactly zero (its code is ``z``).

* ``symmetric=True``: ``z = 0``, ``s = max|w| / qmax`` with ``qmax = 2**(bits-1) - 1``,
  signed codes in ``[-qmax, qmax]`` (the code ``-2**(bits-1)`` is unused, so the grid is
  symmetric around zero; 1-bit symmetric grids are refused).
* ``symmetric=False`` (min-max affine, as GPTQ's reference grid): the range
  ``[min(w, 0), max(w, 0)]`` is mapped onto unsigned codes ``[0, 2**bits - 1]``:
  ``s = (hi - lo) / (2**bits - 1)``, ``z = round(-lo / s)``.

Rounding is ``c = clip(round(w / s) + z, qmin, qmax)``. A zero range (an all-zero group)
has ``s = 0``: every code is ``z`` and every value exactly 0.

Which default: every weight grid defaults to symmetric (``jc.quant.quantize``, QAT,
``jc.oneshot.gptq`` and SparseGPT's joint quantization), as the serving layouts and
integer kernels expect; ``symmetric=False`` gives the GPTQ reference's min-max grid.
Activation ranges (``jc.quant.activations``) default to asymmetric, since activations
after a ReLU are one-sided. Both write the same :class:`QuantParams`, so storage and
``compressed.QuantizedTensor.from_qparams`` read either.

Granularity (``axis`` and ``group_size``):

* ``axis=None``: one scale for the tensor; scale and zero point have shape ``()``.
* ``axis=a``: one scale per index along ``a`` (per output channel with ``a=-1`` for a
  Dense kernel ``(in, out)`` or a conv kernel ``(kh, kw, cin, cout)``); stored with the
  tensor's shape, every axis but ``a`` set to 1.
* ``axis=a, group_size=g``: the tensor is viewed as a matrix ``(K, C)`` with the channel
  axis moved last, and each column is cut into ``K // g`` groups of ``g`` consecutive
  rows; stored as ``(K // g, C)``. ``g`` must divide ``K``.
* ``axis=a, group_size=g, g_idx=idx``: as above, but row ``k`` of the ``(K, C)`` view
  belongs to group ``idx[k]`` (int32 ``(K,)``, values in ``[0, K // g)``) instead of
  ``k // g``: GPTQ with activation order and dynamic groups forms its groups from
  ``g`` consecutive inputs of the activation order, so a group's rows are scattered.
  ``g_idx=None`` (every grid but that one) means the contiguous ``k // g``.

Example:
  >>> qp = quantize_leaf(w, bits=4, axis=-1, group_size=64, symmetric=False)  # w (256, 128)
  >>> qp.codes.shape, qp.scale.shape, qp.zero_point.dtype
  ((256, 128), (4, 128), dtype('int32'))
  >>> w_hat = dequantize(qp)        # |w - w_hat| <= scale / 2 elementwise
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jcompress.core.spec import check_flag, check_value

__all__ = [
    "ROUNDINGS",
    "QuantParams",
    "check_bits",
    "check_g_idx",
    "check_group_size",
    "code_range",
    "dequantize",
    "grid_from_range",
    "group_index",
    "quantize_leaf",
    "range_grid",
    "round_codes",
]

ROUNDINGS = ("nearest", "stochastic")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scale", "zero_point", "g_idx"],
    meta_fields=["bits", "symmetric", "axis", "group_size"],
)
@dataclasses.dataclass(frozen=True)
class QuantParams:
    """A quantized tensor: ``dequantize(qp) == (codes - zero_point) * scale`` per group.

    Attributes:
      codes: int32, the shape of the original tensor, in :func:`code_range`.
      scale: float32; ``()`` per tensor, keepdims shape per channel, ``(K // g, C)`` for groups.
      zero_point: int32, the shape of ``scale`` (all zero when symmetric).
      bits, symmetric, axis, group_size: static hyperparameters (``axis`` non-negative or
        None). They are pytree metadata, so a ``QuantParams`` passes through ``jax.jit``
        with only the arrays traced.
      g_idx: int32 ``(K,)``, the group of each row of the ``(K, C)`` view (see the module
        docstring), or ``None`` for contiguous groups ``k // group_size`` (the default;
        only GPTQ with ``act_order=True, static_groups=False`` sets it).
    """

    codes: jax.Array
    scale: jax.Array
    zero_point: jax.Array
    bits: int
    symmetric: bool
    axis: int | None
    group_size: int | None
    g_idx: jax.Array | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self, dtype=dtype)


def check_bits(bits, symmetric: bool, *, arg: str = "bits") -> int:
    """``bits`` as an int in 1..16 (2..16 when symmetric); ValueError/TypeError naming ``arg``."""
    bits = check_value(bits, arg=arg, kind=int, lo=1, hi=16)
    symmetric = check_flag(symmetric, arg="symmetric")
    if symmetric and bits == 1:
        raise ValueError(
            f"{arg}=1 with symmetric=True leaves a single code (0); use symmetric=False for 1-bit "
            "codes {0, 1}, or bits >= 2."
        )
    return bits


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """``(qmin, qmax)``: ``(-(2**(bits-1) - 1), 2**(bits-1) - 1)`` symmetric, ``(0, 2**bits - 1)`` otherwise."""
    bits = check_bits(bits, symmetric)
    if symmetric:
        q = 2 ** (bits - 1) - 1
        return -q, q
    return 0, 2**bits - 1


def check_group_size(group_size, reduction: int, *, where: str = "") -> int | None:
    """``group_size`` as an int dividing ``reduction`` (the elements per channel), or None."""
    if group_size is None:
        return None
    g = check_value(group_size, arg="group_size", kind=int, lo=1)
    if reduction % g:
        raise ValueError(
            f"group_size={g} must be a positive divisor of the reduction size {reduction}{where}; "
            "pick a divisor (for a Dense kernel (in, out): of in) or group_size=None"
        )
    return g


def group_index(k: int, group_size: int | None, g_idx=None):
    """The group of each of the ``k`` rows of the ``(K, C)`` view: ``g_idx``, else ``arange(k) // group_size``."""
    if g_idx is not None:
        return g_idx
    return np.arange(k, dtype=np.int32) // (group_size or max(k, 1))


def check_g_idx(g_idx, k: int, group_size: int, *, where: str = "") -> np.ndarray:
    """A concrete per-row group index as int32 ``(k,)`` with values in ``[0, k // group_size)``.

    Args:
      g_idx: integer array-like, the group of each of the ``k`` rows.
      k: rows of the ``(K, C)`` view (a Dense kernel's inputs).
      group_size: rows per group (it divides ``k``).
      where: appended to error messages (e.g. the tensor's name).

    Raises:
      ValueError: a wrong shape, a non-integer dtype or a group outside the range.
    """
    g = np.asarray(g_idx)
    if g.shape != (k,) or not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"g_idx{where} must be an integer array of shape ({k},), got {g.dtype} {g.shape}")
    n_groups = k // group_size
    if g.size and (g.min() < 0 or g.max() >= n_groups):
        raise ValueError(
            f"g_idx{where} holds groups {int(g.min())}..{int(g.max())}; {k} rows in groups of {group_size} "
            f"have groups 0..{n_groups - 1}"
        )
    return g.astype(np.int32)


def _safe(scale: jax.Array) -> jax.Array:
    return jnp.where(scale > 0, scale, 1.0)


def grid_from_range(lo: jax.Array, hi: jax.Array, *, bits: int, symmetric: bool) -> tuple[jax.Array, jax.Array]:
    """``(scale float32, zero_point int32)`` of the grid for the range ``[lo, hi]`` (widened to contain 0)."""
    qmin, qmax = code_range(bits, symmetric)
    lo = jnp.minimum(jnp.asarray(lo, jnp.float32), 0.0)
    hi = jnp.maximum(jnp.asarray(hi, jnp.float32), 0.0)
    if symmetric:
        scale = jnp.maximum(-lo, hi) / qmax
        return scale, jnp.zeros(scale.shape, jnp.int32)
    scale = (hi - lo) / (qmax - qmin)
    zp = jnp.clip(jnp.round(-lo / _safe(scale)), qmin, qmax).astype(jnp.int32)
    return scale, zp


def range_grid(v: jax.Array, *, axis: int, bits: int, symmetric: bool) -> tuple[jax.Array, jax.Array]:
    """The min-max grid of ``v`` over ``axis`` (kept as size 1): ``(scale, zero_point)``.

    A symmetric grid needs only ``max |v|`` (one reduction instead of a min and a max,
    which matters when ``v`` is computed on the fly, e.g. ``where(mask, w, 0)``).
    """
    if symmetric:
        amax = jnp.max(jnp.abs(v), axis=axis, keepdims=True)
        return grid_from_range(-amax, amax, bits=bits, symmetric=True)
    return grid_from_range(v.min(axis=axis, keepdims=True), v.max(axis=axis, keepdims=True), bits=bits, symmetric=False)


def round_codes(
    x: jax.Array,
    scale: jax.Array,
    zero_point: jax.Array,
    *,
    bits: int,
    symmetric: bool,
    rounding: str = "nearest",
    key: jax.Array | None = None,
) -> jax.Array:
    """int32 codes ``clip(round(x / scale) + zero_point, qmin, qmax)`` (``scale``/``zero_point`` broadcast).

    ``rounding='stochastic'`` uses ``floor(x / scale + u)``, ``u ~ U[0, 1)`` drawn with ``key``.
    """
    qmin, qmax = code_range(bits, symmetric)
    v = x / _safe(scale)
    v = jnp.floor(v + jax.random.uniform(key, v.shape, v.dtype)) if rounding == "stochastic" else jnp.round(v)
    return jnp.clip(v + zero_point, qmin, qmax).astype(jnp.int32)


def _check_axis(w: jax.Array, axis) -> int | None:
    if axis is None:
        return None
    if w.ndim == 0:
        raise ValueError("axis must be None for a scalar tensor.")
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -w.ndim <= axis < w.ndim:
        raise ValueError(f"axis={axis!r} is out of range for a tensor of shape {tuple(w.shape)}.")
    return int(axis) % w.ndim


def _grouped(w: jax.Array, axis: int | None, group_size: int | None) -> jax.Array:
    """``w`` as ``(G, g, C)``: ``C`` channels, ``G`` groups of ``g`` elements per channel."""
    if axis is None:
        return w.reshape(1, -1, 1)
    m = jnp.moveaxis(w, axis, -1)
    c = m.shape[-1]
    k = m.size // max(c, 1)
    g = k if group_size is None else group_size
    return m.reshape(k // max(g, 1), g, c)


def _one_group_2d(v: jax.Array) -> jax.Array:
    """``(1, g, C)`` -> ``(g, C)``; other shapes unchanged. Elementwise passes over a
    per-channel or per-tensor view run on the 2-D array: XLA's CPU loops over the 3-D one
    (leading axis of 1) ran about 3x slower on a 64 MB kernel."""
    return v[0] if v.ndim == 3 and v.shape[0] == 1 else v


def _ungrouped(v: jax.Array, shape: tuple[int, ...], axis: int | None) -> jax.Array:
    if axis is None:
        return v.reshape(shape)
    moved = tuple(d for i, d in enumerate(shape) if i != axis) + (shape[axis],)
    return jnp.moveaxis(v.reshape(moved), -1, axis)


def _stored_shape(shape: tuple[int, ...], axis: int | None, group_size: int | None, n_groups: int) -> tuple:
    if axis is None:
        return ()
    if group_size is None:
        return tuple(d if i == axis else 1 for i, d in enumerate(shape))
    return (n_groups, shape[axis])


def quantize_leaf(
    w: jax.Array,
    *,
    bits: int,
    axis: int | None = -1,
    group_size: int | None = None,
    symmetric: bool = True,
    rounding: str = "nearest",
    key: jax.Array | None = None,
) -> QuantParams:
    """Integer codes, scales and zero points of one float array.

    Args:
      w: float array of any shape (not mutated).
      bits: code width, 1..16 (2..16 when ``symmetric``).
      axis: channel axis of the per-channel scales (default the last: output channels);
        ``None`` for one scale.
      group_size: elements per group along the reduction axis (needs ``axis``; must
        divide the number of elements per channel).
      symmetric: symmetric signed codes with zero point 0, or min-max affine codes.
      rounding: ``'nearest'`` (error <= scale / 2) or ``'stochastic'`` (unbiased).
      key: PRNG key, required for stochastic rounding.

    Returns:
      :class:`QuantParams` with int32 ``codes`` of ``w.shape``.

    Raises:
      ValueError: bad bits, axis, group size or rounding, a missing key, NaN/Inf in a
        concrete ``w``. TypeError: integer or bool ``w``.

    Example:
      >>> qp = quantize_leaf(kernel, bits=4, axis=-1, group_size=64)  # kernel (256, 128)
      >>> qp.scale.shape
      (4, 128)
    """
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"w has dtype {w.dtype}; a floating dtype is needed (cast with .astype(jnp.float32)).")
    if not isinstance(w, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError("w contains NaN or Inf; quantization of non-finite values is undefined.")
    bits = check_bits(bits, symmetric)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r} must be one of {ROUNDINGS}.")
    if rounding == "stochastic" and key is None:
        raise ValueError("rounding='stochastic' needs key=jax.random.key(...).")
    axis = _check_axis(w, axis)
    if group_size is not None:
        if axis is None:
            raise ValueError(
                "group_size needs a channel axis (groups run along the other axes); pass axis=-1 "
                "for a Dense kernel (in, out) or a conv kernel (kh, kw, cin, cout)."
            )
        k = w.size // w.shape[axis] if w.shape[axis] else 0
        group_size = check_group_size(group_size, k, where=f" (the elements per channel of shape {tuple(w.shape)})")
    v = _grouped(w.astype(jnp.float32), axis, group_size)
    scale, zp = range_grid(v, axis=1, bits=bits, symmetric=symmetric)
    codes = round_codes(
        _one_group_2d(v), _one_group_2d(scale), _one_group_2d(zp), bits=bits, symmetric=symmetric,
        rounding=rounding, key=key,
    )  # fmt: skip
    stored = _stored_shape(w.shape, axis, group_size, v.shape[0])
    return QuantParams(
        codes=_ungrouped(codes, w.shape, axis),
        scale=scale.reshape(stored),
        zero_point=zp.reshape(stored),
        bits=bits,
        symmetric=bool(symmetric),
        axis=axis,
        group_size=group_size,
    )


def dequantize(qp: QuantParams, *, dtype=jnp.float32) -> jax.Array:
    """``(codes - zero_point) * scale`` with each scale broadcast over its group; shape of ``codes``.

    With ``qp.g_idx``, row ``k`` of the ``(K, C)`` view takes the scale and zero point of
    group ``g_idx[k]``.
    """
    if qp.g_idx is not None:
        m = jnp.moveaxis(jnp.asarray(qp.codes), qp.axis, -1)
        c = m.shape[-1]
        m = m.reshape(-1, c)
        gi = jnp.asarray(qp.g_idx)
        scale = jnp.reshape(qp.scale, (-1, c))[gi]
        zp = jnp.reshape(qp.zero_point, (-1, c))[gi]
        out = (m - zp).astype(jnp.float32) * scale
        return _ungrouped(out, tuple(qp.codes.shape), qp.axis).astype(dtype)
    v = _grouped(jnp.asarray(qp.codes), qp.axis, qp.group_size)
    shape = (v.shape[0], 1, v.shape[2])
    v, zp, scale = (
        _one_group_2d(a) for a in (v, jnp.reshape(qp.zero_point, shape), jnp.reshape(qp.scale, shape))
    )
    out = (v - zp).astype(jnp.float32) * scale
    return _ungrouped(out, tuple(qp.codes.shape), qp.axis).astype(dtype)
