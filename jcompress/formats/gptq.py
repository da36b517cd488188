"""The GPTQ checkpoint layout (AutoGPTQ; read by transformers' GPTQ loader, GPTQModel, vLLM).

For each quantized Linear module ``m`` (a jcompress Dense kernel ``(in, out)``), with
``G`` groups of ``group_size`` consecutive inputs (``G = 1`` for ``group_size = -1``,
one scale per output channel):

=================  ===============================  ===============================================
tensor             dtype, shape                     content
=================  ===============================  ===============================================
``m.qweight``      int32 ``(in * bits / 32, out)``  unsigned codes ``u`` in ``[0, 2**bits)``,
                                                    ``32 / bits`` consecutive inputs per word,
                                                    input ``8 r + j`` (4 bits) in bits ``4j..4j+3``
                                                    of row ``r``
``m.qzeros``       int32 ``(G, out * bits / 32)``   zero points, packed the same way along the
                                                    output dim; format ``gptq`` (v1) stores
                                                    ``zero - 1``, ``gptq_v2`` the zero itself
``m.scales``       float16 ``(G, out)``             a weight is ``(u - zero) * scale``
``m.g_idx``        int32 ``(in,)``                  group of each input: ``i // group_size``, or
                                                    the activation-order groups (``desc_act``)
=================  ===============================  ===============================================

plus ``quantize_config.json`` and ``config.json``'s ``quantization_config``
(``quant_method: "gptq"``, ``bits``, ``group_size``, ``sym``, ``desc_act``,
``static_groups``, ``checkpoint_format``). Bits are 2, 4 or 8 (whole codes per word;
3-bit packing across words is not written), and ``in * bits`` and ``out * bits`` must be
multiples of 32.

Which zero-point convention: the original AutoGPTQ format (``checkpoint_format:
"gptq"``, the default here, what transformers and vLLM expect) stores ``zero - 1``, a
historical off-by-one its loaders undo by adding 1. It cannot store a zero point of 0
(it would wrap to ``2**bits - 1`` and be read back as ``2**bits``), so an asymmetric grid
with a zero point of 0 is refused for that format; ``checkpoint_format='gptq_v2'``
(GPTQModel's) stores the zero point as it is.

jcompress grids map onto the layout exactly: a symmetric grid's signed codes ``c`` are
stored as ``u = c + 2**(bits-1)`` with every zero point ``2**(bits-1)`` (the layout's
``sym: true``); an asymmetric grid's unsigned codes and zero points are stored as they
are. Scales are float16 as the layout has them (exact when the grid's scales are float16
values, e.g. after :func:`fp16_scales`); ``scale_dtype='float32'`` keeps them exactly.
jcompress's GPTQ with ``act_order=True`` and static groups (its default) has contiguous
groups: ``desc_act: true`` with ``static_groups: true`` and the contiguous ``g_idx``. With
``static_groups=False`` (the reference's ``desc_act`` default) the grid's per-input group
index (``QuantParams.g_idx``) is written as ``g_idx`` with ``desc_act: true`` and
``static_groups: false``; a folder with such a ``g_idx`` reads back to the same grid.

Example:
  >>> params, aux = jc.oneshot.gptq(stats, bits=4, group_size=128)(params)
  >>> write('llama-gptq', params, aux, names=to_hf, base_folder='llama')
  >>> params2, grids = read('llama-gptq', names=from_hf)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jcompress.core import grid
from jcompress.formats import folder as fs
from jcompress.formats.compressed_tensors import collect_grids, weight_args
from jcompress.formats.folder import FolderError

__all__ = ["CHECKPOINT_FORMATS", "FolderError", "fp16_scales", "read", "write"]

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
_BITS = (2, 4, 8)
_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def fp16_scales(qp: grid.QuantParams, w) -> grid.QuantParams:
    """``qp`` with its scales rounded to float16 and the codes of ``w`` rounded to nearest on that grid.

    The GPTQ layout stores float16 scales; a grid whose scales are float16 values is
    stored and read back exactly.

    Args:
      qp: the grid of a Dense kernel ``(in, out)``, one scale per output channel
        (``axis=-1``), grouped or not (contiguous groups or a ``g_idx``).
      w: the kernel ``(in, out)`` the codes are recomputed from (e.g. the quantized kernel).

    Returns:
      A ``QuantParams`` like ``qp`` with float16-valued scales (float32 dtype) and new codes.
    """
    if qp.axis != 1 or np.ndim(qp.codes) != 2:
        raise ValueError(f"fp16_scales takes the grid of a Dense kernel with axis=-1, got axis={qp.axis}")
    scale = np.asarray(qp.scale, np.float16).astype(np.float32)  # (groups, out)
    gi = grid.group_index(np.shape(qp.codes)[0], qp.group_size, None if qp.g_idx is None else np.asarray(qp.g_idx))
    codes = grid.round_codes(
        np.asarray(w, np.float32), scale[gi], np.asarray(qp.zero_point)[gi], bits=qp.bits, symmetric=qp.symmetric
    )
    return dataclasses.replace(qp, codes=codes, scale=scale)


def _layout(leaf: str, w_shape: tuple, qp: grid.QuantParams) -> dict:
    args = weight_args(leaf, w_shape, qp)
    if args["strategy"] == "tensor":
        raise ValueError(f"{leaf}: the GPTQ layout has no per-tensor scale; quantize with axis=-1")
    if qp.bits not in _BITS:
        raise ValueError(f"{leaf}: bits={qp.bits}; the GPTQ layout is written for bits in {_BITS}")
    n_in, out = w_shape
    if (n_in * qp.bits) % 32 or (out * qp.bits) % 32:
        raise ValueError(f"{leaf}: in={n_in} and out={out} times bits={qp.bits} must be multiples of 32")
    return {"bits": qp.bits, "group_size": qp.group_size or -1, "sym": bool(qp.symmetric)}


def _encode(module: str, qp: grid.QuantParams, fmt: str, scale_dtype: str, leaf: str) -> dict[str, np.ndarray]:
    bits, offset = qp.bits, 2 ** (qp.bits - 1)
    codes = np.asarray(qp.codes, np.int32)  # (in, out)
    zero = np.asarray(qp.zero_point, np.int32).reshape(-1, codes.shape[1])  # (G, out)
    if qp.symmetric:
        codes, zero = codes + offset, zero + offset
    if fmt == "gptq":
        if np.any(zero == 0):
            raise ValueError(
                f"{leaf}: a zero point of 0 cannot be stored in checkpoint_format 'gptq' (it stores zero - 1); "
                "use checkpoint_format='gptq_v2' or a symmetric grid"
            )
        zero = zero - 1
    n_in = codes.shape[0]
    g = qp.group_size or n_in
    return {
        f"{module}.qweight": fs.pack_int32(codes, bits=bits, axis=0),
        f"{module}.qzeros": fs.pack_int32(zero, bits=bits, axis=1),
        f"{module}.scales": np.asarray(qp.scale, np.float32).reshape(-1, codes.shape[1]).astype(scale_dtype),
        f"{module}.g_idx": (np.arange(n_in) // g if qp.g_idx is None else np.asarray(qp.g_idx)).astype(np.int32),
    }


def write(
    folder: str | Path,
    params,
    aux,
    *,
    names: dict | Callable | None = None,
    base_folder: str | Path | None = None,
    checkpoint_format: str = "gptq",
    desc_act: bool | None = None,
    scale_dtype: str = "float16",
) -> dict:
    """Write ``params`` with the quantized leaves of ``aux`` as a GPTQ folder.

    Args:
      folder: output folder (created).
      params: nested dict (or NNX State) of arrays; quantized leaves are Dense kernels
        ``(in, out)``; other leaves are written unchanged (2-D ``.../kernel`` leaves as
        ``(out, in)``).
      aux: ``GridAux`` / ``ChainAux`` / ``{leaf: QuantParams}``: every grid with the same
        bits (2, 4, 8), ``group_size`` and symmetry, one scale per output channel
        (``axis=-1``, optionally grouped).
      names: leaf name -> tensor name, as in :mod:`jcompress.formats.folder`; a quantized
        leaf's name must end in ``.weight`` (the module is the name without it).
      base_folder: the Hugging Face folder the model came from (config and tokenizer copied).
      checkpoint_format: ``'gptq'`` (zero points minus one, the common layout) or ``'gptq_v2'``.
      desc_act: record that the grids came from GPTQ with ``act_order=True``. ``None``
        (default): True exactly when a grid has a ``g_idx`` (activation-order groups,
        written with ``static_groups: false``); ``True`` for contiguous groups from
        act-order GPTQ (``static_groups: true``); ``False`` refuses grids with a ``g_idx``.
      scale_dtype: ``'float16'`` (the layout) or ``'float32'`` (exact scales).

    Returns:
      The ``quantization_config`` written (also in ``quantize_config.json``).

    Raises:
      ValueError: grids that differ in bits / group size / symmetry, a grid the layout
        cannot hold, a zero point of 0 in format ``'gptq'``, clashing names, ``desc_act=False``
        with a grid that has a ``g_idx``.
    """
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format={checkpoint_format!r} must be one of {CHECKPOINT_FORMATS}")
    if scale_dtype not in ("float16", "float32"):
        raise ValueError(f"scale_dtype={scale_dtype!r} must be 'float16' or 'float32'")
    grids = collect_grids(aux)
    layouts: dict[str, dict] = {}

    def encode(leaf, module, w, qp):
        layouts[leaf] = _layout(leaf, w.shape, qp)
        first = next(iter(layouts))
        if layouts[leaf] != layouts[first]:
            raise ValueError(
                f"{leaf}: grid {layouts[leaf]} differs from {first}'s {layouts[first]}; GPTQ has one scheme"
            )
        return _encode(module, qp, checkpoint_format, scale_dtype, leaf)

    tensors, _ = fs.leaf_tensors(params, grids, names, encode)
    if not layouts:
        raise ValueError("no leaf with a grid is written: aux holds no grids, or names= maps them all to None")
    layout = next(iter(layouts.values()))
    dynamic = any(getattr(grids[leaf], "g_idx", None) is not None for leaf in layouts)
    if desc_act is False and dynamic:
        raise ValueError(
            "desc_act=False, but a grid has a g_idx (GPTQ with act_order=True, static_groups=False); loaders "
            "use g_idx only with desc_act: pass desc_act=None or True"
        )
    desc_act = dynamic if desc_act is None else bool(desc_act)
    qconfig = {
        "quant_method": "gptq",
        **layout,
        "desc_act": desc_act,
        "static_groups": desc_act and not dynamic,
        "true_sequential": True,
        "damp_percent": 0.01,
        "checkpoint_format": checkpoint_format,
        "model_file_base_name": "model",
    }
    fs.save_folder(folder, tensors, qconfig, base_folder, extra_configs=("quantize_config.json",))
    return qconfig


def _config(folder: Path) -> dict:
    """The GPTQ settings: ``config.json``'s ``quantization_config``, else ``quantize_config.json``."""
    qc = None
    if (folder / "config.json").exists():
        qc = fs.read_config(folder).get("quantization_config")
    if qc is None and (folder / "quantize_config.json").exists():
        qc = fs.read_config(folder, "quantize_config.json")
    where = str(folder / "config.json")
    if not isinstance(qc, dict):
        raise FolderError(f"{where} has no quantization_config and there is no quantize_config.json")
    if qc.get("quant_method", "gptq") != "gptq":
        raise FolderError(f"{where}: quant_method is {qc.get('quant_method')!r}, not 'gptq'")
    bits, g = qc.get("bits"), qc.get("group_size", -1)
    if bits not in _BITS:
        raise FolderError(f"{where}: bits={bits!r}; jcompress reads GPTQ folders of {_BITS} bits")
    if not isinstance(g, int) or not (g == -1 or g > 0):
        raise FolderError(f"{where}: group_size={g!r} must be -1 or positive")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in CHECKPOINT_FORMATS:
        raise FolderError(f"{where}: checkpoint_format {fmt!r} is not one of {CHECKPOINT_FORMATS}")
    return {"bits": bits, "group_size": g, "sym": bool(qc.get("sym", True)), "format": fmt}


