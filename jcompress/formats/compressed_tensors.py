"""The compressed-tensors checkpoint layout (written by llm-compressor; read by transformers, vLLM, SGLang).

A folder holds ``config.json`` (the model's config with a ``quantization_config``),
``model.safetensors`` and the tokenizer files. For each quantized Linear module ``m``
(a jcompress Dense kernel ``(in, out)``, stored as PyTorch's ``(out, in)``):

=========================  =====================  ==========================================
tensor                     dtype, shape           content
=========================  =====================  ==========================================
``m.weight_packed``        int32 ``(out, W)``     ``pack-quantized``: the codes plus
                                                  ``2**(bits-1)`` (unsigned), packed along
                                                  the input dim, ``W = ceil(in*bits/32)``
``m.weight``               int8 ``(out, in)``     ``naive-quantized``: the signed codes
                           float8_e4m3fn          ``float-quantized``: e4m3 values
                                                  (:class:`Float8Grid`, e.g. from
                                                  :func:`float8_grid`), channel or tensor scale
``m.weight_shape``         int64 ``(2,)``         ``(out, in)`` (``pack-quantized`` only)
``m.weight_scale``         float32                ``(1,)`` tensor, ``(out, 1)`` channel,
                                                  ``(out, in // group_size)`` group strategy
``m.weight_zero_point``    int32 / int8           asymmetric only: the signed zero point,
                                                  packed like the codes but along the
                                                  output dim, ``(ceil(out*bits/32), groups)``
                                                  (int8, unpacked, for ``tensor`` or
                                                  ``naive-quantized``)
``m.weight_g_idx``         int32 ``(in,)``        ``actorder: "group"`` only: the group of
                                                  each input (scale column ``g_idx[i]``)
=========================  =====================  ==========================================

The layout's codes are signed (``[-2**(bits-1), 2**(bits-1) - 1]``) and a weight is
``(code - zero_point) * scale``. jcompress's symmetric codes are already signed; its
asymmetric codes and zero points are unsigned ``[0, 2**bits - 1]`` and are stored minus
``2**(bits-1)``. Since the packing adds ``2**(bits-1)`` back, the packed words hold
jcompress's asymmetric codes unchanged. Dequantized weights agree exactly with
:func:`jcompress.core.grid.dequantize` (float32 scales, integer differences).

Activation order: jcompress's GPTQ with ``act_order=True`` and static groups (its
default) keeps its groups contiguous in the input order, which the layout records as
``actorder: "weight"`` (pass ``actorder="weight"`` to :func:`write`) and which needs no
``weight_g_idx``. With ``static_groups=False`` a grid carries a per-input group index
(``QuantParams.g_idx``); :func:`write` stores it as ``weight_g_idx`` (int32) under a
scheme with ``actorder: "group"``, and :func:`read` reads such a folder back to the same
grid. compressed-tensors 0.19 removed ``actorder: "group"`` (its last release to
decompress ``weight_g_idx`` is 0.18); vLLM's loaders and older releases read it. A
``weight_g_idx`` equal to the contiguous index, or holding the library's ``-1``
placeholder, is read as contiguous groups.

2:4 sparse float weights (``sparsity="sparse-24-bitmask"`` in :func:`write`): a float
Linear weight ``(out, in)`` in which every 4 consecutive inputs of a row hold at most 2
non-zeros (SparseGPT or Wanda with ``n_m=(2, 4)``) is stored as ``m.shape`` (int64
``(2, 1)``: out, in), ``m.compressed`` (its dtype, ``(out, in / 2)``: the 2 kept values of
every 4, row by row; a group with fewer non-zeros keeps its first zeros) and ``m.bitmask``
(uint8 ``(out, ceil(in / 8))``: the kept positions, bits in little-endian order within each
byte), with ``sparsity_config`` (``format: "sparse-24-bitmask"``, ``sparsity_structure:
"2:4"``, ``targets``: the module names). Quantized weights are not stored sparse.
compressed-tensors 0.15 dropped this compressor (0.14 is its last release to decompress it).

Float8 weights (``type: "float"``, 8 bits, symmetric) are written ``float-quantized``
beside int grids in the same folder; the config's ``format`` is then ``mixed-precision``
and each config group names its own. ``model.safetensors`` is written and read by
:mod:`jcompress.formats.folder` itself (the numpy API of ``safetensors`` has no float8).

``quantization_config``: ``quant_method: "compressed-tensors"``, the ``format``,
``quantization_status: "compressed"``, one ``config_groups`` entry per distinct weight
scheme (``num_bits``, ``type: "int"``, ``symmetric``, ``strategy`` ``tensor`` /
``channel`` / ``group``, ``group_size``, ``actorder``) whose ``targets`` are the exact
module names, and ``ignore``: the Linear modules left in float (informational).

Example:
  >>> params, aux = jc.oneshot.gptq(stats, bits=4, group_size=128)(params)
  >>> write('llama-w4', params, aux, names=to_hf, base_folder='llama')   # then: vllm serve llama-w4
  >>> params2, grids = read('llama-w4', names=from_hf)                  # grids[leaf] == aux.grids[leaf]
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np

from jcompress.core import base, grid
from jcompress.formats import folder as fs
from jcompress.formats.folder import FolderError

__all__ = ["FORMATS", "READ_FORMATS", "SPARSITY_FORMATS", "Float8Grid", "FolderError", "float8_grid", "read", "write"]

FORMATS = ("pack-quantized", "naive-quantized")
# int-quantized is naive-quantized under the name llm-compressor gives W8A8 checkpoints.
READ_FORMATS = ("pack-quantized", "naive-quantized", "int-quantized", "float-quantized")
SPARSITY_FORMATS = ("sparse-24-bitmask",)
_STRATEGIES = ("tensor", "channel", "group")
_ACTORDERS = (None, False, "weight", "static", "group", "dynamic", True)
_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


FLOAT8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448


@dataclasses.dataclass(frozen=True)
class Float8Grid:
    """Float8 (e4m3) weights with float32 scales: ``weight = values.astype(float32) * scale``.

    Attributes:
      values: ``ml_dtypes.float8_e4m3fn`` ``(in, out)``.
      scale: float32 ``(1, out)`` (one per output channel) or ``()`` (one for the tensor).
    """

    values: np.ndarray
    scale: np.ndarray

    @property
    def axis(self) -> int | None:
        return None if np.ndim(self.scale) == 0 else 1

    def dequantize(self) -> np.ndarray:
        return np.asarray(self.values).astype(np.float32) * np.asarray(self.scale, np.float32)


def float8_grid(w, *, axis: int | None = -1) -> Float8Grid:
    """Cast a Dense kernel ``(in, out)`` to float8 e4m3 with the min-max scale ``max|w| / 448``.

    Args:
      w: float array ``(in, out)``.
      axis: ``-1`` for one scale per output channel, ``None`` for one per tensor.

    Returns:
      :class:`Float8Grid`; an all-zero channel gets scale 1 (its values are 0).

    Example:
      >>> write('out', params, {'layers/0/mlp/up_proj/kernel': float8_grid(kernel)}, format='float-quantized')
    """
    w = np.asarray(w, np.float32)
    if w.ndim != 2 or axis not in (-1, 1, None):
        raise ValueError(f"float8_grid takes a Dense kernel (in, out) and axis=-1 or None, got {w.shape}, axis={axis}")
    amax = np.abs(w).max() if axis is None else np.abs(w).max(axis=0, keepdims=True)
    scale = np.where(amax > 0, amax / np.float32(FLOAT8_MAX), np.float32(1)).astype(np.float32)
    return Float8Grid((w / scale).astype(ml_dtypes.float8_e4m3fn), scale)


def collect_grids(aux) -> dict[str, grid.QuantParams | Float8Grid]:
    """``{leaf: QuantParams or Float8Grid}`` from a ``GridAux``, a ``ChainAux`` holding some, or such a dict."""
    if isinstance(aux, dict):
        grids = dict(aux)
    else:
        grids = {}
        for a in base.all_auxes(aux):
            if isinstance(a, base.GridAux):
                grids.update(a.grids)
    for leaf, qp in grids.items():
        if not isinstance(qp, (grid.QuantParams, Float8Grid)):
            raise TypeError(f"the grid of {leaf!r} is a {type(qp).__name__}; a QuantParams or Float8Grid is needed")
    return grids


def weight_args(leaf: str, w_shape: tuple, qp: grid.QuantParams | Float8Grid) -> dict:
    """The layout's weight scheme of one jcompress grid; ValueError naming ``leaf`` if it has none."""
    shape = tuple(np.shape(qp.values if isinstance(qp, Float8Grid) else qp.codes))
    if shape != tuple(w_shape):
        raise ValueError(f"{leaf}: the grid's codes have shape {shape}, the leaf {tuple(w_shape)}")
    if isinstance(qp, Float8Grid):
        strategy = "tensor" if qp.axis is None else "channel"
        return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "group_size": None,
                "dynamic": False}  # fmt: skip
    if qp.bits > 8:
        raise ValueError(f"{leaf}: bits={qp.bits}; the serving layouts store at most 8-bit integer codes")
    if qp.axis is None:
        strategy = "tensor"
    elif qp.axis == 1:
        strategy = "group" if qp.group_size is not None else "channel"
    else:
        raise ValueError(
            f"{leaf}: the grid has one scale per index of axis {qp.axis}; the layout needs one per output "
            "channel (axis=-1) or one for the tensor (axis=None)"
        )
    if qp.g_idx is not None:
        if strategy != "group":
            raise ValueError(f"{leaf}: the grid has a g_idx but no groups (group_size=None); drop the g_idx")
        grid.check_g_idx(qp.g_idx, int(w_shape[0]), int(qp.group_size), where=f" of {leaf}")
    return {
        "num_bits": int(qp.bits),
        "type": "int",
        "symmetric": bool(qp.symmetric),
        "strategy": strategy,
        "group_size": int(qp.group_size) if strategy == "group" else None,
        "dynamic": False,
    }


