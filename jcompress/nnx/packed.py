"""Packed low-bit weights at run time: Dense and conv layers whose kernels stay integer codes in memory.

A quantized model is only smaller where it runs if its weights stay quantized there.
:func:`pack` is the model transform that does this: each chosen ``nnx.Linear`` becomes a
:class:`PackedLinear` and each chosen ``nnx.Conv`` a :class:`PackedConv`, holding the
kernel as integer codes plus the grid's scales and zero points
(:class:`~jcompress.core.grid.QuantParams`); the float kernel is rebuilt from them inside
the forward pass, under the caller's ``jax.jit``, right before the matmul or convolution.

Storage of the codes, by bit width (the grid's ``bits``). A kernel is stored as the matrix
``(K, N)`` of its codes with the last (output) axis as columns: ``(in, out)`` for a Dense
kernel, ``(kh * kw * cin, cout)`` (row-major) for a 2-D conv kernel ``(kh, kw, cin, cout)``.

* 2 to 4 bits: two codes per byte (``uint8``), packed along the rows: byte ``i`` of a
  column holds row ``2i`` in its low nibble and row ``2i + 1`` in its high nibble (an odd
  row count is padded with one zero code). Signed (symmetric) codes are stored as their
  two's-complement nibble and sign-extended when unpacked.
* 5 to 8 bits: one code per byte, ``int8`` for symmetric grids, ``uint8`` otherwise.

Scales stay float32 in the grid's own shapes (per output channel, per group of input
rows, or per tensor); zero points are stored as uint8 for asymmetric grids and not at all
for symmetric ones. The device bytes of a ``(K, N)`` kernel at ``b`` bits are ``K N b / 8``
plus 4 bytes per scale (and 1 per zero point): about 8x fewer than float32 at 4 bits and
4x at 8 bits (:func:`device_bytes` counts them from the arrays).

What this is and is not: by default the weights are dequantized to float32 and multiplied
with ``jnp.dot`` (Dense) or ``lax.conv_general_dilated`` (conv), inside the same jitted
function as the unpacking; memory and memory traffic shrink, arithmetic stays float.
W8A8 Dense layers have an integer path, opt-in with ``pack(grids, act=...)`` (the input
quantization of SmoothQuant, ``SmoothQuantAux.act``): the input is quantized to int8 codes
on the grid of :func:`jcompress.oneshot.smoothquant.fake_quant_input` (per token, or per
tensor from the calibrated ``absmax``), multiplied with the int8 weight codes by
``lax.dot_general`` accumulating in int32 (exact), and the sums are scaled by the input's
and each output column's scale in float32. It needs a symmetric 8-bit weight grid with
one scale per output column (or per tensor). Its speed depends on the backend's integer
matmul: on a loaded 2-core CPU a 4096x4096 layer ran 1.8-2x faster than float32 at 16
tokens, 1.15x at 256, and 6x slower at 1 token, where XLA converts the int8
matrix-vector product to int32 (BENCHMARKS.md, B8); int8 tensor cores and the TPU MXU are
untested. There is no Pallas kernel and no integer conv path, so other layers run at
float speed (or a little slower: the unpacking is extra work).

Example:
  >>> params, aux = jc.quant.quantize(bits=4, group_size=32)(nnx.state(model, nnx.Param))
  >>> small, paux = pack(aux)(model)   # quantized nnx.Linear / nnx.Conv now PackedLinear / PackedConv
  >>> device_bytes(small) < device_bytes(model) / 6
  True
  >>> w8, sq = jc.oneshot.smoothquant(stats, channels, groups=groups)(nnx.state(model, nnx.Param))
  >>> int8_model, _ = pack(sq, act=sq.act)(models.merge(model, jc.to_pure_dict(w8)))   # int8 x int8 -> int32
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jcompress.core import base
from jcompress.core import spec as spec_lib
from jcompress.core.grid import QuantParams, dequantize
from jcompress.nnx import hooks

__all__ = [
    "PackedCodes",
    "PackedConv",
    "PackedLinear",
    "QuantScale",
    "device_bytes",
    "pack",
    "pack_codes",
    "quantize_input",
    "unpack_codes",
]


class PackedCodes(nnx.Variable):
    """Integer codes of a packed kernel (not trainable, so not an ``nnx.Param``)."""


class QuantScale(nnx.Variable):
    """Scales and zero points of a packed kernel (not trainable)."""


def _nibbles(bits: int) -> bool:
    return bits <= 4


@functools.partial(jax.jit, static_argnames=("bits", "symmetric"))
def pack_codes(codes: jax.Array, *, bits: int, symmetric: bool) -> jax.Array:
    """Integer codes ``(K, N)`` in their grid's range as stored bytes (see the module docstring).

    Returns:
      ``uint8 (ceil(K / 2), N)`` for ``bits <= 4``; ``int8 (K, N)`` (symmetric) or
      ``uint8 (K, N)`` otherwise, for ``bits <= 8``.
    """
    codes = jnp.asarray(codes, jnp.int32)
    if not _nibbles(bits):
        return codes.astype(jnp.int8 if symmetric else jnp.uint8)
    if codes.shape[0] % 2:
        codes = jnp.concatenate([codes, jnp.zeros((1, *codes.shape[1:]), jnp.int32)])
    low, high = codes[0::2] & 0xF, codes[1::2] & 0xF
    return (low | (high << 4)).astype(jnp.uint8)


def unpack_codes(stored: jax.Array, *, rows: int, bits: int, symmetric: bool) -> jax.Array:
    """The int32 codes ``(rows, N)`` of :func:`pack_codes`'s output (exact inverse)."""
    if not _nibbles(bits):
        return stored.astype(jnp.int32)
    b = stored.astype(jnp.int32)
    both = jnp.stack([b & 0xF, b >> 4], axis=1).reshape(-1, *b.shape[1:])[:rows]
    return ((both ^ 8) - 8) if symmetric else both


