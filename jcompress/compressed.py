"""Compressed leaf types: what a compressed weight really stores, and its exact size.

Each type is a small pytree-registered dataclass (its arrays are pytree children, its
shape and hyperparameters static metadata, so it passes through ``jax.jit``) with

* ``dequantize() -> jax.Array``: the dense float weight the model computes with;
* ``nbits() -> int``: the exact number of bits its payloads take in the compressed file
  (before each payload is padded to whole bytes);
* ``encode() -> (fields, payloads)`` / ``decode(fields, payloads)``: the storage format,
  used by :mod:`jcompress.export`. ``nbits`` is computed from ``encode``, so the report,
  the file and the forward pass read the same values.

Types:

* :class:`DenseTensor`: a plain array (float32 baseline, biases, norms).
* :class:`SparseTensor`: Deep Compression's relative index (gaps of ``index_bits`` bits,
  filler zeros for long runs) plus one float value per entry.
* :class:`CodebookTensor`: k-means weight sharing; a codebook whose entry 0 is the exact
  zero and one index per stored weight; dense layout (an index per weight) or sparse
  layout (relative index, as above); both streams optionally Huffman coded.
* :class:`QuantizedTensor`: uniform quantization codes (from ``jcompress.quant``),
  bit-packed in the file, with scales and zero points; dense layout (a code per weight)
  or, for pruned weights, sparse layout (relative index, as above, and a code per entry;
  the weights left out are those whose code is the code of zero).

:func:`compress` builds a tree of these from params and the auxes of the transforms
(``MaskAux`` masks, ``CodebookAux`` codebooks, ``GridAux`` grids).

Example:
  >>> t = jc.chain(jc.pruning.magnitude(sparsity=0.9), jc.sharing.kmeans(k=31))
  >>> shared, aux = t(params)
  >>> ctree = compress(shared, aux)
  >>> total_bits(ctree) / 8            # bytes of all payloads
  >>> dequantize_tree(ctree)           # == shared, exactly
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import bitpack, tree
from jcompress import huffman as huff
from jcompress.core import base, grid
from jcompress.core import spec as spec_lib

__all__ = [
    "LEAF_TYPES",
    "CodebookTensor",
    "DenseTensor",
    "QuantizedTensor",
    "SparseTensor",
    "compress",
    "dequantize_tree",
    "is_compressed",
    "nonzeros",
    "paper_widths",
    "total_bits",
]


def _dtype_name(x) -> str:
    return jnp.dtype(jnp.asarray(x).dtype).name


def _raw(x, dtype: str) -> tuple[bytes, int]:
    arr = np.ascontiguousarray(np.asarray(x).astype(jnp.dtype(dtype)).reshape(-1)).view(np.uint8)
    if arr.dtype.itemsize and np.dtype(jnp.dtype(dtype)).byteorder == ">":
        raise ValueError(f"big-endian dtype {dtype} is not supported")
    return arr.tobytes(), arr.size * 8


def _from_raw(data: bytes, dtype: str, shape) -> np.ndarray:
    return np.frombuffer(data, dtype=jnp.dtype(dtype)).reshape(shape).copy()


def _stream(values: np.ndarray, alphabet: int, use_huffman: bool, name: str) -> tuple[dict, list]:
    """Encode an integer stream in ``[0, alphabet)``: Huffman (with its length table) or fixed width."""
    values = np.asarray(values, np.int64).reshape(-1)
    if not use_huffman:
        width = max(1, math.ceil(math.log2(alphabet)))
        return {f"{name}_width": width}, [(name, bitpack.pack(values, bits=width), values.size * width)]
    freqs = np.bincount(values, minlength=alphabet) if values.size else np.zeros(alphabet, np.int64)
    lengths = huff.code_lengths(freqs)
    used = int(np.flatnonzero(lengths).max()) + 1 if lengths.any() else 0
    code = huff.canonical(lengths)
    data, nb = huff.encode(values, code) if values.size else (b"", 0)
    table = lengths[:used].astype(np.uint8).tobytes()
    return {}, [(f"{name}_table", table, 8 * len(table)), (name, data, nb)]


def _unstream(fields: dict, payloads: dict, name: str, count: int) -> np.ndarray:
    if f"{name}_width" in fields:
        return bitpack.unpack(payloads[name], bits=int(fields[f"{name}_width"]), count=count).astype(np.int64)
    lengths = np.frombuffer(payloads[f"{name}_table"], np.uint8).astype(np.int64)
    return huff.decode(payloads[name], huff.canonical(lengths), count=count)


def _register(cls, data, meta):
    cls = dataclasses.dataclass(frozen=True)(cls)
    return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)


class _Leaf:
    """Shared behaviour: exact size from the encoding."""

    def nbits(self) -> int:
        """Exact bits of this leaf's payloads in the file (without byte padding)."""
        return int(sum(nb for _, _, nb in self.encode()[1]))


