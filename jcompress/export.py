"""The jcompress compressed file: one self-checking file per compressed model.

Layout (all integers little-endian)::

    offset  size  content
    0       8     magic b"JCMPRS\\r\\n" (a text-mode transfer or a wrong file shows here)
    8       4     format version (uint32), currently 2
    12      8     header length H (uint64)
    20      4     CRC-32 of the header bytes (uint32)
    24      H     header: UTF-8 JSON (below), zlib-deflated (version 1: not deflated)
    24 + H  P     payloads, concatenated (P = header["payload_bytes"])

The header is deflated because its JSON (field names, shapes, offsets, checksums) is
repetitive and, for a small model, not small: about 2.5 KB for LeNet-300-100, 8% of its
Deep Compression file, deflated to about a third of that. Files of version 1 are read too.

The header holds ``meta`` (any JSON the caller passes) and one entry per leaf: its key
path in the params dict, its type (``DenseTensor``, ``SparseTensor``, ``CodebookTensor``,
``QuantizedTensor``; see :mod:`jcompress.compressed`), its static fields (shape, dtype,
bits, index bits, ...) and its payloads (offset, length, exact bit count, CRC-32). The
payloads are what the leaf types encode: raw float arrays (dense values, codebooks,
scales), bit-packed codes, relative sparse indices, Huffman code-length tables and
Huffman-coded streams.

:func:`write` is atomic (a temporary file in the same directory, ``fsync``, then
``os.replace``), so a crash never leaves a half-written file under the final name; the
file's permissions honour the umask, as a plain ``open()`` would.
:func:`read` refuses, with a :class:`CompressedFileError` naming the file and the
problem, a wrong magic, an unknown version, a truncated or over-long file, a corrupt
header or a payload whose checksum does not match.

Example:
  >>> params, aux = jc.chain(jc.pruning.magnitude(sparsity=0.9), jc.sharing.kmeans(k=31))(params)
  >>> size = write('model.jcz', compress(params, aux), meta={'model': 'lenet300'})
  >>> params2 = load_params('model.jcz')     # bit-exact dequantized values
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jcompress import compressed, tree

__all__ = ["MAGIC", "VERSION", "CompressedFileError", "file_size", "load_params", "read", "write", "write_dense"]

MAGIC = b"JCMPRS\r\n"
VERSION = 2
_READS = (1, 2)  # format versions this code reads
_PREFIX = struct.Struct("<8sIQI")


class CompressedFileError(ValueError):
    """A compressed file that cannot be read: wrong magic/version, truncated or corrupt."""


def _key(k) -> Any:
    if isinstance(k, jax.tree_util.DictKey):
        return k.key
    if isinstance(k, jax.tree_util.SequenceKey):
        return k.idx
    raise TypeError(f"compressed trees must be nested dicts, got key {k!r}")


def write(path: str | os.PathLike, ctree, *, meta: dict | None = None) -> int:
    """Write a tree of compressed leaves to ``path`` atomically; return the file size.

    Args:
      path: destination; its directory must exist. A new file gets the permissions that
        ``open()`` would give it (``0o666`` less the umask).
      ctree: nested dict whose leaves are compressed types (from :func:`jcompress.compressed.compress`).
      meta: JSON-serialisable metadata stored in the header.

    Returns:
      ``os.path.getsize(path)`` after the write.

    Raises:
      TypeError: a leaf that is not a compressed type, or meta that is not JSON.
      OSError: naming ``path`` when it cannot be written (missing directory, no permission).
    """
    path = Path(path)
    flat, _ = jax.tree_util.tree_flatten_with_path(ctree, is_leaf=compressed.is_compressed)
    leaves, chunks, offset = [], [], 0
    for kp, leaf in flat:
        name = tree.path_str(kp)
        if not compressed.is_compressed(leaf):
            raise TypeError(
                f"leaf {name!r} is a {type(leaf).__name__}, not a compressed type; build the tree with compress()"
            )
        fields, payloads = leaf.encode()
        entries = []
        for pname, data, nbits in payloads:
            entries.append(
                {"name": pname, "offset": offset, "length": len(data), "nbits": int(nbits), "crc32": zlib.crc32(data)}
            )
            chunks.append(data)
            offset += len(data)
        leaves.append(
            {
                "path": [_key(k) for k in kp],
                "name": name,
                "type": type(leaf).__name__,
                "fields": fields,
                "nbits": int(sum(e["nbits"] for e in entries)),
                "payloads": entries,
            }
        )
    try:
        header = json.dumps(
            {"format": "jcompress", "version": VERSION, "meta": meta or {}, "payload_bytes": offset, "leaves": leaves},
            separators=(",", ":"),
        ).encode()
    except TypeError as e:
        raise TypeError(f"meta must be JSON-serialisable: {e}") from None
    header = zlib.compress(header, 9)
    # The temporary file is created with mode 0o666 less the umask, as open() would create
    # the file itself; errors name the user's path, not the temporary one.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(_PREFIX.pack(MAGIC, VERSION, len(header), zlib.crc32(header)))
            f.write(header)
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise type(e)(e.errno, f"cannot write {path}: {e.strerror}", str(path)) from None
    except BaseException:
        _remove(tmp)
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass  # directories cannot be fsynced on every platform
    return file_size(path)


def _remove(tmp: Path) -> None:
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass


def write_dense(path: str | os.PathLike, params, *, meta: dict | None = None) -> int:
    """The float32 dense baseline: every leaf as a float32 :class:`DenseTensor`, same container.

    Raises:
      ValueError naming the leaf that holds NaN or Inf.
    """
    pure = tree.to_pure_dict(params)
    tree.check_finite(pure)
    ctree = jax.tree.map(lambda x: compressed.DenseTensor(np.asarray(x, np.float32)), pure)
    return write(path, ctree, meta=meta)


def _fail(path, what: str):
    raise CompressedFileError(f"{path}: {what}")


def read(path: str | os.PathLike):
    """Read a compressed file written by :func:`write`.

    Returns:
      ``(ctree, meta)``: the nested dict of compressed leaves and the header's meta.

    Raises:
      CompressedFileError: naming ``path`` and what is wrong (magic, version, truncation,
        checksum of the header or of a named leaf's payload, undecodable payload).
      FileNotFoundError: no such file.
    """
    path = Path(path)
    blob = path.read_bytes()
    if len(blob) < _PREFIX.size:
        _fail(path, f"truncated: {len(blob)} bytes, shorter than the {_PREFIX.size}-byte prefix")
    magic, version, hlen, hcrc = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        _fail(path, f"not a jcompress file (magic {magic!r}, expected {MAGIC!r})")
    if version not in _READS:
        _fail(path, f"format version {version} is not supported (this jcompress reads versions {_READS})")
    start = _PREFIX.size + hlen
    if len(blob) < start:
        _fail(path, f"truncated: {len(blob)} bytes, the header alone needs {start}")
    hbytes = blob[_PREFIX.size : start]
    if zlib.crc32(hbytes) != hcrc:
        _fail(path, "header checksum mismatch: the header is corrupt")
    try:
        header = json.loads(zlib.decompress(hbytes) if version >= 2 else hbytes)
    except (ValueError, zlib.error) as e:
        _fail(path, f"header cannot be decoded (deflated JSON expected): {e}")
    expected = start + int(header["payload_bytes"])
    if len(blob) < expected:
        _fail(path, f"truncated: {len(blob)} bytes, expected {expected}")
    if len(blob) > expected:
        _fail(path, f"{len(blob) - expected} unexpected bytes after the last payload (expected {expected} bytes)")
    root: dict = {}
    for leaf in header["leaves"]:
        payloads = {}
        for p in leaf["payloads"]:
            data = blob[start + p["offset"] : start + p["offset"] + p["length"]]
            if zlib.crc32(data) != p["crc32"]:
                _fail(path, f"payload {p['name']!r} of leaf {leaf['name']!r} is corrupt (checksum mismatch)")
            payloads[p["name"]] = data
        cls = compressed.LEAF_TYPES.get(leaf["type"])
        if cls is None:
            _fail(path, f"leaf {leaf['name']!r} has unknown type {leaf['type']!r}")
        try:
            value = cls.decode(leaf["fields"], payloads)
        except (ValueError, KeyError, TypeError) as e:
            _fail(path, f"leaf {leaf['name']!r} cannot be decoded: {e}")
        node = root
        for k in leaf["path"][:-1]:
            node = node.setdefault(k, {})
        node[leaf["path"][-1]] = value
    return root, header["meta"]


def load_params(path: str | os.PathLike) -> dict:
    """The dense params stored in a compressed file (nested dict of jax arrays)."""
    ctree, _ = read(path)
    return compressed.dequantize_tree(ctree)


def file_size(path: str | os.PathLike) -> int:
    """Bytes the file takes on disk (``os.path.getsize``)."""
    return os.path.getsize(path)