class _PackedKernel(nnx.Module):
    """The packed codes, scales and zero points of one kernel, and its dequantization."""

    def __init__(self, qp: QuantParams):
        if qp.bits > 8:
            raise ValueError(f"bits={qp.bits}: packed storage holds 2 to 8 bits; dequantize wider grids instead")
        self.kernel_shape = tuple(int(d) for d in qp.shape)
        self.bits, self.symmetric, self.axis, self.group_size = qp.bits, qp.symmetric, qp.axis, qp.group_size
        matrix = jnp.reshape(qp.codes, (-1, self.kernel_shape[-1]))  # (K, N): outputs as columns
        self.codes = PackedCodes(pack_codes(matrix, bits=qp.bits, symmetric=qp.symmetric))
        self.scale = QuantScale(jnp.asarray(qp.scale, jnp.float32))
        # symmetric grids have zero points of 0: nothing to store; others fit a byte (<= 8 bits)
        self.zero_point = None if qp.symmetric else QuantScale(jnp.asarray(qp.zero_point, jnp.uint8))
        # the group of each input row (GPTQ's dynamic act-order groups), None for contiguous groups
        self.g_idx = None if qp.g_idx is None else QuantScale(jnp.asarray(qp.g_idx, jnp.int32))

    def kernel(self) -> jax.Array:
        """The float32 kernel (its original shape) the codes stand for (what the forward pass uses)."""
        rows = math.prod(self.kernel_shape[:-1])
        matrix = unpack_codes(self.codes.get_value(), rows=rows, bits=self.bits, symmetric=self.symmetric)
        scale = self.scale.get_value()
        zp = (
            jnp.zeros(scale.shape, jnp.int32)
            if self.zero_point is None
            else self.zero_point.get_value().astype(jnp.int32)
        )
        codes = matrix.reshape(self.kernel_shape)
        g_idx = None if self.g_idx is None else self.g_idx.get_value()
        return dequantize(QuantParams(codes, scale, zp, self.bits, self.symmetric, self.axis, self.group_size, g_idx))


