"""Compressed leaf types (jcompress.compressed) and the compressed file (jcompress.export)."""

import json
import math
import os
import struct
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jcompress import bitpack, compressed, export, quant
from jcompress.compressed import CodebookTensor, DenseTensor, QuantizedTensor, SparseTensor
from jcompress.core import masked
from jcompress.core.base import ChainAux, CodebookAux, FactorAux, MaskAux, UnitsAux, chain
from jcompress.lowrank import svd
from jcompress.pruning import magnitude
from jcompress.sharing import kmeans

shapes = st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple)


def _sparse(shape, sparsity, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) < sparsity] = 0.0
    return w


def _round_trip(tmp_path, ctree):
    path = tmp_path / "m.jcz"
    size = export.write(path, ctree, meta={"note": "test"})
    assert size == os.path.getsize(path) == export.file_size(path)
    back, meta = export.read(path)
    assert meta == {"note": "test"}
    return path, back


def _header(path):
    blob = path.read_bytes()
    version, hlen = struct.unpack_from("<IQ", blob, 8)
    raw = blob[24 : 24 + hlen]
    return json.loads(zlib.decompress(raw) if version == 2 else raw), blob


def test_header_is_deflated_and_version_1_files_still_read(tmp_path):
    ctree = {"fc": {"kernel": SparseTensor.from_dense(_sparse((30, 20), 0.8, 3), index_bits=5)}}
    path, back = _round_trip(tmp_path, ctree)
    header, blob = _header(path)
    version, hlen = struct.unpack_from("<IQ", blob, 8)
    plain = json.dumps(header, separators=(",", ":")).encode()
    assert version == export.VERSION == 2 and hlen < len(plain)
    # The same file in format version 1 (plain JSON header) reads to the same leaves.
    old = blob[:8] + struct.pack("<IQI", 1, len(plain), zlib.crc32(plain)) + plain + blob[24 + hlen :]
    (tmp_path / "v1.jcz").write_bytes(old)
    v1, meta = export.read(tmp_path / "v1.jcz")
    assert meta == {"note": "test"}
    np.testing.assert_array_equal(v1["fc"]["kernel"].dequantize(), back["fc"]["kernel"].dequantize())


@settings(max_examples=25, deadline=None)
@given(shapes, st.floats(0.0, 0.98), st.sampled_from([2, 3, 5, 8]), st.booleans(), st.integers(0, 1000))
def test_sparse_and_codebook_round_trip(tmp_path_factory, shape, sparsity, index_bits, use_huffman, seed):
    tmp_path = tmp_path_factory.mktemp("rt")
    w = _sparse(shape, sparsity, seed)
    rng = np.random.default_rng(seed)
    k = 5
    idx = np.where(w != 0, rng.integers(1, k + 1, shape), 0)
    codebook = np.concatenate([[0.0], np.sort(rng.standard_normal(k))]).astype(np.float32)
    ctree = {
        "sparse": SparseTensor.from_dense(w, index_bits=index_bits),
        "cb_sparse": CodebookTensor.from_indices(idx, codebook, index_bits=index_bits, huffman=use_huffman),
        "cb_dense": CodebookTensor.from_indices(idx, codebook, index_bits=None, huffman=use_huffman),
        "dense": {"bias": DenseTensor(w.reshape(-1)[:3].copy())},
    }
    np.testing.assert_array_equal(np.asarray(ctree["sparse"].dequantize()), w)
    np.testing.assert_array_equal(np.asarray(ctree["cb_sparse"].dequantize()), codebook[idx])
    path, back = _round_trip(tmp_path, ctree)
    for key in ("sparse", "cb_sparse", "cb_dense"):
        assert type(back[key]) is type(ctree[key])
        np.testing.assert_array_equal(np.asarray(back[key].dequantize()), np.asarray(ctree[key].dequantize()))
    np.testing.assert_array_equal(np.asarray(back["dense"]["bias"].dequantize()), w.reshape(-1)[:3])
    loaded = export.load_params(path)
    np.testing.assert_array_equal(np.asarray(loaded["cb_sparse"]), codebook[idx])
    # nbits is exactly the payload bits the header records, and the payloads fit in the file
    header, _ = _header(path)
    by_name = {leaf["name"]: leaf for leaf in header["leaves"]}
    for key in ("sparse", "cb_sparse", "cb_dense"):
        assert by_name[key]["nbits"] == ctree[key].nbits() == sum(p["nbits"] for p in by_name[key]["payloads"])
        assert all(p["length"] == math.ceil(p["nbits"] / 8) for p in by_name[key]["payloads"])
    # fixed-width sizes as the paper counts them
    e = int(np.asarray(ctree["sparse"].gaps).size)
    assert ctree["sparse"].nbits() == e * (index_bits + 32)
    if not use_huffman:
        assert ctree["cb_dense"].nbits() == w.size * 3 + k * 32  # ceil(log2(k + 1)) = 3 bits per code