@functools.partial(_register, data=["value"], meta=[])
class DenseTensor(_Leaf):
    """An uncompressed array, stored raw in its dtype.

    Attributes:
      value: any-shape array (float32 for the dense baseline).
    """

    value: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(np.shape(self.value))

    def dequantize(self) -> jax.Array:
        return jnp.asarray(self.value)

    def encode(self):
        dtype = _dtype_name(self.value)
        data, nb = _raw(self.value, dtype)
        return {"shape": list(self.shape), "dtype": dtype}, [("value", data, nb)]

    @classmethod
    def decode(cls, fields: dict, payloads: dict) -> DenseTensor:
        return cls(_from_raw(payloads["value"], fields["dtype"], tuple(fields["shape"])))


def _traced(*xs) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in xs)


def _scatter(gaps, values, shape, fill=0) -> jax.Array:
    """Dense array of ``shape`` with ``values`` at the relative-index positions ``gaps``.

    Positions without an entry hold ``fill`` (a scalar or an array that broadcasts to
    ``shape``). Concrete inputs are placed with numpy (exact, and no per-shape
    compilation); traced inputs with ``jnp`` so that the leaf can be dequantized inside
    ``jax.jit``.
    """
    n = math.prod(shape)
    if _traced(gaps, values, fill):
        pos = jnp.cumsum(jnp.asarray(gaps, jnp.int32) + 1) - 1
        base = jnp.broadcast_to(jnp.asarray(fill, values.dtype), shape).reshape(n)
        return base.at[pos].set(values).reshape(shape)
    values = np.asarray(values)
    out = np.array(np.broadcast_to(fill, shape), values.dtype).reshape(n)
    out[np.cumsum(np.asarray(gaps, np.int64) + 1) - 1] = values
    return jnp.asarray(out.reshape(shape))


@functools.partial(_register, data=["gaps", "values"], meta=["shape", "index_bits"])
class SparseTensor(_Leaf):
    """A pruned tensor in Deep Compression's relative-index format.

    Attributes:
      gaps: ``(E,)`` int32; zeros skipped before each entry, each ``< 2**index_bits``.
      values: ``(E,)`` float; the entries' values (0 for filler entries).
      shape: the dense shape.
      index_bits: width of a relative index (5 fc, 8 conv in the paper).
    """

    gaps: Any
    values: Any
    shape: tuple
    index_bits: int

    @classmethod
    def from_dense(cls, w, *, index_bits: int) -> SparseTensor:
        """Store the nonzeros of ``w`` (any shape, float)."""
        arr = np.asarray(w)
        nz = arr.reshape(-1) != 0
        gaps, slots = huff.relative_index(nz.astype(np.int64) * (1 + np.arange(arr.size)), index_bits=index_bits)
        vals = np.where(slots > 0, arr.reshape(-1)[np.maximum(slots - 1, 0)], 0).astype(arr.dtype)
        return cls(gaps.astype(np.int32), vals, tuple(arr.shape), int(index_bits))

    def dequantize(self) -> jax.Array:
        return _scatter(self.gaps, self.values, self.shape)

    def encode(self):
        dtype = _dtype_name(self.values)
        data, nb = _raw(self.values, dtype)
        gaps = np.asarray(self.gaps)
        fields = {"shape": list(self.shape), "dtype": dtype, "index_bits": self.index_bits, "entries": int(gaps.size)}
        return fields, [
            ("gaps", bitpack.pack(gaps, bits=self.index_bits), gaps.size * self.index_bits),
            ("values", data, nb),
        ]

    @classmethod
    def decode(cls, fields: dict, payloads: dict) -> SparseTensor:
        e = int(fields["entries"])
        gaps = bitpack.unpack(payloads["gaps"], bits=int(fields["index_bits"]), count=e)
        return cls(
            gaps,
            _from_raw(payloads["values"], fields["dtype"], (e,)),
            tuple(fields["shape"]),
            int(fields["index_bits"]),
        )


