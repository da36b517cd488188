"""Compressed leaf types (jcompress.compressed) and the compressed file (jcompress.export)."""

import json
import math
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jcompress import compressed, export, quant
from jcompress.compressed import CodebookTensor, DenseTensor, QuantizedTensor, SparseTensor
from jcompress.sharing import kmeans_share

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
    hlen = struct.unpack_from("<Q", blob, 12)[0]
    return json.loads(blob[24 : 24 + hlen]), blob


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
    qp = quant.quantize(w, bits=bits, symmetric=symmetric, axis=axis)
    qt = QuantizedTensor.from_qparams(qp)
    np.testing.assert_array_equal(np.asarray(qt.dequantize()), np.asarray(quant.dequantize(qp)))
    _, back = _round_trip(tmp_path, {"w": qt})
    np.testing.assert_array_equal(np.asarray(back["w"].dequantize()), np.asarray(quant.dequantize(qp)))
    np.testing.assert_array_equal(np.asarray(back["w"].codes), np.asarray(qp.codes))
    scale_bits = 32 * int(np.size(qp.scale)) * (1 if symmetric else 2)
    assert qt.nbits() == w.size * bits + scale_bits


def test_compress_from_transform_aux_and_jit(tmp_path):
    from jcompress.pruning.masks import magnitude_pruning

    rng = np.random.default_rng(0)
    params = {
        "fc1": {"kernel": jnp.asarray(rng.standard_normal((60, 40)), jnp.float32), "bias": jnp.zeros(40)},
        "conv": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 4, 6)), jnp.float32), "bias": jnp.ones(6)},
        "fc2": {"kernel": jnp.asarray(rng.standard_normal((40, 10)), jnp.float32)},
    }
    pruned, paux = magnitude_pruning(sparsity=0.8, include=r"(fc1|conv)/kernel")(params)
    shared, saux = kmeans_share(pruned, k=7, include=r"fc1/kernel")
    q, qaux = quant.quantize_params(shared, bits=4, include=r"fc2/kernel", axis=-1)
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