def quantize_input(x: jax.Array, *, bits: int, per_token: bool, absmax=None) -> tuple[jax.Array, jax.Array]:
    """The int8 codes and float32 scale of ``x`` ``(..., in)`` on a symmetric activation grid.

    The grid of :func:`jcompress.oneshot.smoothquant.fake_quant_input`: per token the scale
    of each row is ``max |row| / (2^(bits-1) - 1)``; per tensor it is ``absmax / (2^(bits-1)
    - 1)`` and values beyond ``absmax`` are clipped; a zero maximum gives scale ``1 / qmax``.

    Returns:
      ``(codes int8 (..., in), scale float32 (..., 1) per token or () per tensor)`` with
      ``codes * scale == fake_quant_input(x, ...)`` in float32.

    Example:
      >>> codes, scale = quantize_input(x, bits=8, per_token=True)
    """
    qmax = 2 ** (bits - 1) - 1
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True) if per_token else jnp.asarray(absmax, jnp.float32)
    scale = jnp.where(amax > 0, amax, 1.0) / qmax
    codes = jnp.clip(jnp.round(xf / scale), -qmax, qmax).astype(jnp.int8)
    return codes, scale


class PackedLinear(_PackedKernel):
    """``x -> x @ dequantize(codes) + bias`` with the codes kept packed in memory.

    With ``act`` (an ``ActQuant``, SmoothQuant's input quantization of this layer) the layer
    runs in integers instead: ``x`` becomes int8 codes and a scale (:func:`quantize_input`),
    ``lax.dot_general(x_codes, w_codes, preferred_element_type=int32)`` sums the products
    exactly, and ``y = acc * x_scale * w_scale + bias`` in float32. That equals the float
    path on the fake-quantized input up to the float path's rounding.

    Attributes:
      codes: :class:`PackedCodes`, the stored bytes of the ``(in, out)`` kernel's codes.
      scale: :class:`QuantScale`, the grid's float32 scales.
      zero_point: :class:`QuantScale`, uint8 zero points (None for a symmetric grid, whose
        zero points are all 0).
      bias: the original ``nnx.Param`` ``(out,)`` or None.
      in_features, out_features, kernel_shape, bits, symmetric, axis, group_size: static.
      act_bits, act_per_token, act_absmax: static; the input grid of the integer path
        (``act_bits`` None: the float path).

    ``act`` is anything with ``bits``, ``per_token`` and ``absmax`` (SmoothQuant's
    ``ActQuant``, one value of ``SmoothQuantAux.act``).

    Inputs ``(..., in)``, outputs ``(..., out)`` in the input's dtype promoted with float32.

    Raises:
      ValueError: with ``act``, a weight grid that is not symmetric 8-bit with one scale per
        output column or per tensor (grouped, per input row, asymmetric or another width),
        or an activation width outside 2..8 bits.

    Example:
      >>> layer = PackedLinear(quantize_leaf(w, bits=8), bias, act=ActQuant(8, True, 0.0))
      >>> layer(x).shape            # (..., out), from int8 x int8 -> int32
    """

    def __init__(self, qp: QuantParams, bias: jax.Array | None, *, act=None):
        if qp.codes.ndim != 2:
            raise ValueError(f"PackedLinear needs a Dense kernel's (in, out) codes, got shape {qp.shape}")
        if act is not None:
            _check_integer_path(qp, act)
        super().__init__(qp)
        self.in_features, self.out_features = self.kernel_shape
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias))
        self.act_bits = None if act is None else int(act.bits)
        self.act_per_token = None if act is None else bool(act.per_token)
        self.act_absmax = None if act is None or act.per_token else float(act.absmax)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.act_bits is not None:
            return self._integer_call(x)
        y = jnp.dot(x, self.kernel().astype(jnp.result_type(x, jnp.float32)))
        return y if self.bias is None else y + self.bias.get_value()

    def _integer_call(self, x: jax.Array) -> jax.Array:
        x_codes, x_scale = quantize_input(x, bits=self.act_bits, per_token=self.act_per_token, absmax=self.act_absmax)
        w_codes = self.codes.get_value()  # int8 (in, out): one code per byte at 8 bits
        dims = (((x.ndim - 1,), (0,)), ((), ()))
        acc = lax.dot_general(x_codes, w_codes, dims, preferred_element_type=jnp.int32)
        w_scale = jnp.reshape(self.scale.get_value(), (-1,))  # (out,) per column, (1,) per tensor
        y = acc.astype(jnp.float32) * x_scale * w_scale
        if self.bias is not None:
            y = y + self.bias.get_value()
        return y.astype(jnp.result_type(x, jnp.float32))


