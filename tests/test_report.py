"""jcompress.report: device bytes apart from file bytes (packed codes counted, by hand),
sparse kernels labelled with their pattern and reported as running dense."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jcompress as jc
from jcompress import compressed, export, models, report
from jcompress.nnx import packed

# fc1 (64, 128), fc2 (128, 32): small enough to build and pack in well under a second
IN, HIDDEN, OUT = 64, 128, 32


def _mlp():
    return models.create("mlp", input_shape=(IN,), num_classes=OUT, widths=(HIDDEN,), seed=0)


def test_packed_int4_device_bytes_by_hand_apart_from_the_file(tmp_path):
    model = _mlp()
    params = nnx.state(model, nnx.Param)
    q, aux = jc.quant.quantize(bits=4, group_size=32)(params)
    small, _ = packed.pack(aux)(model)
    path = tmp_path / "m.jcz"
    file_bytes = export.write(path, compressed.compress(q, aux))

    dense = report.param_report(model)
    r = report.param_report(small, file_bytes=file_bytes)
    kernels = {"fc1/kernel": (IN, HIDDEN), "fc2/kernel": (HIDDEN, OUT)}
    biases = 4 * (HIDDEN + OUT)
    rows = {row["name"]: row for row in r["layers"]}
    assert set(rows) == {"fc1/bias", "fc1/kernel", "fc2/bias", "fc2/kernel"}
    for name, (k, n) in kernels.items():
        # two int4 codes per byte, one float32 scale per group of 32 inputs; symmetric: no zero points
        assert rows[name]["device_bytes"] == k * n // 2 + 4 * (k // 32) * n
        assert rows[name]["runtime"] == "packed int4" and rows[name]["shape"] == [k, n]
        # int4 rounds small weights to the code 0: those zeros are counted, and run dense too
        w = np.asarray(aux.grids[name].dequantize())
        assert rows[name]["params"] == k * n and rows[name]["nonzeros"] == np.count_nonzero(w)
        assert rows[name]["sparsity_pattern"] == report.sparsity_pattern(w)
        float32 = 4 * k * n
        assert {r0["name"]: r0 for r0 in dense["layers"]}[name]["device_bytes"] == float32
        # 1/8 of float32, plus the scales: 4 bytes per 32 weights, 1/32 of float32
        assert rows[name]["device_bytes"] == float32 / 8 + float32 / 32
    codes_and_scales = sum(k * n // 2 + 4 * (k // 32) * n for k, n in kernels.values())
    assert r["total"]["device_bytes"] == codes_and_scales + biases
    assert r["total"]["device_bytes"] == packed.device_bytes(small)["total"] == report.device_nbytes(small)
    assert report.device_nbytes(model) == report.device_nbytes(params) == dense["total"]["device_bytes"]
    assert dense["total"]["device_bytes"] == 4 * sum(k * n for k, n in kernels.values()) + biases
    assert r["total"]["file_bytes"] == file_bytes == path.stat().st_size != r["total"]["device_bytes"]
    assert dense["total"]["file_bytes"] is None
    with pytest.raises(ValueError, match=r"layers \['fc1', 'fc2'\] are packed; pass the model before"):
        report.layer_flops(small, (IN,))
    table = report.format_table(r)
    assert f"device bytes: {codes_and_scales + biases} " in table and f"file: {file_bytes} bytes on disk" in table
    assert table.count("packed int4") == 2
    # the report of the dequantized model is unchanged by packing: same counts, same nonzeros
    fake = report.param_report(models.merge(model, jc.to_pure_dict(q)))
    counts = lambda rep: sorted((x["name"], x["params"], x["nonzeros"]) for x in rep["layers"])
    assert counts(fake) == counts(r)


def test_sparsity_patterns():
    two_four = np.array([[1.0, 0], [0, 2], [3, 0], [0, 4], [0, 5], [6, 0], [0, 0], [7, 8]])  # (8, 2)
    assert report.sparsity_pattern(two_four) == "2:4"
    assert report.sparsity_pattern(two_four * np.array([[1], [0], [1], [1], [1], [1], [1], [1]])) == "2:4"
    one_four = np.zeros((8, 3))
    one_four[::4] = 1.0
    assert report.sparsity_pattern(one_four) == "1:4"
    four_eight = np.array([[1.0], [1], [1], [0], [0], [0], [0], [1]])  # 3 of the first 4: not 2:4
    assert report.sparsity_pattern(four_eight) == "4:8"
    assert report.sparsity_pattern(np.array([[1.0], [1], [1], [0], [0], [0], [1], [1]])) == "unstructured"
    assert report.sparsity_pattern(np.array([[0.0, 1], [1, 1], [1, 1]])) == "unstructured"  # 3 rows: no groups
    # a conv kernel (kh, kw, cin, cout): the groups run along cin
    conv = np.ones((3, 3, 4, 2))
    conv[:, :, 1::2] = 0
    assert report.sparsity_pattern(conv) == "2:4"
    assert report.sparsity_pattern(np.moveaxis(conv, 2, 3)) == "unstructured"
    assert report.sparsity_pattern(np.zeros(8)) is None  # a zero bias is not a sparse kernel
    assert report.sparsity_pattern(np.ones((4, 4))) is None


def test_sparse_weights_are_reported_dense():
    model = _mlp()
    params = nnx.state(model, nnx.Param)
    nm, _ = jc.masked(jc.pruning.magnitude(pattern=jc.NM(2, 4)), "fc1/kernel")(params)
    both, _ = jc.masked(jc.pruning.magnitude(sparsity=0.5), "fc2/kernel")(nm)
    flops = report.layer_flops(model, (IN,))
    r = report.param_report(both, flops=flops)
    dense = report.param_report(params, flops=flops)
    rows = {row["name"]: row for row in r["layers"]}
    assert rows["fc1/kernel"]["sparsity_pattern"] == "2:4"
    assert rows["fc2/kernel"]["sparsity_pattern"] == "unstructured"
    assert rows["fc1/bias"]["sparsity_pattern"] is None  # zero-initialised biases are not sparse kernels
    backend = jax.default_backend()
    for name, k, n in (("fc1/kernel", IN, HIDDEN), ("fc2/kernel", HIDDEN, OUT)):
        row = rows[name]
        assert row["sparse_runtime"] == (
            f"none on this backend ({backend}): device bytes are dense bytes, the matmul runs dense"
        )
        assert row["device_bytes"] == 4 * k * n  # dense bytes, not nonzeros
        assert row["nonzeros"] == k * n // 2 and row["flops"] == 2 * k * n  # real FLOPs stay dense
        assert row["flops_if_sparse"] == k * n  # the potential figure, labelled as such
    assert r["total"]["device_bytes"] == dense["total"]["device_bytes"]
    assert r["total"]["flops"] == dense["total"]["flops"]
    assert r["total"]["sparse_runtime"].startswith(f"none on this backend ({backend})")
    assert any("2:4, unstructured in 2 kernels" in note for note in r["notes"])
    assert "sparse weights: sparse_runtime: none on this backend" in report.format_table(r)
    assert dense["total"]["sparse_runtime"] is None
    assert all(row["sparse_runtime"] is None for row in dense["layers"])
    # packing keeps the zeros as codes: the packed 2:4 kernel is still a dense matmul
    _, aux = jc.masked(jc.quant.quantize(bits=8), "fc1/kernel")(both)
    small, _ = packed.pack(aux)(models.merge(model, jc.to_pure_dict(both)))
    row = {x["name"]: x for x in report.param_report(small)["layers"]}["fc1/kernel"]
    assert row["runtime"] == "packed int8" and row["sparsity_pattern"] == "2:4"
    assert row["device_bytes"] == IN * HIDDEN + 4 * HIDDEN and row["sparse_runtime"].startswith("none")


def test_device_bytes_count_every_device_copy():
    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip("needs several devices (tests/conftest.py forces 8 CPU devices)")
    mesh = jax.make_mesh((len(devices),), ("x",))
    w = jnp.ones((8 * len(devices), 4), jnp.float32)
    sharded = jax.device_put(w, NamedSharding(mesh, P("x")))
    replicated = jax.device_put(w, NamedSharding(mesh, P()))
    r = report.param_report({"a": {"kernel": sharded}, "b": {"kernel": replicated}, "c": np.asarray(w)})
    rows = {row["name"]: row["device_bytes"] for row in r["layers"]}
    assert rows == {"a/kernel": w.nbytes, "b/kernel": len(devices) * w.nbytes, "c": w.nbytes}
    assert r["total"]["device_bytes"] == (len(devices) + 2) * w.nbytes
    assert r["total"]["bytes"] == 3 * w.nbytes  # one copy of each array