def _encode(module: str, qp: grid.QuantParams | Float8Grid, args: dict, fmt: str) -> dict[str, np.ndarray]:
    if isinstance(qp, Float8Grid):
        scale = np.asarray(qp.scale, np.float32)
        scale = scale.reshape(1) if qp.axis is None else scale.T
        return {
            f"{module}.weight": np.ascontiguousarray(qp.values.T),
            f"{module}.weight_scale": np.ascontiguousarray(scale),
        }
    bits, offset = qp.bits, 2 ** (qp.bits - 1)
    codes = np.asarray(qp.codes, np.int32).T  # (out, in)
    signed = codes if qp.symmetric else codes - offset
    scale = np.asarray(qp.scale, np.float32)
    scale = scale.reshape(1) if args["strategy"] == "tensor" else scale.T
    out = {f"{module}.weight_scale": np.ascontiguousarray(scale)}
    if fmt == "pack-quantized":
        out[f"{module}.weight_packed"] = fs.pack_int32(signed + offset, bits=bits)
        out[f"{module}.weight_shape"] = np.asarray(codes.shape, np.int64)
    else:
        out[f"{module}.weight"] = signed.astype(np.int8)
    if qp.g_idx is not None:
        out[f"{module}.weight_g_idx"] = np.asarray(qp.g_idx, np.int32)
    if not qp.symmetric:
        zp = np.asarray(qp.zero_point, np.int32)
        if args["strategy"] == "tensor":
            out[f"{module}.weight_zero_point"] = (zp.reshape(1) - offset).astype(np.int8)
        elif fmt == "pack-quantized":
            out[f"{module}.weight_zero_point"] = fs.pack_int32(zp.T, bits=bits, axis=0)
        else:
            out[f"{module}.weight_zero_point"] = (zp.T - offset).astype(np.int8)
    return out


