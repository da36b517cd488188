"""Dense bit packing of unsigned integer codes (1 to 16 bits each) into bytes.

Codes are written most significant bit first, one after the other, with no padding
between them; the last byte is padded with zero bits. So two 4-bit codes share a byte
(the first in the high nibble), eight 1-bit codes fill a byte, and 3-bit or 5-bit codes
straddle byte boundaries. ``to_bits`` / ``from_bits`` expose the underlying bit stream
(also used for variable-length Huffman codes).

Example:
  >>> data = pack(np.array([1, 2, 15]), bits=4)   # -> bytes 0x12, 0xF0
  >>> unpack(data, bits=4, count=3)
  array([ 1,  2, 15], dtype=int32)
"""

from __future__ import annotations

import numpy as np

__all__ = ["MAX_BITS", "check_bits", "from_bits", "pack", "packed_size", "to_bits", "unpack"]

MAX_BITS = 16


def check_bits(bits, *, arg: str = "bits") -> int:
    """``bits`` as an int in ``[1, MAX_BITS]``; ValueError naming ``arg`` otherwise."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"{arg} must be an int in [1, {MAX_BITS}], got {bits!r}")
    return int(bits)


def to_bits(values: np.ndarray, widths) -> np.ndarray:
    """The bit stream (uint8 0/1, MSB first) of ``values[i]`` written in ``widths[i]`` bits.

    Args:
      values: non-negative integers ``(n,)``; each must fit in its width.
      widths: an int or an ``(n,)`` int array of widths in ``[0, 64)``.

    Returns:
      ``(sum(widths),)`` uint8 array of 0/1.
    """
    values = np.asarray(values, np.uint64).reshape(-1)
    widths = np.broadcast_to(np.asarray(widths, np.int64), values.shape)
    if values.size == 0:
        return np.zeros((0,), np.uint8)
    top = int(widths.max())
    if top == 0:
        return np.zeros((0,), np.uint8)
    j = np.arange(top, dtype=np.int64)
    shift = widths[:, None] - 1 - j[None, :]
    keep = shift >= 0
    bits = (values[:, None] >> np.where(keep, shift, 0).astype(np.uint64)) & np.uint64(1)
    return bits[keep].astype(np.uint8)


def from_bits(bits: np.ndarray, width: int, count: int) -> np.ndarray:
    """Read ``count`` fixed-width unsigned integers from a 0/1 bit stream (inverse of :func:`to_bits`)."""
    bits = np.asarray(bits, np.uint8).reshape(-1)
    need = width * count
    if bits.size < need:
        raise ValueError(f"bit stream holds {bits.size} bits; {count} codes of {width} bits need {need}")
    grid = bits[:need].reshape(count, width).astype(np.int64)
    weights = np.left_shift(np.int64(1), np.arange(width - 1, -1, -1, dtype=np.int64))
    return grid @ weights if count else np.zeros((0,), np.int64)


def packed_size(count: int, bits: int) -> int:
    """Bytes that :func:`pack` writes for ``count`` codes of ``bits`` bits."""
    return (int(count) * check_bits(bits) + 7) // 8


def pack(codes, *, bits: int) -> bytes:
    """Pack unsigned ``codes`` of ``bits`` bits each densely into bytes (MSB first).

    Args:
      codes: integer array of any shape (flattened in C order), values in ``[0, 2**bits)``.
      bits: code width, 1 to 16.

    Returns:
      ``packed_size(codes.size, bits)`` bytes.

    Raises:
      ValueError: ``bits`` out of range, a code out of range, or a non-integer array.
    """
    bits = check_bits(bits)
    arr = np.asarray(codes)
    if arr.size and arr.dtype.kind not in "iub":
        raise ValueError(f"codes must be integers, got dtype {arr.dtype}")
    arr = arr.reshape(-1).astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for bits={bits}; got range [{arr.min()}, {arr.max()}]")
    return np.packbits(to_bits(arr, bits)).tobytes()


def unpack(data, *, bits: int, count: int) -> np.ndarray:
    """Unpack ``count`` codes of ``bits`` bits from ``data`` (inverse of :func:`pack`).

    Returns:
      ``(count,)`` int32 array.

    Raises:
      ValueError: ``bits`` out of range or ``data`` too short for ``count`` codes.
    """
    bits = check_bits(bits)
    raw = (
        np.frombuffer(bytes(data), np.uint8) if not isinstance(data, np.ndarray) else data.astype(np.uint8).reshape(-1)
    )
    if raw.size < packed_size(count, bits):
        raise ValueError(
            f"{raw.size} bytes cannot hold {count} codes of {bits} bits ({packed_size(count, bits)} needed)"
        )
    return from_bits(np.unpackbits(raw), bits, int(count)).astype(np.int32)