@functools.partial(_register, data=["codebook", "codes", "gaps"], meta=["shape", "index_bits", "huffman"])
class CodebookTensor(_Leaf):
    """A weight-shared tensor: ``codebook[codes]`` at the stored positions.

    Attributes:
      codebook: ``(k + 1,)`` float; ``codebook[0] == 0`` (the zero, not stored in the file).
      codes: ``(E,)`` int32 indices into the codebook, one per stored entry.
      gaps: ``(E,)`` int32 relative indices (sparse layout) or ``None`` (dense layout:
        one code per weight in C order, ``E == prod(shape)``).
      shape: the dense shape.
      index_bits: relative-index width for the sparse layout, ``None`` for dense.
      huffman: Huffman-code the ``codes`` and ``gaps`` streams in the file (else fixed
        width: ``ceil(log2(k + 1))`` bits per code and ``index_bits`` per gap).
    """

    codebook: Any
    codes: Any
    gaps: Any
    shape: tuple
    index_bits: int | None
    huffman: bool

    @classmethod
    def from_indices(cls, indices, codebook, *, index_bits: int | None, huffman: bool = True) -> CodebookTensor:
        """From ``CodebookAux`` indices (0 = zero) and a ``(k + 1,)`` codebook with ``codebook[0] == 0``."""
        idx = np.asarray(indices)
        cb = np.asarray(codebook)
        if cb.ndim != 1 or cb.size < 1 or cb[0] != 0:
            raise ValueError(
                f"codebook must be 1-D with codebook[0] == 0 (the zero), got {cb[:3]}... of shape {cb.shape}"
            )
        if idx.size and (idx.min() < 0 or idx.max() >= cb.size):
            raise ValueError(f"indices must lie in [0, {cb.size}), got [{idx.min()}, {idx.max()}]")
        if index_bits is None:
            return cls(cb, idx.reshape(-1).astype(np.int32), None, tuple(idx.shape), None, bool(huffman))
        gaps, codes = huff.relative_index(idx.reshape(-1), index_bits=index_bits)
        return cls(cb, codes.astype(np.int32), gaps.astype(np.int32), tuple(idx.shape), int(index_bits), bool(huffman))

    @property
    def k(self) -> int:
        return int(np.shape(self.codebook)[0]) - 1

    def dequantize(self) -> jax.Array:
        xp = jnp if _traced(self.codebook, self.codes, self.gaps) else np
        vals = xp.asarray(self.codebook)[xp.asarray(self.codes)]
        if self.gaps is None:
            return jnp.asarray(vals.reshape(self.shape))
        return _scatter(self.gaps, vals, self.shape)

    def encode(self):
        dtype = _dtype_name(self.codebook)
        cbytes, cbits = _raw(np.asarray(self.codebook)[1:], dtype)
        codes = np.asarray(self.codes)
        fields = {
            "shape": list(self.shape),
            "dtype": dtype,
            "k": self.k,
            "index_bits": self.index_bits,
            "huffman": self.huffman,
            "entries": int(codes.size),
        }
        payloads = [("codebook", cbytes, cbits)]
        f, p = _stream(codes, self.k + 1, self.huffman, "codes")
        fields.update(f)
        payloads += p
        if self.gaps is not None:
            f, p = _stream(np.asarray(self.gaps), 1 << self.index_bits, self.huffman, "gaps")
            fields.update(f)
            payloads += p
        return fields, payloads

    @classmethod
    def decode(cls, fields: dict, payloads: dict) -> CodebookTensor:
        e, k = int(fields["entries"]), int(fields["k"])
        cb = np.concatenate(
            [np.zeros(1, jnp.dtype(fields["dtype"])), _from_raw(payloads["codebook"], fields["dtype"], (k,))]
        )
        codes = _unstream(fields, payloads, "codes", e).astype(np.int32)
        if codes.size and codes.max() > k:
            raise ValueError(f"decoded code {codes.max()} is outside the codebook of {k + 1} entries")
        gaps = None if fields["index_bits"] is None else _unstream(fields, payloads, "gaps", e).astype(np.int32)
        return cls(cb, codes, gaps, tuple(fields["shape"]), fields["index_bits"], bool(fields["huffman"]))