def write(
    folder: str | Path,
    params,
    aux,
    *,
    names: dict | Callable | None = None,
    base_folder: str | Path | None = None,
    format: str = "pack-quantized",
    actorder: str | None = None,
    sparsity: str | None = None,
) -> dict:
    """Write ``params`` with the quantized leaves of ``aux`` as a compressed-tensors folder.

    Args:
      folder: output folder (created; its ``model.safetensors`` and ``config.json`` replaced).
      params: nested dict (or NNX State) of arrays; quantized leaves are Dense kernels
        ``(in, out)``, written as ``(out, in)``; the other leaves are written unchanged
        (2-D ``.../kernel`` leaves transposed).
      aux: the ``GridAux`` of ``jc.quant.quantize`` / ``jc.oneshot.gptq`` (or a ``ChainAux``
        holding one, or a dict ``{leaf: QuantParams}``): which leaves are quantized and how.
        Grids: bits <= 8, per output channel (``axis=-1``, optionally grouped) or per tensor.
      names: jcompress leaf name -> tensor name (dict or callable, None leaves a leaf
        out); default: slashes to dots, final ``kernel`` -> ``weight``. A quantized leaf's
        tensor name must end in ``.weight``.
      base_folder: the Hugging Face folder the model came from: its ``config.json`` is copied
        with the ``quantization_config`` added, and its tokenizer and generation files are
        copied. Without it, ``config.json`` holds the ``quantization_config`` alone.
      format: ``'pack-quantized'`` (int32 words, what vLLM serves for 4 and 8 bits) or
        ``'naive-quantized'`` (one int8 per code).
      actorder: ``None`` or ``'weight'`` (the grids came from GPTQ with ``act_order=True``),
        recorded in every scheme of contiguous groups. A grid with a ``g_idx`` (GPTQ with
        ``act_order=True, static_groups=False``) is always written with ``actorder:
        "group"`` and its ``weight_g_idx``.
      sparsity: ``None`` or ``'sparse-24-bitmask'``: the float (not quantized) Linear
        weights that are 2:4 sparse along their inputs are stored in the bitmask layout
        (see the module docstring); at least one must be.

    Returns:
      The ``quantization_config`` written.

    Raises:
      ValueError: a grid the layout cannot hold, names that clash, a quantized name not
        ending in ``.weight``, a grid for a leaf not in ``params``, a bad ``format``.

    Example:
      >>> write('out', params, aux, base_folder='tinyllama')
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r} must be one of {FORMATS}")
    if actorder not in (None, "weight"):
        raise ValueError(f"actorder={actorder!r} must be None or 'weight' (contiguous groups, jcompress's GPTQ)")
    if sparsity not in (None, *SPARSITY_FORMATS):
        raise ValueError(f"sparsity={sparsity!r} must be None or one of {SPARSITY_FORMATS}")
    schemes: dict[tuple, list[str]] = {}

    def encode(leaf, module, w, qp):
        args = weight_args(leaf, w.shape, qp)
        if getattr(qp, "g_idx", None) is not None:
            args["actorder"] = "group"
        elif actorder is not None and args["type"] == "int":
            args["actorder"] = actorder
        fmt = "float-quantized" if args["type"] == "float" else format
        schemes.setdefault((fmt, tuple(sorted(args.items(), key=str))), []).append(module)
        return _encode(module, qp, args, fmt)

    tensors, ignore = fs.leaf_tensors(params, collect_grids(aux), names, encode)
    sparse_modules = []
    if sparsity is not None:
        for module in ignore:
            new = _sparse24_tensors(module, tensors[f"{module}.weight"])
            if new is not None:
                del tensors[f"{module}.weight"]
                tensors.update(new)
                sparse_modules.append(module)
        if not sparse_modules:
            raise ValueError(
                f"sparsity={sparsity!r}, but no float Linear weight is 2:4 sparse along its inputs (at most 2 "
                "non-zeros in every 4 consecutive inputs); prune with n_m=(2, 4) first"
            )
    elif not schemes:
        raise ValueError("no leaf with a grid is written: aux holds no grids, or names= maps them all to None")
    formats = sorted({fmt for fmt, _ in schemes}) or ["dense"]
    qconfig = {
        "quant_method": "compressed-tensors",
        "format": formats[0] if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {
            f"group_{i}": {
                "targets": sorted(modules),
                "weights": dict(key),
                "input_activations": None,
                "output_activations": None,
                "format": fmt,
            }
            for i, ((fmt, key), modules) in enumerate(schemes.items())
        },
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
    }
    if sparse_modules:
        kept = [tensors[f"{m}.compressed"] for m in sparse_modules]
        zeros = sum(int(np.sum(v == 0)) + v.size for v in kept)  # the dropped half of each plus kept zeros
        qconfig["sparsity_config"] = {
            "format": sparsity,
            "sparsity_structure": "2:4",
            "targets": sorted(sparse_modules),
            "ignore": [],
            "global_sparsity": zeros / sum(2 * v.size for v in kept),
        }
    fs.save_folder(folder, tensors, qconfig, base_folder)
    return qconfig


def _sparse24_tensors(module: str, w_t: np.ndarray) -> dict[str, np.ndarray] | None:
    """The bitmask tensors of a float weight ``(out, in)`` that is 2:4 sparse along its inputs, else None."""
    out, n_in = w_t.shape
    if n_in % 4 or not np.issubdtype(w_t.dtype, np.floating):
        return None
    nonzero = w_t.reshape(out, n_in // 4, 4) != 0
    count = nonzero.sum(-1, keepdims=True)
    if np.any(count > 2):
        return None
    # every group keeps exactly 2 positions: its non-zeros, then its first zeros
    keep = (nonzero | (np.cumsum(~nonzero, axis=-1) <= 2 - count)).reshape(out, n_in)
    return {
        f"{module}.shape": np.array([[out], [n_in]], np.int64),
        f"{module}.compressed": np.ascontiguousarray(w_t[keep].reshape(out, n_in // 2)),
        f"{module}.bitmask": np.packbits(keep, axis=-1, bitorder="little"),
    }


def _read_sparse24(tensors: dict, sparsity: dict, where: str) -> None:
    """Replace each module's ``shape`` / ``compressed`` / ``bitmask`` tensors in ``tensors`` by its
    dense ``weight`` ``(out, in)``; FolderError naming the tensor or setting that is wrong."""
    fmt, structure = sparsity.get("format"), sparsity.get("sparsity_structure", "2:4")
    if fmt not in SPARSITY_FORMATS or structure != "2:4":
        raise FolderError(
            f"{where}: sparsity_config has format {fmt!r} with structure {structure!r}; jcompress reads "
            f"{SPARSITY_FORMATS} with 2:4"
        )
    targets = sparsity.get("targets") or []
    for name in sorted(n for n in tensors if n.endswith(".bitmask")):
        module = name[: -len(".bitmask")]
        if not any(_matches(module, t) for t in targets):
            raise FolderError(f"the tensor {name} belongs to a module the sparsity_config does not target")
        if f"{module}.weight_scale" in tensors:
            raise FolderError(f"{module} is both 2:4 compressed and quantized; jcompress reads sparse float weights")
        shape = fs.take(tensors, f"{module}.shape").reshape(-1)
        if shape.shape != (2,) or shape.dtype.kind not in "iu" or shape.min() < 0:
            raise FolderError(f"the tensor {module}.shape must hold (out, in) as 2 integers, got {shape!r}")
        out, n_in = (int(v) for v in shape)
        compressed, bitmask = fs.take(tensors, f"{module}.compressed"), fs.take(tensors, name)
        fs.expect(compressed, f"{module}.compressed", (out, n_in // 2), _SCALE_DTYPES)
        fs.expect(bitmask, name, (out, -(-n_in // 8)), ("uint8",))
        keep = np.unpackbits(bitmask, axis=-1, count=n_in, bitorder="little").astype(bool)
        if n_in % 4 or np.any(keep.reshape(out, -1, 4).sum(-1) != 2):
            raise FolderError(f"the tensor {name} does not mark exactly 2 of every 4 consecutive inputs")
        weight = np.zeros((out, n_in), compressed.dtype)
        weight[keep] = compressed.reshape(-1)
        tensors[f"{module}.weight"] = weight


def _matches(module: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    # A class name (``Linear``) matches every module that holds quantized tensors.
    return module == target or ("." not in target and target[:1].isupper())


def _check_args(group: str, scheme: dict, where: str) -> dict:
    """The weight args of one config group, validated; FolderError naming the group otherwise."""
    for key in ("input_activations", "output_activations"):
        if scheme.get(key):
            raise FolderError(f"{where}: config group {group!r} quantizes {key}; jcompress reads weight-only schemes")
    w = scheme.get("weights")
    if not isinstance(w, dict):
        raise FolderError(f"{where}: config group {group!r} has no weights scheme")
    bits, typ = w.get("num_bits", 8), w.get("type", "int")
    if not (typ == "int" and isinstance(bits, int) and 1 <= bits <= 8) and not (typ == "float" and bits == 8):
        raise FolderError(
            f"{where}: config group {group!r} stores type={typ!r} num_bits={bits!r}; jcompress reads int 1..8 bits "
            "and float 8 bits (e4m3)"
        )
    g = w.get("group_size")
    strategy = w.get("strategy") or ("tensor" if g is None else "channel" if g == -1 else "group")
    strategies = _STRATEGIES if typ == "int" else ("tensor", "channel")
    if strategy not in strategies or w.get("block_structure") is not None:
        raise FolderError(f"{where}: config group {group!r} has strategy {strategy!r}; jcompress reads {strategies}")
    if strategy == "group" and (not isinstance(g, int) or g < 1):
        raise FolderError(f"{where}: config group {group!r} has strategy 'group' with group_size={g!r}")
    if w.get("dynamic"):
        raise FolderError(f"{where}: config group {group!r} has dynamic weight scales; jcompress reads static ones")
    if w.get("actorder") not in _ACTORDERS:
        raise FolderError(f"{where}: config group {group!r} has actorder={w.get('actorder')!r}")
    if typ == "float" and not w.get("symmetric", True):
        raise FolderError(f"{where}: config group {group!r} has float weights with a zero point")
    return {
        "type": typ,
        "bits": bits,
        "symmetric": bool(w.get("symmetric", True)),
        "strategy": strategy,
        "group_size": g,
    }


_SCALE_DTYPES = ("float32", "float16", "float64", "bfloat16")


def to_grid(
    signed: np.ndarray,
    zero: np.ndarray | None,
    scale: np.ndarray,
    *,
    bits: int,
    strategy: str,
    group_size: int | None,
    g_idx: np.ndarray | None = None,
) -> grid.QuantParams:
    """A jcompress grid from the layout's signed codes ``(out, in)``, signed zero point and scale.

    Signed codes within jcompress's symmetric range and no zero point give a symmetric
    grid; otherwise the codes and zero point are shifted by ``2**(bits-1)`` to jcompress's
    unsigned asymmetric grid. Either way the dequantized weights are unchanged. ``g_idx``
    (int32 ``(in,)``, group strategy) is the group of each input, None for contiguous groups.
    """
    offset = 2 ** (bits - 1)
    codes = signed.astype(np.int32).T  # (in, out)
    axis = None if strategy == "tensor" else 1
    gs = group_size if strategy == "group" else None
    scale = scale.astype(np.float32)
    scale = scale.reshape(()) if axis is None else scale.T
    if zero is None and bits >= 2 and (codes.size == 0 or codes.min() >= -(offset - 1)):
        return grid.QuantParams(codes, scale, np.zeros(scale.shape, np.int32), bits, True, axis, gs, g_idx)
    zp = np.zeros(scale.shape, np.int32) if zero is None else zero.astype(np.int32).reshape(scale.T.shape).T
    return grid.QuantParams(codes + offset, scale, zp + offset, bits, False, axis, gs, g_idx)


def _decode_float8(tensors: dict, module: str, strategy: str) -> Float8Grid:
    weight_name, scale_name = f"{module}.weight", f"{module}.weight_scale"
    weight, scale = fs.take(tensors, weight_name), fs.take(tensors, scale_name)
    if weight.ndim != 2:
        raise FolderError(f"the tensor {weight_name} has shape {weight.shape}; a Linear weight (out, in) is needed")
    fs.expect(weight, weight_name, weight.shape, ("float8_e4m3fn",))
    fs.expect(scale, scale_name, (1,) if strategy == "tensor" else (weight.shape[0], 1), _SCALE_DTYPES)
    scale = scale.astype(np.float32)
    return Float8Grid(np.ascontiguousarray(weight.T), scale.reshape(()) if strategy == "tensor" else scale.T)


def _decode(tensors: dict, module: str, args: dict, fmt: str) -> grid.QuantParams | Float8Grid:
    if args["type"] == "float":
        return _decode_float8(tensors, module, args["strategy"])
    bits, strategy, offset = args["bits"], args["strategy"], 2 ** (args["bits"] - 1)
    scale_name = f"{module}.weight_scale"
    scale = fs.take(tensors, scale_name)
    if fmt == "pack-quantized":
        shape_name = f"{module}.weight_shape"
        shape = fs.take(tensors, shape_name)
        if shape.shape != (2,) or shape.dtype.kind not in "iu" or shape.min() < 0:
            raise FolderError(f"the tensor {shape_name} must hold (out, in) as 2 integers, got {shape!r}")
        out, n_in = (int(v) for v in shape)
        packed_name = f"{module}.weight_packed"
        packed = fs.take(tensors, packed_name)
        fs.expect(packed, packed_name, (out, -(-n_in * bits // 32)), ("int32",))
        signed = fs.unpack_int32(packed, bits=bits, count=n_in) - offset
    else:
        weight_name = f"{module}.weight"
        weight = fs.take(tensors, weight_name)
        if weight.ndim != 2:
            raise FolderError(f"the tensor {weight_name} has shape {weight.shape}; a Linear weight (out, in) is needed")
        out, n_in = weight.shape
        fs.expect(weight, weight_name, (out, n_in), ("int8",))
        signed = weight.astype(np.int32)
        if signed.size and (signed.min() < -offset or signed.max() >= offset):
            raise FolderError(f"the tensor {weight_name} holds codes outside the {bits}-bit range")
    g = args["group_size"]
    if strategy == "group" and n_in % g:
        raise FolderError(f"{module}: group_size={g} does not divide the {n_in} inputs of {module}.weight")
    scale_shape = {"tensor": (1,), "channel": (out, 1), "group": (out, n_in // g if g else 0)}[strategy]
    fs.expect(scale, scale_name, scale_shape, _SCALE_DTYPES)
    zero = None
    zp_name = f"{module}.weight_zero_point"
    if not args["symmetric"]:
        zp = fs.take(tensors, zp_name)
        if fmt == "pack-quantized" and strategy != "tensor":
            fs.expect(zp, zp_name, (-(-out * bits // 32), scale_shape[1]), ("int32",))
            zero = fs.unpack_int32(zp, bits=bits, count=out, axis=0) - offset
        else:
            fs.expect(zp, zp_name, scale_shape, ("int8", "int32"))
            zero = zp.astype(np.int32)
            if zero.min() < -offset or zero.max() >= offset:
                raise FolderError(f"the tensor {zp_name} holds zero points outside the {bits}-bit range")
    elif zp_name in tensors and np.any(tensors.pop(zp_name)):
        raise FolderError(f"the tensor {zp_name} is non-zero but the scheme of {module} is symmetric")
    g_idx = _read_g_idx(tensors, f"{module}.weight_g_idx", n_in, g if strategy == "group" else None)
    return to_grid(signed, zero, scale, bits=bits, strategy=strategy, group_size=g, g_idx=g_idx)


def _read_g_idx(tensors: dict, name: str, n_in: int, group_size: int | None) -> np.ndarray | None:
    """The per-input group index of tensor ``name`` (removed from ``tensors``), or None when it is
    absent, contiguous (``i // group_size``) or holds the library's ``-1`` placeholder."""
    if name not in tensors:
        return None
    g_idx = tensors.pop(name)
    if g_idx.shape == (n_in,) and g_idx.dtype.kind in "iu" and np.any(g_idx == -1):
        return None  # the library's "not set": columns in their own order
    contiguous = np.arange(n_in) // (group_size or max(n_in, 1))
    if g_idx.shape == (n_in,) and np.array_equal(g_idx, contiguous):
        return None
    if group_size is None:
        raise FolderError(f"the tensor {name} assigns inputs to groups, but its scheme has one scale per channel")
    try:
        return grid.check_g_idx(g_idx, n_in, group_size, where=f" (tensor {name})")
    except ValueError as e:
        raise FolderError(str(e)) from None


def read(
    folder: str | Path, *, names: dict | Callable | None = None
) -> tuple[dict, dict[str, grid.QuantParams | Float8Grid]]:
    """Read a compressed-tensors folder into ``(params, grids)``.

    Args:
      folder: a folder with ``config.json`` (holding ``quantization_config``) and
        ``model.safetensors`` (or shards with an index).
      names: tensor name -> jcompress leaf name (dict or callable; None skips a tensor);
        default: dots to slashes, a 2-D ``.weight`` -> ``kernel``. A quantized module's
        weight must map to a leaf ending in ``kernel``.

    Returns:
      ``(params, grids)``: ``params`` a nested dict of numpy arrays (quantized kernels
      dequantized to float32 ``(in, out)``, other tensors as stored, 2-D kernels
      transposed; all-digit keys as ints); ``grids`` ``{leaf: QuantParams}`` with
      ``axis=1`` (or None for the tensor strategy), a :class:`Float8Grid` for float8
      weights, each dequantizing to its kernel exactly. 2:4 bitmask-compressed weights
      (``sparsity_config`` ``sparse-24-bitmask``) come back as dense float kernels.

    Raises:
      FolderError: a missing or foreign ``quantization_config`` (another quant_method, a
        format or scheme jcompress does not read, activation quantization), a missing
        scale / shape / zero-point tensor, a tensor whose shape disagrees with the config,
        a quantized module no config group targets, a bitmask that does not mark 2 of
        every 4 inputs. The message names the tensor or group.
    """
    folder = Path(folder)
    config = fs.read_config(folder)
    qc = config.get("quantization_config")
    where = str(folder / "config.json")
    if not isinstance(qc, dict):
        raise FolderError(f"{where} has no quantization_config; this is not a compressed checkpoint")
    if qc.get("quant_method") != "compressed-tensors":
        raise FolderError(f"{where}: quant_method is {qc.get('quant_method')!r}, not 'compressed-tensors'")
    if qc.get("transform_config") or qc.get("kv_cache_scheme"):
        raise FolderError(f"{where}: transform and kv-cache configs are not read by jcompress")
    sparsity = qc.get("sparsity_config")
    if sparsity is not None and not isinstance(sparsity, dict):
        raise FolderError(f"{where}: sparsity_config must be an object")
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict):
        raise FolderError(f"{where}: config_groups must be an object")
    checked = []
    for name, scheme in groups.items():
        fmt = scheme.get("format") or qc.get("format")
        if fmt not in READ_FORMATS:
            raise FolderError(f"{where}: config group {name!r} has format {fmt!r}; jcompress reads {READ_FORMATS}")
        checked.append((name, scheme.get("targets") or [], _check_args(name, scheme, where), fmt))
    ignore = qc.get("ignore") or []
    tensors = fs.read_tensors(folder)
    if sparsity:
        _read_sparse24(tensors, sparsity, where)
    modules = sorted(
        {n.rsplit(".", 1)[0] for n in tensors if n.rsplit(".", 1)[-1] in ("weight_scale", "weight_packed")}
    )
    params, grids = {}, {}
    for module in modules:
        hit = next(((n, a, f) for n, targets, a, f in checked if any(_matches(module, t) for t in targets)), None)
        ignored = any(t == module or (t.startswith("re:") and _matches(module, t)) for t in ignore)
        if hit is None or ignored:
            raise FolderError(f"the tensor {module}.weight_scale belongs to a module no config group quantizes")
        _, args, fmt = hit
        leaf = fs.leaf_name(f"{module}.weight", 2, names)
        if leaf is None:
            continue
        if not fs.transposed(leaf, 2):
            raise FolderError(
                f"{module}.weight maps to the leaf {leaf!r}; a quantized weight needs a '.../kernel' leaf"
            )
        qp = _decode(tensors, module, args, fmt)
        grids[leaf] = qp
        params[leaf] = np.asarray(qp.dequantize())
    params.update(fs.plain_params(tensors, names, _SUFFIXES))
    return fs.nest(params), grids