def _check_integer_path(qp: QuantParams, act) -> None:
    """Refuse grids the int8 x int8 -> int32 matmul cannot take, saying why."""
    why = "the integer path accumulates int8 codes in int32 and scales each output column once"
    rows = qp.shape[0]
    if not all(hasattr(act, a) for a in ("bits", "per_token", "absmax")):
        raise TypeError(f"act must be an ActQuant(bits, per_token, absmax) (SmoothQuantAux.act), got {act!r}")
    if not 2 <= int(act.bits) <= 8:
        raise ValueError(f"act bits={act.bits}: the integer path quantizes inputs to int8 codes (2 to 8 bits)")
    if not act.per_token and not float(act.absmax) >= 0:
        raise ValueError(f"act absmax={act.absmax}: a per-tensor input grid needs a calibrated absmax >= 0")
    if qp.bits != 8:
        raise ValueError(f"weight grid of {qp.bits} bits: {why}, so it needs 8-bit weight codes (one per byte)")
    if not qp.symmetric:
        raise ValueError(f"asymmetric weight grid: {why}; zero points would need a correction term, use symmetric=True")
    grouped = qp.group_size is not None and qp.group_size != rows
    if grouped or qp.g_idx is not None or qp.axis not in (None, 1):
        kind = f"group_size={qp.group_size}" if grouped or qp.g_idx is not None else f"axis={qp.axis}"
        raise ValueError(f"weight grid with {kind}: {why}, so it needs one scale per output column (axis=-1) or per tensor")


# nnx.Conv paddings that pad the input before the convolution: not carried over
_INPUT_PADDINGS = ("CIRCULAR", "REFLECT", "CAUSAL")


def _conv_padding(padding, spatial: int) -> str | tuple[tuple[int, int], ...]:
    """An ``nnx.Conv`` padding as ``lax.conv_general_dilated`` takes it: a string or one pair per spatial axis."""
    if isinstance(padding, str):
        return padding.upper()
    if isinstance(padding, int):
        return ((padding, padding),) * spatial
    pairs = tuple((p, p) if isinstance(p, int) else tuple(int(v) for v in p) for p in padding)
    return pairs * spatial if len(pairs) == 1 else pairs


def _per_axis(value: int | Sequence[int] | None, spatial: int) -> tuple[int, ...]:
    if value is None:
        return (1,) * spatial
    return (int(value),) * spatial if isinstance(value, int) else tuple(int(v) for v in value)