def _zero_codes(zero_point, shape, axis, group_size, xp, g_idx=None):
    """The code of a zero weight at each position: ``zero_point`` spread over its group.

    Returns an array that broadcasts to ``shape`` (``zero_point`` itself per tensor and
    per channel; for groups, ``(K // g, C)`` repeated over the ``g`` rows of each group,
    or taken at ``g_idx`` per row, and laid out as the weight, as in ``jcompress.core.grid``).
    """
    zp = xp.asarray(zero_point)
    if group_size is None:
        return zp
    moved = tuple(d for i, d in enumerate(shape) if i != axis) + (shape[axis],)
    rows = zp[xp.asarray(g_idx)] if g_idx is not None else xp.repeat(zp, group_size, axis=0)
    return xp.moveaxis(rows.reshape(moved), -1, axis)


@functools.partial(
    _register,
    data=["codes", "scale", "zero_point", "gaps", "g_idx"],
    meta=["shape", "bits", "symmetric", "axis", "group_size", "index_bits"],
)
class QuantizedTensor(_Leaf):
    """Uniform quantization codes with their scales (see ``jcompress.core.grid.QuantParams``).

    Dense layout: one code per weight. Sparse layout (for pruned weights): Deep
    Compression's relative index over the weights whose code is not the code of zero
    (``zero_point`` of their channel or group, 0 when symmetric), and one code per entry;
    filler entries hold the zero code of their position, so they and all positions
    without an entry dequantize to exactly 0. Codes are held unpacked (int32) in memory
    and bit-packed in the file at ``bits`` bits each (offset by the lowest code so that
    they are unsigned), gaps at ``index_bits`` bits each. Scales are stored as float32;
    zero points (int32) only for asymmetric quantization.

    Attributes:
      codes: int32; ``shape`` (dense layout) or ``(E,)``, one per entry (sparse layout).
      scale, zero_point: as in ``QuantParams``.
      gaps: ``(E,)`` int32 relative indices (sparse layout) or ``None`` (dense layout).
      shape: the dense shape.
      bits, symmetric, axis, group_size: as in ``QuantParams``.
      index_bits: relative-index width for the sparse layout, ``None`` for dense.
      g_idx: int32 ``(K,)`` group of each row, as in ``QuantParams`` (GPTQ's dynamic
        activation-order groups), or ``None`` for contiguous groups; stored as int32.
    """

    codes: Any
    scale: Any
    zero_point: Any
    gaps: Any
    shape: tuple
    bits: int
    symmetric: bool
    axis: int | None
    group_size: int | None
    index_bits: int | None
    g_idx: Any = None

    @classmethod
    def from_qparams(cls, qp, *, index_bits: int | None = None) -> QuantizedTensor:
        """From ``QuantParams``: dense layout, or sparse with relative indices of ``index_bits`` bits.

        Args:
          qp: the ``QuantParams`` (concrete arrays for the sparse layout).
          index_bits: ``None`` for the dense layout, else the relative-index width.

        Returns:
          a :class:`QuantizedTensor` whose ``dequantize()`` equals ``grid.dequantize(qp)`` bit for bit.
        """
        meta = (qp.bits, qp.symmetric, qp.axis, qp.group_size)
        gi = qp.g_idx
        if index_bits is None:
            return cls(qp.codes, qp.scale, qp.zero_point, None, tuple(np.shape(qp.codes)), *meta, None, gi)
        codes, zp = np.asarray(qp.codes), np.asarray(qp.zero_point)
        zero = np.broadcast_to(_zero_codes(zp, codes.shape, qp.axis, qp.group_size, np, gi), codes.shape)
        gaps, _ = huff.relative_index((codes != zero).astype(np.int64), index_bits=index_bits)
        kept = codes.reshape(-1)[np.cumsum(gaps + 1) - 1]  # a filler's position holds the zero code
        sparse = (gaps.astype(np.int32), codes.shape, *meta, int(index_bits), gi)
        return cls(kept.astype(np.int32), qp.scale, zp, *sparse)

    def dense_codes(self) -> jax.Array:
        """The codes of all weights (``shape``), the zero codes filled in for the sparse layout."""
        if self.gaps is None:
            return jnp.asarray(self.codes)
        xp = jnp if _traced(self.codes, self.zero_point, self.gaps, self.g_idx) else np
        zero = _zero_codes(self.zero_point, self.shape, self.axis, self.group_size, xp, self.g_idx)
        return _scatter(self.gaps, self.codes, self.shape, fill=zero)

    def to_qparams(self) -> grid.QuantParams:
        """The ``QuantParams`` (dense codes in either layout)."""
        return grid.QuantParams(
            self.dense_codes(),
            jnp.asarray(self.scale),
            jnp.asarray(self.zero_point),
            self.bits,
            self.symmetric,
            self.axis,
            self.group_size,
            None if self.g_idx is None else jnp.asarray(self.g_idx, jnp.int32),
        )

    def dequantize(self) -> jax.Array:
        return grid.dequantize(self.to_qparams())

    def encode(self):
        lo, _ = grid.code_range(self.bits, self.symmetric)
        codes = np.asarray(self.codes).astype(np.int64) - lo
        sbytes, sbits = _raw(self.scale, "float32")
        fields = {
            "shape": list(self.shape),
            "bits": self.bits,
            "symmetric": self.symmetric,
            "axis": self.axis,
            "group_size": self.group_size,
            "scale_shape": list(np.shape(self.scale)),
            "offset": lo,
        }
        payloads = [("codes", bitpack.pack(codes, bits=self.bits), codes.size * self.bits)]
        if self.gaps is not None:  # the dense layout's fields and payloads are as before it (old files load)
            gaps = np.asarray(self.gaps)
            fields.update(index_bits=self.index_bits, entries=int(gaps.size))
            payloads.append(("gaps", bitpack.pack(gaps, bits=self.index_bits), gaps.size * self.index_bits))
        payloads.append(("scale", sbytes, sbits))
        if not self.symmetric:
            zbytes, zbits = _raw(self.zero_point, "int32")
            payloads.append(("zero_point", zbytes, zbits))
        if self.g_idx is not None:  # only GPTQ's dynamic act-order groups; other files are as before
            gbytes, gbits = _raw(self.g_idx, "int32")
            payloads.append(("g_idx", gbytes, gbits))
        return fields, payloads

    @classmethod
    def decode(cls, fields: dict, payloads: dict) -> QuantizedTensor:
        shape, sshape = tuple(fields["shape"]), tuple(fields["scale_shape"])
        ib = fields.get("index_bits")  # absent in the dense layout
        count = math.prod(shape) if ib is None else int(fields["entries"])
        codes = bitpack.unpack(payloads["codes"], bits=int(fields["bits"]), count=count)
        codes = (codes.astype(np.int64) + int(fields["offset"])).astype(np.int32)
        gaps = None
        if ib is None:
            codes = codes.reshape(shape)
        else:
            gaps = bitpack.unpack(payloads["gaps"], bits=int(ib), count=count).astype(np.int32)
            if int(np.sum(gaps.astype(np.int64) + 1)) > math.prod(shape):
                raise ValueError(f"the relative index runs past the {math.prod(shape)} weights of shape {shape}")
        scale = _from_raw(payloads["scale"], "float32", sshape)
        zp = (
            _from_raw(payloads["zero_point"], "int32", sshape)
            if "zero_point" in payloads
            else np.zeros(sshape, np.int32)
        )
        meta = (int(fields["bits"]), bool(fields["symmetric"]), fields["axis"], fields["group_size"])
        g_idx = None
        if "g_idx" in payloads:
            if fields["group_size"] is None or fields["axis"] is None:
                raise ValueError("a g_idx payload needs a grouped grid (group_size and axis set)")
            k = math.prod(shape) // shape[fields["axis"]]
            g_idx = _from_raw(payloads["g_idx"], "int32", (k,))
            grid.check_g_idx(g_idx, k, int(fields["group_size"]))
        return cls(codes, scale, zp, gaps, shape, *meta, None if ib is None else int(ib), g_idx)


