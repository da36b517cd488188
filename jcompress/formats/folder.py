"""What both serving layouts share: leaf names, int32 bit packing and the checkpoint folder.

**Names.** jcompress names a leaf by its slash-joined path (``layers/0/attn/q_proj/kernel``);
a Hugging Face checkpoint names a tensor by its dotted module path
(``model.layers.0.self_attn.q_proj.weight``). ``names`` arguments map one to the other:

* writing: a dict ``{leaf name: tensor name}`` or a callable ``leaf name -> tensor name``
  (``None`` leaves the leaf out, e.g. an output projection tied to the embedding);
* reading: a dict ``{tensor name: leaf name}`` or a callable the other way round.

The default (``names=None``) is the identity with dots: slashes become dots and a final
``kernel`` becomes ``weight`` (``layers/0/attn/q_proj/kernel`` <->
``layers.0.attn.q_proj.weight``); reading turns a 2-D ``*.weight`` back into ``*/kernel``.
:func:`renamer` builds a callable from ordered ``(regex, replacement)`` rules;
``renamer(LLAMA_TO_HF)`` and ``renamer(LLAMA_FROM_HF)`` map the leaves of
``jcompress.models.llama.Llama`` to Hugging Face Llama names and back.

**Orientation.** A Flax Dense kernel is ``(in, out)``; a PyTorch ``Linear.weight`` is
``(out, in)``. Every 2-D leaf whose jcompress name ends in ``kernel`` is transposed on
the way out and back on the way in; every other leaf is written as it is.

**Packing.** :func:`pack_int32` packs unsigned ``bits``-wide values into int32 words as a
little-endian bit stream per row: value ``j`` of a row starts at bit ``j * bits`` of the
row's stream, word ``w`` holds stream bits ``32 w .. 32 w + 31`` (bit 0 least
significant), and the row is padded with zeros to whole words. With 2, 4 or 8 bits this
is ``32 // bits`` values per word, value ``j`` of the word in bits ``j*bits .. j*bits+bits-1``.

**Files.** ``model.safetensors`` is written (atomically) and read here: an 8-byte
little-endian header size, a JSON header (dtype, shape, byte offsets per tensor and
``__metadata__: {"format": "pt"}``) and the raw little-endian data, float8 e4m3 included.

Example:
  >>> pack_int32(np.array([[1, 2, 3]]), bits=4)   # 0x321
  array([[801]], dtype=int32)
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np

from jcompress import tree

__all__ = [
    "LLAMA_FROM_HF",
    "LLAMA_TO_HF",
    "FolderError",
    "copy_side_files",
    "expect",
    "hf_name",
    "leaf_name",
    "leaf_tensors",
    "load_safetensors",
    "nest",
    "pack_int32",
    "plain_params",
    "read_config",
    "read_tensors",
    "renamer",
    "save_folder",
    "take",
    "transposed",
    "unpack_int32",
    "write_config",
    "write_tensors",
]

WEIGHTS_FILE = "model.safetensors"
# Files of a Hugging Face folder that are weights (never copied from a base folder).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".npz")
_WEIGHT_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "config.json")


class FolderError(ValueError):
    """A checkpoint folder that cannot be read: missing or inconsistent tensors or config."""


# jcompress.models.llama leaf names -> Hugging Face LlamaForCausalLM tensor names, and back.
LLAMA_TO_HF = (
    (r"embed/embedding", "model.embed_tokens.weight"),
    (r"norm/scale", "model.norm.weight"),
    (r"lm_head/kernel", "lm_head.weight"),
    (r"layers/(\d+)/attn_norm/scale", r"model.layers.\1.input_layernorm.weight"),
    (r"layers/(\d+)/mlp_norm/scale", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"layers/(\d+)/attn/(\w+)/kernel", r"model.layers.\1.self_attn.\2.weight"),
    (r"layers/(\d+)/mlp/(\w+)/kernel", r"model.layers.\1.mlp.\2.weight"),
    (r"layers/(\d+)/attn/(\w+)/bias", r"model.layers.\1.self_attn.\2.bias"),
    (r"layers/(\d+)/mlp/(\w+)/bias", r"model.layers.\1.mlp.\2.bias"),
)
LLAMA_FROM_HF = (
    (r"model\.embed_tokens\.weight", "embed/embedding"),
    (r"model\.norm\.weight", "norm/scale"),
    (r"lm_head\.weight", "lm_head/kernel"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers/\1/attn_norm/scale"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers/\1/mlp_norm/scale"),
    (r"model\.layers\.(\d+)\.self_attn\.(\w+)\.weight", r"layers/\1/attn/\2/kernel"),
    (r"model\.layers\.(\d+)\.mlp\.(\w+)\.weight", r"layers/\1/mlp/\2/kernel"),
    (r"model\.layers\.(\d+)\.self_attn\.(\w+)\.bias", r"layers/\1/attn/\2/bias"),
    (r"model\.layers\.(\d+)\.mlp\.(\w+)\.bias", r"layers/\1/mlp/\2/bias"),
)


def renamer(rules) -> Callable[[str], str]:
    """A ``names=`` callable from ordered ``(regex, replacement)`` rules: the first rule whose
    regex matches the whole name gives the new name (``re`` replacement syntax); a name no
    rule matches is a KeyError naming it.

    Example:
      >>> renamer(LLAMA_TO_HF)('layers/0/attn/q_proj/kernel')
      'model.layers.0.self_attn.q_proj.weight'
    """
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]

    def rename(name: str) -> str:
        for pattern, repl in compiled:
            if pattern.fullmatch(name):
                return pattern.sub(repl, name)
        raise KeyError(f"no rule renames {name!r}; add a (regex, replacement) rule for it")

    return rename


def transposed(leaf: str, ndim: int) -> bool:
    """Whether the leaf ``leaf`` of ``ndim`` dimensions is a Dense kernel stored transposed."""
    return ndim == 2 and leaf.rsplit("/", 1)[-1] == "kernel"


def hf_name(leaf: str, names: dict | Callable | None) -> str | None:
    """The tensor name of jcompress leaf ``leaf`` (None: leave it out); see the module docstring."""
    if names is None:
        parts = leaf.split("/")
        if parts[-1] == "kernel":
            parts[-1] = "weight"
        return ".".join(parts)
    if callable(names):
        return names(leaf)
    if leaf not in names:
        raise KeyError(f"names has no entry for the leaf {leaf!r}; add it (a value of None leaves the leaf out)")
    return names[leaf]


def leaf_name(tensor: str, ndim: int, names: dict | Callable | None) -> str | None:
    """The jcompress leaf name of checkpoint tensor ``tensor`` (None: skip it)."""
    if names is None:
        parts = tensor.split(".")
        if ndim == 2 and parts[-1] == "weight":
            parts[-1] = "kernel"
        return "/".join(parts)
    if callable(names):
        return names(tensor)
    return names.get(tensor)


def nest(flat: dict) -> dict:
    """``{'a/0/b': x}`` -> ``{'a': {0: {'b': x}}}`` (all-digit keys become ints, as NNX lists)."""
    out: dict = {}
    for name, value in flat.items():
        keys = [int(k) if k.isdigit() else k for k in name.split("/")]
        node = out
        for k in keys[:-1]:
            if not isinstance(node.setdefault(k, {}), dict):
                raise FolderError(f"the leaf names clash at {name!r}: a prefix of it is itself a leaf")
            node = node[k]
        if keys[-1] in node:
            raise FolderError(f"two tensors map to the leaf {name!r}")
        node[keys[-1]] = value
    return out


def pack_int32(values, *, bits: int, axis: int = -1) -> np.ndarray:
    """Pack unsigned ``bits``-wide integers of a 2-D array into int32 words along ``axis``.

    Args:
      values: integer array ``(rows, cols)`` with every value in ``[0, 2**bits)``.
      bits: 1..8.
      axis: the axis packed (1 / -1: along each row; 0: along each column).

    Returns:
      int32 array with ``ceil(n * bits / 32)`` words in place of the ``n`` values along ``axis``.
    """
    v = np.asarray(values)
    if v.ndim != 2:
        raise ValueError(f"pack_int32 takes a 2-D array, got shape {v.shape}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} must be in 1..8 to pack into int32 words")
    if v.size and (v.min() < 0 or v.max() >= 2**bits):
        raise ValueError(f"values to pack must lie in [0, {2**bits}), got [{v.min()}, {v.max()}]")
    if axis in (0, -2):
        return np.ascontiguousarray(pack_int32(v.T, bits=bits).T)
    rows, n = v.shape
    words = -(-n * bits // 32)
    v = v.astype(np.uint32)
    if 32 % bits == 0:  # whole values per word
        per = 32 // bits
        v = np.pad(v, ((0, 0), (0, words * per - n))).reshape(rows, words, per)
        shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :]
        packed = np.bitwise_or.reduce(v << shifts, axis=2)
    else:  # values straddle words: go through the bit stream
        stream = ((v[:, :, None] >> np.arange(bits, dtype=np.uint32)) & 1).reshape(rows, n * bits)
        stream = np.pad(stream, ((0, 0), (0, words * 32 - n * bits))).reshape(rows, words, 32)
        packed = np.bitwise_or.reduce(stream << np.arange(32, dtype=np.uint32), axis=2)
    return packed.astype(np.uint32).view(np.int32)


def unpack_int32(words, *, bits: int, count: int, axis: int = -1) -> np.ndarray:
    """Inverse of :func:`pack_int32`: ``count`` unsigned values (int32) per row (``axis=0``: per column)."""
    w = np.asarray(words)
    if w.dtype != np.int32 or w.ndim != 2:
        raise ValueError(f"unpack_int32 takes a 2-D int32 array, got {w.dtype} {w.shape}")
    if axis in (0, -2):
        return np.ascontiguousarray(unpack_int32(w.T, bits=bits, count=count).T)
    rows, words = w.shape
    if words * 32 < count * bits:
        raise ValueError(f"{words} int32 words per row hold fewer than {count} values of {bits} bits")
    u = w.view(np.uint32)
    if 32 % bits == 0:
        per = 32 // bits
        shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :]
        vals = ((u[:, :, None] >> shifts) & np.uint32(2**bits - 1)).reshape(rows, words * per)
    else:
        stream = ((u[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1).reshape(rows, words * 32)
        stream = stream[:, : count * bits].reshape(rows, count, bits)
        vals = np.bitwise_or.reduce(stream << np.arange(bits, dtype=np.uint32), axis=2)
    return vals[:, :count].astype(np.int32)


def read_config(folder: Path, name: str = "config.json") -> dict:
    """``folder/name`` (JSON) as a dict; :class:`FolderError` naming the file when absent or bad."""
    path = Path(folder) / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FolderError(f"{path} is missing; a checkpoint folder needs its {name}") from None
    except json.JSONDecodeError as e:
        raise FolderError(f"{path} is not valid JSON: {e}") from None


def write_config(folder: Path, config: dict, name: str = "config.json") -> None:
    (Path(folder) / name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# safetensors dtype codes. The file is written and read here rather than with
# safetensors.numpy, whose numpy API has no float8 (the float-quantized weights).
_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}  # fmt: skip
_CODES = {v: k for k, v in _DTYPES.items()}


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of one safetensors file (8-byte little-endian header size, JSON header, data)."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise FolderError(f"{path} is not a safetensors file (shorter than its 8-byte header size)")
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FolderError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    body = memoryview(data)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise FolderError(f"the tensor {name} of {path} has dtype {info['dtype']}, which jcompress does not read")
        start, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        if end > len(body) or end - start != dtype.itemsize * math.prod(info["shape"]):
            raise FolderError(f"the tensor {name} of {path} is truncated or its offsets disagree with its shape")
        out[name] = np.frombuffer(body[start:end], dtype).reshape(info["shape"]).copy()
    return out


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of ``folder``'s ``model.safetensors`` or its shards, as numpy arrays."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [WEIGHTS_FILE]
    out: dict[str, np.ndarray] = {}
    for f in files:
        if not (folder / f).exists():
            raise FolderError(f"{folder / f} is missing; the folder holds no weights under that name")
        out.update(load_safetensors(folder / f))
    return out


def write_tensors(folder: Path, tensors: dict[str, np.ndarray]) -> Path:
    """Write ``tensors`` to ``folder/model.safetensors`` (PyTorch metadata, as loaders expect), atomically."""
    arrays = {k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())}
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, arr in arrays.items():
        if arr.dtype.newbyteorder("<") not in _CODES:
            raise TypeError(f"the tensor {name} has dtype {arr.dtype}, which the safetensors layout does not hold")
        header[name] = {
            "dtype": _CODES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    path = Path(folder) / WEIGHTS_FILE
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for arr in arrays.values():
            f.write(arr.tobytes())
    os.replace(tmp, path)
    return path


def copy_side_files(base_folder: Path, folder: Path) -> dict:
    """Copy ``base_folder``'s tokenizer and generation files into ``folder``; return its config.

    Weights, shard indices and ``config.json`` itself are not copied (the caller writes them).
    """
    base_folder = Path(base_folder)
    config = read_config(base_folder)
    for src in sorted(base_folder.iterdir()):
        if src.is_file() and src.name not in _WEIGHT_FILES and not src.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copyfile(src, Path(folder) / src.name)
    return config


def take(tensors: dict, name: str) -> np.ndarray:
    """Remove and return ``tensors[name]``; :class:`FolderError` naming the tensor when missing."""
    if name not in tensors:
        raise FolderError(f"the tensor {name} is missing")
    return tensors.pop(name)


def expect(arr: np.ndarray, name: str, shape: tuple, dtypes: tuple) -> None:
    """:class:`FolderError` naming tensor ``name`` unless it has ``shape`` and one of ``dtypes``."""
    if tuple(arr.shape) != tuple(shape):
        raise FolderError(f"the tensor {name} has shape {tuple(arr.shape)}; the config and weight shape say {shape}")
    if arr.dtype.name not in dtypes:
        raise FolderError(f"the tensor {name} has dtype {arr.dtype}; expected one of {dtypes}")


def plain_params(tensors: dict, names, suffixes: tuple[str, ...]) -> dict:
    """``{leaf: array}`` of the tensors left once the quantized modules are read.

    A tensor whose last name part is one of ``suffixes`` (a quantization tensor of a
    module that was not read) or an integer ``*.weight`` (codes without a scale) is an error.
    """
    out = {}
    for name in sorted(tensors):
        arr = tensors[name]
        if name.rsplit(".", 1)[-1] in suffixes or (arr.dtype.kind in "iu" and name.endswith(".weight")):
            raise FolderError(
                f"the tensor {name} belongs to no quantized module the config describes (is its scale tensor missing?)"
            )
        leaf = leaf_name(name, arr.ndim, names)
        if leaf is not None:
            out[leaf] = arr.T if transposed(leaf, arr.ndim) else arr
    return out


def leaf_tensors(params, grids: dict, names, encode: Callable) -> tuple[dict[str, np.ndarray], list[str]]:
    """The checkpoint tensors of ``params``: ``(tensors, float Linear modules)``.

    A leaf with a grid becomes ``encode(leaf, module, w, qp)`` (a dict of tensors; its
    tensor name must end in ``.weight``, the module is the name without it); any other
    leaf becomes one tensor, transposed for a 2-D kernel. The second list names the
    modules of the 2-D kernels left in float.
    """
    flat = dict(tree.named_leaves(tree.to_pure_dict(params)))
    missing = sorted(set(grids) - set(flat))
    if missing:
        raise ValueError(f"aux has grids for leaves not in params: {missing}")
    tensors: dict[str, np.ndarray] = {}
    float_modules: list[str] = []
    for leaf, w in flat.items():
        name = hf_name(leaf, names)
        if name is None:
            continue
        w = np.asarray(w)
        kernel = transposed(leaf, w.ndim)
        if leaf in grids:
            if not kernel:
                raise ValueError(
                    f"{leaf}: only Dense kernels (in, out) named '.../kernel' are stored as quantized Linear weights, "
                    f"got shape {w.shape}; leave this leaf out of the grids or rename it"
                )
            if not name.endswith(".weight"):
                raise ValueError(
                    f"{leaf}: a quantized Linear weight needs a tensor name ending in '.weight', not {name!r}"
                )
            new = encode(leaf, name[: -len(".weight")], w, grids[leaf])
        else:
            new = {name: w.T if kernel else w}
            if kernel and name.endswith(".weight"):
                float_modules.append(name[: -len(".weight")])
        clash = sorted(set(new) & set(tensors))
        if clash:
            raise ValueError(f"{leaf}: the tensor names {clash} are written twice; check names=")
        tensors.update(new)
    return tensors, float_modules


def save_folder(folder, tensors: dict, qconfig: dict, base_folder=None, extra_configs: tuple = ()) -> None:
    """Write ``tensors`` and ``config.json`` (``base_folder``'s, if given, with ``qconfig`` as its
    ``quantization_config``; its tokenizer files copied) into ``folder``; ``extra_configs``
    names more files that receive ``qconfig`` alone."""
    folder = Path(folder)
    if base_folder is not None and Path(base_folder).resolve() == folder.resolve():
        raise ValueError("folder must differ from base_folder (the base model's files would be overwritten)")
    folder.mkdir(parents=True, exist_ok=True)
    config = copy_side_files(base_folder, folder) if base_folder is not None else {}
    config["quantization_config"] = qconfig
    write_tensors(folder, tensors)
    write_config(folder, config)
    for name in extra_configs:
        write_config(folder, qconfig, name=name)
