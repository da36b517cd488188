"""Canonical Huffman coding and Deep Compression's relative sparse index.

**Huffman.** :func:`code_lengths` builds optimal prefix-code lengths from symbol
frequencies; ties are broken deterministically (a merged node is ordered by its
frequency, then by the smallest symbol it contains), so the same frequencies always give
the same code. :func:`canonical` turns lengths into the canonical code (codes assigned in
order of ``(length, symbol)``, as in DEFLATE), so a code is stored as its lengths alone.
:func:`encode` writes a symbol array as a bit stream packed into bytes (MSB first) and
:func:`decode` reads it back. The total length is ``sum(freq * length)`` bits.

**Relative index** (Deep Compression, section 4 and Figure 2). A sparse layer is stored
as entries ``(gap, value)`` in row-major order, where ``gap`` is the number of zeros
skipped since the previous entry and must fit in ``index_bits`` bits (5 for fc layers and
8 for conv layers in the paper). When a run of zeros is longer than ``2**index_bits - 1``
a *filler* entry with value 0 (an explicit zero) is inserted after ``2**index_bits - 1``
zeros. Zeros after the last nonzero are not stored (the decoder knows the size).

**Accounting** (:func:`deep_compression_bits`), as the paper counts it: every entry costs
its value index (``ceil(log2(k + 1))`` bits fixed width, index 0 being the zero) plus its
relative index (``index_bits``), plus the codebook (``k`` float32 centroids; the zero is
implicit); with Huffman coding the two streams cost their Huffman code lengths instead.
The code-length tables are reported separately (``table_bits``); the file stores them.

Example:
  >>> code = huffman_code(np.bincount(symbols))
  >>> data, nbits = encode(symbols, code)
  >>> np.array_equal(decode(data, code, count=len(symbols)), symbols)
  True
"""

from __future__ import annotations

import heapq
import math
from typing import NamedTuple

import numpy as np

from jcompress import bitpack

__all__ = [
    "MAX_CODE_LENGTH",
    "BitsReport",
    "HuffmanCode",
    "canonical",
    "code_lengths",
    "decode",
    "deep_compression_bits",
    "encode",
    "encoded_bits",
    "from_relative_index",
    "huffman_code",
    "relative_index",
]

MAX_CODE_LENGTH = 57  # codes are handled in uint64 windows


class HuffmanCode(NamedTuple):
    """A canonical prefix code over symbols ``0..len(lengths)-1``.

    Attributes:
      lengths: ``(alphabet,)`` int64 code length per symbol; 0 for symbols that never occur.
      codes: ``(alphabet,)`` uint64 canonical code of each symbol (MSB-first bit pattern).
    """

    lengths: np.ndarray
    codes: np.ndarray


def _as_freqs(freqs) -> np.ndarray:
    f = np.asarray(freqs)
    if f.ndim != 1:
        raise ValueError(f"freqs must be a 1-D array of symbol counts, got shape {f.shape}")
    if f.size and (f.dtype.kind not in "iu" or f.min() < 0):
        raise ValueError("freqs must be non-negative integers (counts per symbol)")
    return f.astype(np.int64)


def code_lengths(freqs) -> np.ndarray:
    """Huffman code lengths for symbol counts ``freqs`` (deterministic tie-breaking).

    Args:
      freqs: ``(alphabet,)`` non-negative integer counts.

    Returns:
      ``(alphabet,)`` int64 lengths; 0 for unused symbols; a single used symbol gets 1.
    """
    f = _as_freqs(freqs)
    lengths = np.zeros(f.shape, np.int64)
    used = np.flatnonzero(f)
    if used.size == 1:
        lengths[used] = 1
    if used.size <= 1:
        return lengths
    # heap items: (frequency, smallest symbol inside, node id); node id indexes `members`.
    members = [[int(s)] for s in used]
    heap = [(int(f[s]), int(s), i) for i, s in enumerate(used)]
    heapq.heapify(heap)
    while len(heap) > 1:
        fa, sa, a = heapq.heappop(heap)
        fb, sb, b = heapq.heappop(heap)
        for s in members[a] + members[b]:
            lengths[s] += 1
        members.append(members[a] + members[b])
        heapq.heappush(heap, (fa + fb, min(sa, sb), len(members) - 1))
    if lengths.max() > MAX_CODE_LENGTH:
        raise ValueError(f"Huffman code longer than {MAX_CODE_LENGTH} bits; the frequencies are too skewed")
    return lengths