LEAF_TYPES = {c.__name__: c for c in (DenseTensor, SparseTensor, CodebookTensor, QuantizedTensor)}


def is_compressed(x) -> bool:
    """True for an instance of one of the compressed leaf types."""
    return isinstance(x, tuple(LEAF_TYPES.values()))


def paper_widths(spec: spec_lib.Spec, params, names, *, arg: str) -> dict[str, int]:
    """``{leaf: width}`` for the leaves ``names`` from a spec of bit widths.

    Leaves the spec does not cover (all of them for ``None``) get the paper's width
    (Deep Compression): 8 bits for conv kernels (``ndim > 2``), 5 for the rest.

    Args:
      spec: ``None``, an int, or ``{regex: int}`` / ``[(regex, int)]`` (first match wins).
      params: the parameter tree the names refer to.
      names: the leaf names to resolve.
      arg: the argument's name in error messages (``'index_bits'``).

    Raises:
      ValueError / TypeError naming ``arg`` and the leaf for a width outside [1, 16].
    """
    leaves = dict(tree.named_leaves(params))
    chosen = spec_lib.resolve(spec, names, arg=arg, default=None) if spec is not None else dict.fromkeys(names)
    out = {}
    for n in names:
        width = chosen[n] if chosen[n] is not None else (8 if np.ndim(leaves[n]) > 2 else 5)
        try:
            out[n] = spec_lib.check_value(width, arg=arg, kind=int, lo=1, hi=bitpack.MAX_BITS)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{e} (leaf {n!r})") from None
    return out