@settings(max_examples=8, deadline=None)
@given(shapes, st.integers(2, 8), st.booleans(), st.sampled_from([None, -1]), st.integers(0, 1000))
def test_quantized_round_trip(tmp_path_factory, shape, bits, symmetric, axis, seed):
    tmp_path = tmp_path_factory.mktemp("q")
    w = jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))
    qp = quant.quantize_leaf(w, bits=bits, symmetric=symmetric, axis=axis)
    qt = QuantizedTensor.from_qparams(qp)
    np.testing.assert_array_equal(np.asarray(qt.dequantize()), np.asarray(quant.dequantize(qp)))
    _, back = _round_trip(tmp_path, {"w": qt})
    np.testing.assert_array_equal(np.asarray(back["w"].dequantize()), np.asarray(quant.dequantize(qp)))
    np.testing.assert_array_equal(np.asarray(back["w"].codes), np.asarray(qp.codes))
    scale_bits = 32 * int(np.size(qp.scale)) * (1 if symmetric else 2)
    assert qt.nbits() == w.size * bits + scale_bits


def _zero_code_layouts(shape):
    """quantize() layouts for a kernel of ``shape``: per tensor, per channel, groups of at most 3."""
    k = math.prod(shape) // shape[-1]
    return [{"axis": None}, {"axis": -1}, {"axis": -1, "group_size": max(d for d in (1, 2, 3) if k % d == 0)}]


@settings(max_examples=12, deadline=None)
@given(
    shapes,
    st.floats(0.0, 0.98),
    st.integers(2, 8),
    st.booleans(),
    st.integers(0, 2),
    st.sampled_from([2, 3, 5, 8]),
    st.integers(0, 1000),
)
def test_quantized_sparse_layout_round_trip(tmp_path_factory, shape, sparsity, bits, symmetric, layout, ib, seed):
    tmp_path = tmp_path_factory.mktemp("qs")
    w = jnp.asarray(_sparse(shape, sparsity, seed))
    qp = quant.quantize_leaf(w, bits=bits, symmetric=symmetric, **_zero_code_layouts(shape)[layout])
    qs = QuantizedTensor.from_qparams(qp, index_bits=ib)
    want = np.asarray(quant.dequantize(qp))
    # the code of zero is zero_point (asymmetric), 0 (symmetric); entries are the other codes and fillers
    e = int(np.asarray(qs.gaps).size)
    assert qs.shape == tuple(shape) and np.shape(qs.codes) == (e,) and qs.index_bits == ib
    assert e >= int(np.count_nonzero(want))
    np.testing.assert_array_equal(np.asarray(qs.dequantize()), want)  # bit for bit, zeros included
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda t: t.dequantize())(qs)), want)
    np.testing.assert_array_equal(np.asarray(qs.to_qparams().codes), np.asarray(qp.codes))
    path, back = _round_trip(tmp_path, {"w": qs})
    assert back["w"].index_bits == ib and back["w"].shape == tuple(shape)
    np.testing.assert_array_equal(np.asarray(back["w"].dequantize()), want)
    np.testing.assert_array_equal(np.asarray(back["w"].to_qparams().codes), np.asarray(qp.codes))
    header, _ = _header(path)
    scale_bits = 32 * int(np.size(qp.scale)) * (1 if symmetric else 2)
    assert header["leaves"][0]["nbits"] == qs.nbits() == e * (bits + ib) + scale_bits