def canonical(lengths) -> HuffmanCode:
    """The canonical code with the given lengths (symbols ordered by ``(length, symbol)``)."""
    lengths = np.asarray(lengths, np.int64)
    if lengths.size and (lengths.min() < 0 or lengths.max() > MAX_CODE_LENGTH):
        raise ValueError(f"code lengths must lie in [0, {MAX_CODE_LENGTH}]")
    used = np.flatnonzero(lengths)
    if used.size and sum(2.0 ** -lengths[used]) > 1.0 + 1e-12:
        raise ValueError("code lengths violate the Kraft inequality; they are not a prefix code")
    codes = np.zeros(lengths.shape, np.uint64)
    order = sorted(used, key=lambda s: (lengths[s], s))
    code, prev = 0, 0
    for s in order:
        code <<= int(lengths[s]) - prev
        prev = int(lengths[s])
        codes[s] = code
        code += 1
    return HuffmanCode(lengths, codes)


def huffman_code(freqs) -> HuffmanCode:
    """Canonical Huffman code for symbol counts ``freqs``."""
    return canonical(code_lengths(freqs))


def encoded_bits(freqs, code: HuffmanCode) -> int:
    """Total code length ``sum(freqs * lengths)`` in bits."""
    f = _as_freqs(freqs)
    return int(np.dot(f, code.lengths[: f.size]))


def _check_symbols(symbols, code: HuffmanCode) -> np.ndarray:
    s = np.asarray(symbols).reshape(-1)
    if s.size and s.dtype.kind not in "iu":
        raise ValueError(f"symbols must be integers, got dtype {s.dtype}")
    s = s.astype(np.int64)
    if s.size and (s.min() < 0 or s.max() >= code.lengths.size or np.any(code.lengths[s] == 0)):
        bad = s[(s < 0) | (s >= code.lengths.size)]
        bad = bad if bad.size else s[code.lengths[np.clip(s, 0, code.lengths.size - 1)] == 0]
        raise ValueError(
            f"symbol {int(bad[0])} has no code (alphabet of {code.lengths.size}); build the code from these symbols"
        )
    return s


def encode(symbols, code: HuffmanCode) -> tuple[bytes, int]:
    """Huffman-encode ``symbols`` into bytes (MSB first, last byte zero-padded).

    Returns:
      ``(data, nbits)`` where ``nbits`` is the exact number of code bits.
    """
    s = _check_symbols(symbols, code)
    bits = bitpack.to_bits(code.codes[s], code.lengths[s])
    return np.packbits(bits).tobytes(), int(bits.size)


def decode(data, code: HuffmanCode, *, count: int) -> np.ndarray:
    """Decode ``count`` symbols from ``data`` written by :func:`encode`.

    Raises:
      ValueError: the stream ends early or holds a bit pattern that is no code.
    """
    if count == 0:
        return np.zeros((0,), np.int64)
    used = np.flatnonzero(code.lengths)
    if used.size == 0:
        raise ValueError("the code has no symbols but count > 0")
    bits = np.unpackbits(np.frombuffer(bytes(data), np.uint8))
    width = int(code.lengths.max())
    n = bits.size
    padded = np.concatenate([bits, np.zeros(width, np.uint8)]).astype(np.uint64)
    window = np.zeros(n, np.uint64)  # the next `width` bits at every position
    for j in range(width):
        window = (window << np.uint64(1)) | padded[j : j + n]
    # canonical decoding: the code of length l starting at p is the l-bit prefix of window[p]
    sym_at = np.full(n, -1, np.int64)
    len_at = np.zeros(n, np.int64)
    for length in range(1, width + 1):
        sel = used[code.lengths[used] == length]
        if sel.size == 0:
            continue
        order = np.argsort(code.codes[sel])
        table_codes, table_syms = code.codes[sel][order], sel[order]
        prefix = window >> np.uint64(width - length)
        pos = np.clip(np.searchsorted(table_codes, prefix), 0, sel.size - 1)
        hit = (table_codes[pos] == prefix) & (sym_at < 0)
        sym_at[hit] = table_syms[pos[hit]]
        len_at[hit] = length
    nxt = len_at.tolist()
    syms = sym_at.tolist()
    out = np.empty(count, np.int64)
    p = 0
    for i in range(count):
        if p >= n or syms[p] < 0:
            raise ValueError(f"Huffman stream is corrupt or too short: symbol {i} of {count} at bit {p} of {n}")
        out[i] = syms[p]
        p += nxt[p]
    if p > n:
        raise ValueError(f"Huffman stream is too short: {count} symbols need {p} bits, it has {n}")
    return out