def _concrete(x, what: str) -> np.ndarray:
    if isinstance(x, jax.core.Tracer):
        raise TypeError(f"compress needs concrete arrays, {what} is traced; call it outside jax.jit")
    return np.asarray(x)


def _by_leaf(auxes) -> tuple[dict, dict, dict, set]:
    """What the auxes say about each leaf: ``(codebooks, grids, masks, factored)``, later auxes winning."""
    codebooks, grids, masks, factored = {}, {}, {}, set()
    for a in base.all_auxes(*auxes):
        if isinstance(a, base.CodebookAux):
            for g, members in a.indices.items():
                codebooks.update({name: (a.codebooks[g], idx) for name, idx in members.items()})
        elif isinstance(a, base.GridAux):
            grids.update(a.grids)
        elif isinstance(a, base.MaskAux):
            masks.update(tree.named_leaves(tree.to_pure_dict(a.masks)))
        elif isinstance(a, base.FactorAux):
            factored.update(a.factors)
        else:
            raise TypeError(
                f"compress takes the auxes of params transforms (MaskAux, CodebookAux, GridAux, FactorAux, or a "
                f"ChainAux of them), got {type(a).__name__}"
            )
    return codebooks, grids, masks, factored


def compress(params, *auxes, index_bits: spec_lib.Spec = None, huffman: bool = True, sparse: bool = True):
    """A tree of compressed leaves for ``params``, from the auxes of the transforms that made them.

    Each leaf becomes, in this order of preference: a :class:`CodebookTensor` when a
    ``CodebookAux`` covers it; a :class:`QuantizedTensor` when a ``GridAux`` covers it;
    a :class:`SparseTensor` when a ``MaskAux`` removed some of its weights; otherwise a
    :class:`DenseTensor` (a leaf of a ``FactorAux`` is stored dense, as the product its
    params hold: factorise the model, ``jcompress.nnx.factorize``, to store the factors).
    Codebook leaves use the sparse layout when they hold zeros (and ``sparse`` is true);
    quantized leaves when they hold zeros, ``sparse`` is true and it takes fewer bits
    than the dense layout (a pruned layer does; a layer with few zeros stays dense).

    Args:
      params: parameter pytree (dict or NNX State) with concrete, finite arrays; its
        values must be exactly those the auxes describe (``codebook[indices]`` /
        ``dequantize(grid)`` / zero where masked), which is checked.
      *auxes: the auxes in any order (a ``ChainAux`` is flattened; None is skipped;
        later ones win for the same leaf and kind).
      index_bits: relative-index width as a spec (an int or ``{regex: bits}``); leaves it
        does not cover get the paper's 8 bits for conv kernels, 5 for fc.
      huffman: Huffman-code codebook indices and relative indices.
      sparse: use the relative-index layout for leaves with zeros (for quantized leaves,
        only where it is smaller).

    Returns:
      nested dict (the pure-dict structure of ``params``) of compressed leaves.

    Raises:
      ValueError naming the leaf when a leaf holds NaN or Inf or the params disagree
        with an aux; TypeError for an aux that is not a params transform's.

    Example:
      >>> params, aux = jc.chain(jc.pruning.magnitude(sparsity=0.9), jc.sharing.kmeans(k=31))(params)
      >>> ctree = compress(params, aux)
    """
    pure = tree.to_pure_dict(params)
    tree.check_finite(pure)
    codebooks, grids, masks, _ = _by_leaf(auxes)
    names = [n for n, _ in tree.named_leaves(pure)]
    widths = paper_widths(index_bits, pure, names, arg="index_bits")

    def one(name, w):
        arr = _concrete(w, f"params/{name}")
        if name in codebooks:
            cb, idx = (_concrete(x, f"aux of {name}") for x in codebooks[name])
            if idx.shape != arr.shape or not np.array_equal(cb[idx], arr):
                raise ValueError(
                    f"params/{name} is not codebook[indices] of its CodebookAux (shape {arr.shape} vs {idx.shape}); "
                    "pass the aux that matches these params (after centroid fine-tuning: "
                    "jcompress.sharing.codebook_aux(params, aux))"
                )
            ib = widths[name] if sparse and np.any(idx == 0) else None
            return CodebookTensor.from_indices(idx, cb, index_bits=ib, huffman=huffman)
        if name in grids:
            qt = QuantizedTensor.from_qparams(grids[name])
            if not np.array_equal(np.asarray(qt.dequantize()).astype(arr.dtype), arr):
                raise ValueError(
                    f"params/{name} differs from dequantize of its GridAux grid; pass the aux of these params"
                )
            if sparse and np.any(arr == 0):
                st = QuantizedTensor.from_qparams(grids[name], index_bits=widths[name])
                return st if st.nbits() < qt.nbits() else qt  # a dense layer never gets bigger
            return qt
        if name in masks and sparse and arr.ndim > 0:
            m = _concrete(masks[name], f"masks/{name}")
            if m.shape != arr.shape:
                raise ValueError(f"masks/{name} has shape {m.shape}, params/{name} has {arr.shape}")
            if np.any(arr[~m] != 0):
                raise ValueError(f"params/{name} has nonzeros where its mask is False; apply the masks first")
            if not m.all():
                return SparseTensor.from_dense(arr, index_bits=widths[name])
        return DenseTensor(arr)

    return tree.map_with_names(one, pure)


def dequantize_tree(ctree):
    """The dense params (nested dict of jax arrays) of a tree of compressed leaves."""
    return jax.tree.map(lambda x: x.dequantize(), ctree, is_leaf=is_compressed)


def total_bits(ctree) -> int:
    """Sum of ``nbits()`` over the compressed leaves."""
    return int(sum(x.nbits() for x in jax.tree.leaves(ctree, is_leaf=is_compressed)))


def nonzeros(ctree) -> int:
    """Nonzero weights over all leaves (after dequantization)."""
    return int(
        sum(int(np.count_nonzero(np.asarray(x.dequantize()))) for x in jax.tree.leaves(ctree, is_leaf=is_compressed))
    )