@pytest.mark.parametrize("symmetric", [True, False])
def test_pruned_then_quantized_is_stored_sparse(tmp_path, symmetric):
    rng = np.random.default_rng(0)
    params = {
        "fc1": {"kernel": jnp.asarray(rng.standard_normal((400, 300)), jnp.float32), "bias": jnp.zeros(300)},
        "fc2": {"kernel": jnp.asarray(rng.standard_normal((300, 10)), jnp.float32).at[:4].set(0.0)},
    }
    pruned, paux = masked(magnitude(sparsity=0.9), r"fc1/kernel")(params)
    q, qaux = quant.quantize(bits=8, axis=-1, symmetric=symmetric)(pruned)
    ctree, dense = compressed.compress(q, paux, qaux), compressed.compress(q, qaux, sparse=False)
    fc1, fc2 = ctree["fc1"]["kernel"], ctree["fc2"]["kernel"]
    assert fc1.gaps is not None and fc1.index_bits == 5  # the paper's fc width
    # fc2 has 40 exact zeros but no pruning: the dense layout is smaller and kept (no size increase)
    assert fc2.gaps is None and fc2.nbits() == dense["fc2"]["kernel"].nbits()
    assert fc2.nbits() < QuantizedTensor.from_qparams(qaux.grids["fc2/kernel"], index_bits=5).nbits()
    # 12,000 weights kept of 120,000; runs of 32+ zeros add fillers: sum_k 0.9**(32k) ~ 3.6% more entries
    nnz, e = int(np.count_nonzero(np.asarray(q["fc1"]["kernel"]))), int(np.asarray(fc1.gaps).size)
    assert nnz <= 12_000 <= e <= 1.06 * 12_000
    scale_bits = 32 * 300 * (1 if symmetric else 2)
    assert fc1.nbits() == e * (8 + 5) + scale_bits  # vs dense 120,000 * 8 + scale_bits
    assert dense["fc1"]["kernel"].nbits() == 120_000 * 8 + scale_bits
    # eager, jit and the file all give the quantized params exactly
    for got in (compressed.dequantize_tree(ctree), jax.jit(compressed.dequantize_tree)(ctree)):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, q)
    size = export.write(tmp_path / "sparse.jcz", ctree)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        export.load_params(tmp_path / "sparse.jcz"),
        q,
    )
    # the same int8 model without pruning: fc1/kernel takes 8 bits per weight against
    # 0.1 * 1.036 * (8 + 5) ~ 1.35 (5.4x to 5.9x less with the scales); with what both files
    # share (biases, fc2, scales, headers: ~7 KB) the file is ~4.5x smaller (~28 KB vs ~128 KB)
    assert dense["fc1"]["kernel"].nbits() > 5 * fc1.nbits()
    unpruned, uaux = quant.quantize(bits=8, axis=-1, symmetric=symmetric)(params)
    int8_size = export.write(tmp_path / "int8.jcz", compressed.compress(unpruned, uaux))
    assert 4 * size < int8_size < 5 * size


def test_dense_quantized_file_format_is_unchanged(tmp_path):
    w = jnp.asarray(np.random.default_rng(2).standard_normal((6, 4)), jnp.float32)
    qp = quant.quantize_leaf(w, bits=4, symmetric=False, axis=-1)
    codes, scale, zp = (np.asarray(x) for x in (qp.codes, qp.scale, qp.zero_point))
    # the fields and payloads of a dense QuantizedTensor as files of format version 1 hold them
    fields = {
        "shape": [6, 4],
        "bits": 4,
        "symmetric": False,
        "axis": 1,
        "group_size": None,
        "scale_shape": [1, 4],
        "offset": 0,
    }
    payloads = {
        "codes": bitpack.pack(codes, bits=4),
        "scale": scale.astype(np.float32).tobytes(),
        "zero_point": zp.astype(np.int32).tobytes(),
    }
    old = QuantizedTensor.decode(fields, payloads)
    assert old.gaps is None and old.index_bits is None
    np.testing.assert_array_equal(np.asarray(old.dequantize()), np.asarray(quant.dequantize(qp)))
    got_fields, got_payloads = QuantizedTensor.from_qparams(qp).encode()
    assert got_fields == fields
    assert {name: data for name, data, _ in got_payloads} == payloads
    _, back = _round_trip(tmp_path, {"w": old})
    np.testing.assert_array_equal(np.asarray(back["w"].dequantize()), np.asarray(quant.dequantize(qp)))