class PackedConv(_PackedKernel):
    """An ``nnx.Conv`` whose kernel stays packed codes; dequantized inside the jitted convolution.

    Built from the quantization grid of a conv kernel ``(*window, cin // groups, cout)`` and
    the ``nnx.Conv`` it replaces, whose strides, padding, dilations, feature groups, bias,
    ``dtype`` and ``precision`` it keeps. The codes are stored as the matrix
    ``(prod(window) * cin // groups, cout)`` (see the module docstring).

    Attributes:
      codes, scale, zero_point: as in :class:`PackedLinear`.
      bias: the conv's ``nnx.Param`` ``(cout,)`` or None.
      kernel_shape, strides, padding, input_dilation, kernel_dilation,
      feature_group_count, dtype, precision: static.

    Inputs channels-last ``(*batch, *spatial, cin)`` (extra batch axes are flattened and
    restored, a missing one is added and removed, as ``nnx.Conv`` does); outputs
    ``(*batch, *out_spatial, cout)``.

    Example:
      >>> layer = PackedConv(jc.core.grid.quantize_leaf(conv.kernel.get_value(), bits=4), conv)
      >>> layer(x).shape == conv(x).shape
      True
    """

    def __init__(self, qp: QuantParams, conv: nnx.Conv):
        window = tuple(conv.kernel_size)
        if qp.codes.ndim != len(window) + 2:
            raise ValueError(f"PackedConv needs a conv kernel's (*window, cin, cout) codes, got shape {qp.shape}")
        if conv.mask is not None:
            raise ValueError("PackedConv: the conv has a kernel mask; multiply it into the kernel before quantizing")
        padding = _conv_padding(conv.padding, len(window))
        if isinstance(padding, str) and padding in _INPUT_PADDINGS:
            raise ValueError(f"PackedConv: padding={padding!r} is not supported; use 'SAME', 'VALID' or explicit pairs")
        super().__init__(qp)
        self.strides = _per_axis(conv.strides, len(window))
        self.padding = padding
        self.input_dilation = _per_axis(conv.input_dilation, len(window))
        self.kernel_dilation = _per_axis(conv.kernel_dilation, len(window))
        self.feature_group_count = int(conv.feature_group_count)
        self.dtype, self.precision = conv.dtype, conv.precision
        self.bias = None if conv.bias is None else nnx.Param(jnp.asarray(conv.bias.get_value()))

    def __call__(self, x: jax.Array) -> jax.Array:
        spatial = len(self.kernel_shape) - 2
        batch_shape = x.shape[: x.ndim - spatial - 1]
        x = x.reshape((-1, *x.shape[len(batch_shape) :]))
        dtype = self.dtype or jnp.result_type(x, jnp.float32)
        channels_last = (0, spatial + 1, *range(1, spatial + 1))  # N, C, spatial... of an NHWC array
        dims = lax.ConvDimensionNumbers(channels_last, (spatial + 1, spatial, *range(spatial)), channels_last)
        y = lax.conv_general_dilated(
            x.astype(dtype),
            self.kernel().astype(dtype),
            self.strides,
            self.padding,
            lhs_dilation=self.input_dilation,
            rhs_dilation=self.kernel_dilation,
            dimension_numbers=dims,
            feature_group_count=self.feature_group_count,
            precision=self.precision,
        )
        if self.bias is not None:
            y = y + self.bias.get_value().astype(dtype)
        return y.reshape((*batch_shape, *y.shape[1:]))


def _grids(grids) -> Mapping[str, QuantParams]:
    found = getattr(grids, "grids", grids)  # a GridAux or a {leaf: QuantParams} mapping
    if isinstance(grids, base.ChainAux):
        auxes = [a for a in base.all_auxes(grids) if isinstance(a, base.GridAux)]
        if len(auxes) != 1:
            raise ValueError(f"pack: the ChainAux holds {len(auxes)} GridAux records; pass the one to pack")
        found = auxes[0].grids
    if not isinstance(found, Mapping) or not all(isinstance(q, QuantParams) for q in found.values()):
        raise TypeError("pack: grids must be a GridAux (from quant.quantize, oneshot.gptq, ...) or {leaf: QuantParams}")
    return found