def _decode(tensors: dict, module: str, cfg: dict) -> grid.QuantParams:
    bits, offset = cfg["bits"], 2 ** (cfg["bits"] - 1)
    qweight = fs.take(tensors, f"{module}.qweight")
    scales_name = f"{module}.scales"
    scales = fs.take(tensors, scales_name)
    if qweight.ndim != 2 or scales.ndim != 2:
        raise FolderError(f"{module}: qweight and scales must be 2-D, got {qweight.shape} and {scales.shape}")
    n_in, out = qweight.shape[0] * 32 // bits, qweight.shape[1]
    g = n_in if cfg["group_size"] == -1 else cfg["group_size"]
    if n_in % g:
        raise FolderError(f"{module}: group_size={g} does not divide the {n_in} inputs of {module}.qweight")
    fs.expect(qweight, f"{module}.qweight", (n_in * bits // 32, out), ("int32",))
    fs.expect(scales, scales_name, (n_in // g, out), ("float16", "float32", "bfloat16"))
    qzeros_name = f"{module}.qzeros"
    qzeros = fs.take(tensors, qzeros_name)
    fs.expect(qzeros, qzeros_name, (n_in // g, out * bits // 32), ("int32",))
    gs = None if g == n_in else g
    g_idx = None
    g_idx_name = f"{module}.g_idx"
    if g_idx_name in tensors:
        g_idx = tensors.pop(g_idx_name)
        if g_idx.shape == (n_in,) and np.array_equal(g_idx, np.arange(n_in) // g):
            g_idx = None  # contiguous groups
        elif gs is None:
            raise FolderError(f"the tensor {g_idx_name} assigns inputs to groups, but group_size is -1")
        else:
            try:
                g_idx = grid.check_g_idx(g_idx, n_in, g, where=f" (tensor {g_idx_name})")
            except ValueError as e:
                raise FolderError(str(e)) from None
    codes = fs.unpack_int32(qweight, bits=bits, count=n_in, axis=0)  # (in, out), unsigned
    zero = fs.unpack_int32(qzeros, bits=bits, count=out, axis=1) + (1 if cfg["format"] == "gptq" else 0)
    if zero.max() >= 2**bits:
        raise FolderError(f"the tensor {qzeros_name} holds a zero point of {2**bits} (a stored -1), outside the grid")
    scale = scales.astype(np.float32)
    if cfg["sym"] and np.all(zero == offset) and codes.min() >= 1:
        return grid.QuantParams(codes - offset, scale, np.zeros_like(zero), bits, True, 1, gs, g_idx)
    return grid.QuantParams(codes, scale, zero, bits, False, 1, gs, g_idx)


def read(folder: str | Path, *, names: dict | Callable | None = None) -> tuple[dict, dict[str, grid.QuantParams]]:
    """Read a GPTQ folder into ``(params, grids)``.

    Args:
      folder: a folder with ``model.safetensors`` (or shards) and the GPTQ settings in
        ``config.json``'s ``quantization_config`` or ``quantize_config.json``.
      names: tensor name -> leaf name (see :mod:`jcompress.formats.folder`); a quantized
        module ``m`` is named by its weight ``m.weight``, which must map to a ``kernel`` leaf.

    Returns:
      ``(params, grids)``: params a nested dict of numpy arrays with quantized kernels
      dequantized to float32 ``(in, out)``; grids ``{leaf: QuantParams}`` (``axis=1``),
      symmetric when the folder's zero points are all ``2**(bits-1)`` (with ``sym``), with
      ``g_idx`` set when the folder's ``g_idx`` is not the contiguous one.

    Raises:
      FolderError: a missing config, tensor or foreign setting, a shape that disagrees
        with the config, a ``g_idx`` of the wrong shape or with groups out of range; the
        message names the tensor.
    """
    folder = Path(folder)
    cfg = _config(folder)
    tensors = fs.read_tensors(folder)
    modules = sorted(n[: -len(".qweight")] for n in tensors if n.endswith(".qweight"))
    params, grids = {}, {}
    for module in modules:
        leaf = fs.leaf_name(f"{module}.weight", 2, names)
        if leaf is None:
            continue
        if not fs.transposed(leaf, 2):
            raise FolderError(
                f"{module}.weight maps to the leaf {leaf!r}; a quantized weight needs a '.../kernel' leaf"
            )
        qp = _decode(tensors, module, cfg)
        grids[leaf] = qp
        params[leaf] = np.asarray(grid.dequantize(qp))
    params.update(fs.plain_params(tensors, names, _SUFFIXES))
    return fs.nest(params), grids