def test_compress_from_transform_aux_and_jit(tmp_path):
    rng = np.random.default_rng(0)
    params = {
        "fc1": {"kernel": jnp.asarray(rng.standard_normal((60, 40)), jnp.float32), "bias": jnp.zeros(40)},
        "conv": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 4, 6)), jnp.float32), "bias": jnp.ones(6)},
        "fc2": {"kernel": jnp.asarray(rng.standard_normal((40, 10)), jnp.float32)},
    }
    pruned, paux = masked(magnitude(sparsity=0.8), r"(fc1|conv)/kernel")(params)
    shared, saux = masked(kmeans(k=7), r"fc1/kernel")(pruned)
    q, qaux = masked(quant.quantize(bits=4, axis=-1), r"fc2/kernel")(shared)
    ctree = compressed.compress(q, paux, saux, qaux)
    kinds = jax.tree.map(lambda x: type(x).__name__, ctree, is_leaf=compressed.is_compressed)
    assert kinds == {
        "fc1": {"kernel": "CodebookTensor", "bias": "DenseTensor"},
        "conv": {"kernel": "SparseTensor", "bias": "DenseTensor"},
        "fc2": {"kernel": "QuantizedTensor"},
    }
    assert ctree["fc1"]["kernel"].index_bits == 5 and ctree["conv"]["kernel"].index_bits == 8  # the paper's widths
    dense = compressed.dequantize_tree(ctree)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), dense, q)
    jitted = jax.jit(compressed.dequantize_tree)(ctree)  # the leaf types are pytrees
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), jitted, q)
    path, _ = _round_trip(tmp_path, ctree)
    loaded = export.load_params(path)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded, q)
    assert compressed.nonzeros(ctree) == sum(int(np.count_nonzero(np.asarray(x))) for x in jax.tree.leaves(q))
    dense_size = export.write_dense(tmp_path / "dense.jcz", params)
    assert dense_size > 4 * sum(x.size for x in jax.tree.leaves(params))
    assert export.file_size(path) < dense_size / 4
    # params that do not match their aux are refused, naming the leaf
    with pytest.raises(ValueError, match="fc1/kernel is not codebook"):
        compressed.compress(pruned, saux)
    with pytest.raises(ValueError, match="fc2/kernel differs from dequantize"):
        compressed.compress(params, qaux)
    with pytest.raises(ValueError, match="conv/kernel has nonzeros where its mask is False"):
        compressed.compress(params, paux)


@pytest.fixture
def written(tmp_path):
    w = _sparse((20, 10), 0.7, 1)
    path = tmp_path / "m.jcz"
    export.write(
        path, {"a": {"kernel": SparseTensor.from_dense(w, index_bits=5)}, "b": DenseTensor(np.ones(4, np.float32))}
    )
    return path


def test_corrupt_files_are_refused(written):
    blob = written.read_bytes()
    header, _ = _header(written)
    start = 24 + struct.unpack_from("<Q", blob, 12)[0]

    def refuse(data, match):
        bad = written.with_name("bad.jcz")
        bad.write_bytes(data)
        with pytest.raises(export.CompressedFileError, match=match) as e:
            export.read(bad)
        assert "bad.jcz" in str(e.value)

    refuse(b"NOTJCMP!" + blob[8:], "not a jcompress file")
    refuse(blob[:10], "truncated")
    refuse(blob[:-3], "truncated")
    refuse(blob + b"\x00", "unexpected bytes")
    refuse(blob[:8] + struct.pack("<I", 99) + blob[12:], "version 99")
    flipped = bytearray(blob)
    flipped[30] ^= 0x01
    refuse(bytes(flipped), "header checksum")
    for leaf in header["leaves"]:
        p = leaf["payloads"][0]
        flipped = bytearray(blob)
        flipped[start + p["offset"]] ^= 0x40
        refuse(bytes(flipped), f"payload '{p['name']}' of leaf '{leaf['name']}' is corrupt")


def test_write_is_atomic_and_validates(tmp_path):
    path = tmp_path / "m.jcz"
    export.write(path, {"a": DenseTensor(np.zeros(3, np.float32))})
    first = path.read_bytes()
    with pytest.raises(TypeError, match="not a compressed type"):
        export.write(path, {"a": np.zeros(3)})
    with pytest.raises(TypeError, match="JSON"):
        export.write(path, {"a": DenseTensor(np.zeros(3, np.float32))}, meta={"x": object()})
    assert path.read_bytes() == first  # a failed write leaves the old file intact
    assert sorted(os.listdir(tmp_path)) == ["m.jcz"]  # no temporary files left behind