def relative_index(codes, *, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Sparse entries ``(gaps, values)`` of a flat code array where 0 means an empty position.

    Args:
      codes: integer array (flattened in C order); nonzero entries are stored.
      index_bits: bits of a relative index; gaps are at most ``2**index_bits - 1``.

    Returns:
      ``(gaps, values)`` int64 arrays of equal length: ``gaps[i]`` zeros are skipped
      before entry ``i``; ``values[i]`` is its code, 0 for a filler entry.

    Example (3 bits, a run of 10 zeros before the value 7):
      >>> relative_index(np.array([0] * 10 + [7]), index_bits=3)
      (array([7, 2]), array([0, 7]))
    """
    bitpack.check_bits(index_bits, arg="index_bits")
    flat = np.asarray(codes).reshape(-1).astype(np.int64)
    pos = np.flatnonzero(flat)
    run = np.diff(np.concatenate([[-1], pos])) - 1  # zeros before each nonzero
    cap = (1 << index_bits) - 1
    fill = run // (cap + 1)  # fillers needed before each nonzero
    entries = pos.size + int(fill.sum())
    gaps = np.full(entries, cap, np.int64)
    values = np.zeros(entries, np.int64)
    last = np.cumsum(fill + 1) - 1  # entry index of each nonzero
    gaps[last] = run - fill * (cap + 1)
    values[last] = flat[pos]
    return gaps, values


def from_relative_index(gaps, values, *, size: int) -> np.ndarray:
    """The flat code array of ``size`` elements that :func:`relative_index` encoded."""
    gaps = np.asarray(gaps, np.int64).reshape(-1)
    values = np.asarray(values, np.int64).reshape(-1)
    if gaps.shape != values.shape:
        raise ValueError(f"gaps and values must have the same length, got {gaps.size} and {values.size}")
    out = np.zeros(int(size), np.int64)
    if gaps.size:
        pos = np.cumsum(gaps + 1) - 1
        if pos[-1] >= size:
            raise ValueError(f"relative indices reach position {int(pos[-1])} beyond size {size}")
        out[pos] = values
    return out


class BitsReport(NamedTuple):
    """Storage of one layer in the Deep Compression format (see module docstring).

    All ``*_bits`` fields are totals in bits; ``bits_per_weight_*`` divide by ``weights``.
    """

    weights: int
    nonzeros: int
    entries: int
    fillers: int
    value_bits: int
    index_bits: int
    codebook_bits: int
    fixed_bits: int
    huffman_value_bits: int
    huffman_index_bits: int
    huffman_bits: int
    table_bits: int

    @property
    def bits_per_weight_fixed(self) -> float:
        return self.fixed_bits / max(self.weights, 1)

    @property
    def bits_per_weight_huffman(self) -> float:
        return self.huffman_bits / max(self.weights, 1)


def deep_compression_bits(codes, *, k: int, index_bits: int, codebook_bits_per_entry: int = 32) -> BitsReport:
    """Exact storage of a clustered sparse layer, counted as the paper counts it.

    Args:
      codes: codebook indices of a layer (any shape): 0 for a zero weight, ``1..k`` for
        the nonzero centroids (``CodebookAux.indices``).
      k: number of nonzero centroids (the codebook has ``k + 1`` entries with the zero).
      index_bits: relative-index width (5 fc, 8 conv in the paper).
      codebook_bits_per_entry: bits of one stored centroid (float32: 32).

    Returns:
      :class:`BitsReport`.
    """
    flat = np.asarray(codes).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() > k):
        raise ValueError(f"codes must lie in [0, {k}] for k={k}, got [{flat.min()}, {flat.max()}]")
    gaps, values = relative_index(flat, index_bits=index_bits)
    entries = int(values.size)
    nonzeros = int(np.count_nonzero(flat))
    value_bits = max(1, math.ceil(math.log2(k + 1)))
    codebook = k * codebook_bits_per_entry
    fixed = entries * (value_bits + index_bits) + codebook
    hv = hi = 0
    if entries:
        vf, gf = np.bincount(values, minlength=k + 1), np.bincount(gaps, minlength=1 << index_bits)
        hv, hi = encoded_bits(vf, huffman_code(vf)), encoded_bits(gf, huffman_code(gf))
    table = 8 * ((k + 1) + (1 << index_bits))  # one uint8 code length per symbol, both streams
    return BitsReport(
        weights=int(flat.size),
        nonzeros=nonzeros,
        entries=entries,
        fillers=entries - nonzeros,
        value_bits=value_bits,
        index_bits=int(index_bits),
        codebook_bits=codebook,
        fixed_bits=fixed,
        huffman_value_bits=hv,
        huffman_index_bits=hi,
        huffman_bits=hv + hi + codebook,
        table_bits=table,
    )