def pack(grids, *, act: Mapping | None = None) -> base.ModelTransform:
    """Replace the quantized Dense and conv layers of a model by packed ones.

    Each chosen ``nnx.Linear`` becomes a :class:`PackedLinear`, each chosen ``nnx.Conv`` a
    :class:`PackedConv`.

    Args:
      grids: the quantization to keep: a ``GridAux`` (``jc.quant.quantize``,
        ``jc.oneshot.gptq``, SparseGPT with ``bits=``), a ``ChainAux`` holding exactly one,
        or ``{kernel leaf name: QuantParams}``. Grids of 2 to 8 bits on Dense kernels
        ``(in, out)`` or conv kernels ``(*window, cin, cout)`` (per tensor, per channel or
        per group).
      act: ``{layer path: ActQuant}`` (``SmoothQuantAux.act``) or None (default: every
        packed layer multiplies in float). The Dense layers named here run W8A8 in
        integers (:class:`PackedLinear`, int8 x int8 -> int32 ``lax.dot_general``); their
        weight grids must be symmetric 8-bit per output column (or per tensor). The packed
        model then computes what the model with ``act_quantizer(act)`` as its hook computes,
        up to float rounding; do not add that hook to it as well.

    Returns:
      a :class:`~jcompress.core.base.ModelTransform`; ``t(model)`` returns ``(new_model,
      GridAux(grids of the packed layers, errors={}))``. The layer of kernel ``fc1/kernel`` is
      ``fc1``; by default every grid's layer is packed, ``jc.masked(pack(aux), spec)`` picks
      some. The new model's outputs equal the model's with each kernel replaced by its
      dequantized grid; ``model`` is not modified.

    Raises:
      ValueError: a chosen grid whose layer is not an ``nnx.Linear`` or ``nnx.Conv`` of the
        model, a grid whose shape differs from the kernel's, a grid wider than 8 bits, or a
        conv with a kernel mask or an input padding (circular, reflect, causal); with
        ``act``, a layer of ``act`` that has no grid or is a conv, or a weight grid the
        integer path cannot take (naming the layer and why).

    Example:
      >>> q, aux = jc.oneshot.gptq(stats, bits=4, group_size=128)(nnx.state(model, nnx.Param))
      >>> served, _ = pack(aux)(model)
    """
    table = _grids(grids)
    act = _check_act(act, table)

    def packed_layer(name: str, layer: nnx.Module) -> nnx.Module:
        a = act.get(spec_lib.layer_of(name))
        if isinstance(layer, nnx.Conv):
            if a is not None:
                raise ValueError("act: the integer path is for Dense layers; this is a conv (drop it from act)")
            return PackedConv(table[name], layer)
        return PackedLinear(table[name], None if layer.bias is None else layer.bias.get_value(), act=a)

    def apply(model, names, key):
        del key
        chosen = [n for n in names if n in table]
        found = hooks.layers(model)
        replacements = {}  # built from the input model's layers (read, never modified)
        for name in chosen:
            layer = spec_lib.layer_of(name)
            if layer not in found or not name.endswith("/kernel"):
                raise ValueError(
                    f"pack: {name!r} is not the kernel of an nnx.Linear or nnx.Conv of this model; "
                    f"its Dense and conv kernels are {sorted(n + '/kernel' for n in found)[:12]}"
                )
            kernel_shape = tuple(found[layer].kernel.get_value().shape)
            if tuple(table[name].shape) != kernel_shape:
                raise ValueError(f"pack: the grid of {name!r} has shape {table[name].shape}, the kernel {kernel_shape}")
            try:
                replacements[layer] = packed_layer(name, found[layer])
            except ValueError as e:
                raise ValueError(f"pack: layer {layer!r}: {e}") from None
        new = nnx.clone(model)
        for layer, replacement in replacements.items():
            hooks.replace(new, layer, replacement)
        return new, base.GridAux({n: table[n] for n in chosen}, {})

    return base.ModelTransform(apply, "pack", leaves=lambda params: list(table))


def _check_act(act, table: Mapping[str, QuantParams]) -> dict:
    """``act`` as ``{layer path: ActQuant}`` whose layers all have a grid in ``table``."""
    if act is None:
        return {}
    if not isinstance(act, Mapping):
        raise TypeError(f"pack: act must be {{layer path: ActQuant}} (SmoothQuantAux.act) or None, got {type(act).__name__}")
    layers = {spec_lib.layer_of(n) for n in table}
    unknown = sorted(set(act) - layers)
    if unknown:
        raise ValueError(f"pack: act names layers {unknown} that have no grid; the grids' layers are {sorted(layers)[:12]}")
    return dict(act)


def device_bytes(model: nnx.Module) -> dict[str, int]:
    """Bytes the model's arrays take in memory, from each array's ``nbytes``.

    Returns:
      ``{'params': float parameters (nnx.Param), 'packed': codes, scales and zero points of
      packed layers, 'other': every other variable (e.g. BatchNorm statistics), 'total'}``.
    """
    out = {"params": 0, "packed": 0, "other": 0}
    for _, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Variable):
            continue
        value = var.get_value()
        if value is None:
            continue
        nbytes = int(np.sum([np.dtype(a.dtype).itemsize * a.size for a in jax.tree.leaves(value)]))
        kind = (
            "params"
            if isinstance(var, nnx.Param)
            else "packed"
            if isinstance(var, (PackedCodes, QuantScale))
            else "other"
        )
        out[kind] += nbytes
    out["total"] = sum(out.values())
    return out