def test_compress_dispatches_on_aux_types_and_flattens_chains(tmp_path):
    rng = np.random.default_rng(3)
    params = {
        "fc1": {"kernel": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32), "bias": jnp.zeros(32)},
        "conv": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 4, 8)), jnp.float32)},
    }
    t = chain(masked(magnitude(sparsity=0.75), "fc1/kernel"), chain(masked(kmeans(k=3), "fc1/kernel")))
    out, aux = t(params)
    assert isinstance(aux, ChainAux) and isinstance(aux[1], ChainAux)
    by_chain = compressed.compress(out, aux, index_bits={"fc1": 6})
    by_hand = compressed.compress(out, aux[0], aux[1][0], None, index_bits={"fc1": 6})
    bits = [[x.nbits() for x in jax.tree.leaves(c, is_leaf=compressed.is_compressed)] for c in (by_chain, by_hand)]
    assert bits[0] == bits[1]
    fc1 = by_chain["fc1"]["kernel"]
    assert isinstance(fc1, CodebookTensor) and fc1.index_bits == 6 and fc1.k == 3
    assert isinstance(by_chain["conv"]["kernel"], DenseTensor)
    # a factorised leaf is stored as the dense product its params hold
    low, faux = masked(svd(rank=2), "conv/kernel")(params)
    assert isinstance(faux, FactorAux)
    stored = compressed.compress(low, faux)["conv"]["kernel"]
    assert isinstance(stored, DenseTensor)
    np.testing.assert_array_equal(stored.dequantize(), low["conv"]["kernel"])
    # an aux that is no params transform's, or a bare mask tree, is refused by type
    with pytest.raises(TypeError, match="UnitsAux"):
        compressed.compress(params, UnitsAux({}, 0, 0))
    with pytest.raises(TypeError, match="MaskAux, CodebookAux, GridAux"):
        compressed.compress(out, aux[0].masks)
    # index bits are a spec: resolved over the leaf names, checked, defaulting to the paper's widths
    with pytest.raises(ValueError, match=r"index_bits=0 must be in \[1, 16\] \(leaf 'conv/kernel'\)"):
        compressed.compress(out, aux, index_bits=0)
    with pytest.raises(ValueError, match=r"index_bits: the patterns \['head'\] match none"):
        compressed.compress(out, aux, index_bits={"head": 4})
    with pytest.raises(TypeError, match="index_bits=4.5"):
        compressed.compress(out, aux, index_bits=4.5)
    assert compressed.compress(out, aux, index_bits=np.int64(7))["fc1"]["kernel"].index_bits == 7
    assert compressed.compress(out, aux)["fc1"]["kernel"].index_bits == 5
    assert compressed.paper_widths(None, params, ["fc1/kernel", "conv/kernel"], arg="bits") == {
        "fc1/kernel": 5,
        "conv/kernel": 8,
    }
    pruned, paux = masked(magnitude(sparsity=0.5), "conv/kernel")(params)
    ctree = compressed.compress(pruned, MaskAux(paux.masks))
    assert ctree["conv"]["kernel"].index_bits == 8
    # a CodebookAux with codebooks the params do not hold is refused, naming the leaf
    wrong = CodebookAux({g: c + 1 for g, c in aux[1][0].codebooks.items()}, aux[1][0].indices, {})
    with pytest.raises(ValueError, match="fc1/kernel is not codebook"):
        compressed.compress(out, wrong)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_non_finite_weights_are_refused_naming_the_leaf(tmp_path, bad):
    params = {"fc1": {"kernel": jnp.ones((4, 4)).at[1, 2].set(bad), "bias": jnp.zeros(4)}}
    with pytest.raises(ValueError, match="params/fc1/kernel contains NaN or Inf"):
        compressed.compress(params)
    with pytest.raises(ValueError, match="params/fc1/kernel contains NaN or Inf"):
        export.write_dense(tmp_path / "m.jcz", params)
    assert not (tmp_path / "m.jcz").exists()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        export.write(tmp_path / "m.jcz", {"a": DenseTensor(np.zeros(3, np.float32))})
        export.write_dense(tmp_path / "d.jcz", {"a": np.zeros(3, np.float32)})
    finally:
        os.umask(old)
    for name in ("m.jcz", "d.jcz"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_write_errors_name_the_users_path(tmp_path):
    ctree = {"a": DenseTensor(np.zeros(3, np.float32))}
    missing = tmp_path / "no" / "such" / "m.jcz"
    with pytest.raises(FileNotFoundError) as e:
        export.write(missing, ctree)
    assert str(missing) in str(e.value) and ".tmp" not in str(e.value)
    (tmp_path / "adir").mkdir()
    with pytest.raises(OSError) as e:
        export.write(tmp_path / "adir", ctree)
    assert str(tmp_path / "adir") in str(e.value) and ".tmp" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["adir"]  # no temporary file left behind
