"""Huffman coding, Deep Compression's relative index (jcompress.huffman) and bit packing (bitpack)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jcompress import bitpack, huffman


def test_code_lengths_textbook_example():
    # CLRS 16.3: a:45 b:13 c:12 d:16 e:9 f:5 -> a 1 bit, b c d 3 bits, e f 4 bits
    lengths = huffman.code_lengths([45, 13, 12, 16, 9, 5])
    np.testing.assert_array_equal(lengths, [1, 3, 3, 3, 4, 4])
    code = huffman.canonical(lengths)
    # canonical: sorted by (length, symbol): a=0, b=100, c=101, d=110, e=1110, f=1111
    np.testing.assert_array_equal(code.codes, [0b0, 0b100, 0b101, 0b110, 0b1110, 0b1111])
    assert huffman.encoded_bits([45, 13, 12, 16, 9, 5], code) == 224  # 100 symbols, 2.24 bits each


def test_ties_are_deterministic_and_edge_cases():
    a = huffman.code_lengths([1, 1, 1, 1, 0, 2])
    b = huffman.code_lengths(np.array([1, 1, 1, 1, 0, 2]))
    np.testing.assert_array_equal(a, b)
    assert a[4] == 0  # an unused symbol gets no code
    np.testing.assert_array_equal(huffman.code_lengths([0, 7, 0]), [0, 1, 0])
    np.testing.assert_array_equal(huffman.code_lengths([0, 0]), [0, 0])
    with pytest.raises(ValueError, match="non-negative"):
        huffman.code_lengths([1, -1])
    with pytest.raises(ValueError, match="Kraft"):
        huffman.canonical([1, 1, 1])
    code = huffman.huffman_code([3, 0, 1])
    with pytest.raises(ValueError, match="symbol 1 has no code"):
        huffman.encode([0, 1], code)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=0, max_size=400), st.integers(1, 5))
def test_round_trip_and_total_length(symbols, skew):
    s = np.array(symbols, np.int64) // skew
    freqs = np.bincount(s, minlength=1) if s.size else np.zeros(1, np.int64)
    code = huffman.huffman_code(freqs)
    if s.size == 0:
        assert huffman.decode(b"", code, count=0).size == 0
        return
    data, nbits = huffman.encode(s, code)
    assert nbits == huffman.encoded_bits(freqs, code) == int(np.dot(freqs, code.lengths))
    assert len(data) == math.ceil(nbits / 8)
    np.testing.assert_array_equal(huffman.decode(data, code, count=s.size), s)
    # prefix-free: no code is a prefix of another
    used = np.flatnonzero(code.lengths)
    words = [format(int(code.codes[u]), f"0{code.lengths[u]}b") for u in used]
    for i, wi in enumerate(words):
        for j, wj in enumerate(words):
            assert i == j or not wj.startswith(wi)


def test_huffman_beats_fixed_width_on_skewed_data():
    rng = np.random.default_rng(0)
    s = np.minimum(rng.geometric(0.35, 20000) - 1, 31)
    freqs = np.bincount(s, minlength=32)
    code = huffman.huffman_code(freqs)
    bits = huffman.encoded_bits(freqs, code)
    assert bits < 0.7 * 5 * s.size  # 5-bit fixed width
    entropy = -(freqs[freqs > 0] / s.size * np.log2(freqs[freqs > 0] / s.size)).sum() * s.size
    assert entropy <= bits < entropy + s.size  # within one bit per symbol of the entropy


def test_decode_refuses_truncated_stream():
    code = huffman.huffman_code([5, 3, 1, 1])
    data, _ = huffman.encode([3, 3, 3, 3, 3, 3, 3, 3], code)
    with pytest.raises(ValueError, match="too short|corrupt"):
        huffman.decode(data[:1], code, count=8)


def test_relative_index_paper_example_and_fillers():
    # 3-bit relative index: a run of 10 zeros needs one filler zero after 7 zeros
    gaps, values = huffman.relative_index(np.array([0] * 10 + [7]), index_bits=3)
    np.testing.assert_array_equal(gaps, [7, 2])
    np.testing.assert_array_equal(values, [0, 7])
    gaps, values = huffman.relative_index(np.array([0, 3, 0, 0, 5, 0, 0]), index_bits=3)
    np.testing.assert_array_equal(gaps, [1, 2])  # trailing zeros are not stored
    np.testing.assert_array_equal(values, [3, 5])
    # a run of exactly 2**b - 1 zeros fits without a filler, 2**b zeros need one
    assert huffman.relative_index(np.array([0] * 7 + [1]), index_bits=3)[0].tolist() == [7]
    assert huffman.relative_index(np.array([0] * 8 + [1]), index_bits=3)[0].tolist() == [7, 0]
    assert huffman.relative_index(np.array([0] * 16 + [1]), index_bits=3)[0].tolist() == [7, 7, 0]
    for bad in (0, 17, 2.5):
        with pytest.raises(ValueError, match=rf"index_bits must be an int in \[1, 16\], got {bad}"):
            huffman.relative_index(np.array([0, 1]), index_bits=bad)
    with pytest.raises(ValueError, match=r"^bits must be an int in \[1, 16\], got 0"):
        bitpack.pack(np.array([1]), bits=0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=300), st.integers(1, 6), st.floats(0.0, 0.99))
def test_relative_index_round_trip(raw, bits, sparsity):
    x = np.array(raw)
    x[np.random.default_rng(len(raw)).random(x.size) < sparsity] = 0
    gaps, values = huffman.relative_index(x, index_bits=bits)
    assert gaps.max(initial=0) < 2**bits
    assert np.count_nonzero(values) == np.count_nonzero(x)
    np.testing.assert_array_equal(huffman.from_relative_index(gaps, values, size=x.size), x)


def test_deep_compression_bits_small_example():
    # 20 weights, k = 3 (2-bit indices with the zero), 3-bit relative index
    codes = np.array([0, 1, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 1, 0, 0, 0, 0])
    r = huffman.deep_compression_bits(codes, k=3, index_bits=3)
    # entries: 1 (gap 1), 2 (gap 2), filler (gap 7), 3 (gap 1), 1 (gap 0)
    assert (r.weights, r.nonzeros, r.entries, r.fillers) == (20, 4, 5, 1)
    assert r.value_bits == 2 and r.codebook_bits == 3 * 32
    assert r.fixed_bits == 5 * (2 + 3) + 96
    # value stream [1, 2, 0, 3, 1]: freqs 0:1 1:2 2:1 3:1 -> lengths 3, 1, 3, 2: 10 bits; gaps likewise
    vf = np.bincount([1, 2, 0, 3, 1], minlength=4)
    gf = np.bincount([1, 2, 7, 1, 0], minlength=8)
    assert r.huffman_value_bits == huffman.encoded_bits(vf, huffman.huffman_code(vf)) == 10
    assert r.huffman_index_bits == huffman.encoded_bits(gf, huffman.huffman_code(gf)) == 10
    assert r.huffman_bits == 10 + 10 + 96
    assert r.bits_per_weight_fixed == pytest.approx((25 + 96) / 20)
    with pytest.raises(ValueError, match="codes must lie"):
        huffman.deep_compression_bits(codes, k=2, index_bits=3)


def test_bitpack_known_bytes_and_errors():
    assert bitpack.pack(np.array([1, 2, 15]), bits=4) == bytes([0x12, 0xF0])
    assert bitpack.pack(np.array([1, 0, 1, 1, 0, 0, 0, 1, 1]), bits=1) == bytes([0b10110001, 0b10000000])
    assert bitpack.pack(np.array([5, 3]), bits=3) == bytes([0b10101100])
    assert bitpack.packed_size(10, 5) == 7
    with pytest.raises(ValueError, match="bits must be"):
        bitpack.pack(np.array([1]), bits=0)
    with pytest.raises(ValueError, match="bits must be"):
        bitpack.pack(np.array([1]), bits=17)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        bitpack.pack(np.array([16]), bits=4)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        bitpack.pack(np.array([-1]), bits=4)
    with pytest.raises(ValueError, match="integers"):
        bitpack.pack(np.array([1.5]), bits=4)
    with pytest.raises(ValueError, match="cannot hold"):
        bitpack.unpack(b"\x00", bits=4, count=3)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 16), st.integers(0, 200), st.integers(0, 2**32 - 1))
def test_bitpack_round_trip(bits, count, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, count)
    data = bitpack.pack(codes, bits=bits)
    assert len(data) == bitpack.packed_size(count, bits) == math.ceil(count * bits / 8)
    out = bitpack.unpack(data, bits=bits, count=count)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, codes)
