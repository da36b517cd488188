"""Packed low-bit Dense and conv layers: exact storage round trips, outputs equal the
dequantized model's, real device bytes, and the decoder LM packed end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jcompress as jc
from jcompress import models
from jcompress.core.grid import quantize_leaf
from jcompress.models import llama
from jcompress.nnx import packed


def test_codes_round_trip_exactly():
    for bits, symmetric, rows in [
        (2, True, 7),
        (3, False, 6),
        (4, True, 6),
        (4, False, 7),
        (5, True, 7),
        (8, False, 6),
    ]:
        lo, hi = (-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
        every = np.arange(lo, hi + 1)
        codes = jnp.asarray(np.resize(every, (max(rows, -(-every.size // 5)), 5))[:rows], jnp.int32)
        codes = codes.at[0, 0].set(lo).at[-1, -1].set(hi)  # both extremes, in the first and last rows
        stored = packed.pack_codes(codes, bits=bits, symmetric=symmetric)
        expected_rows = (rows + 1) // 2 if bits <= 4 else rows
        assert stored.shape == (expected_rows, 5) and stored.dtype.itemsize == 1
        np.testing.assert_array_equal(packed.unpack_codes(stored, rows=rows, bits=bits, symmetric=symmetric), codes)


def _jit_forward(model, x):
    graphdef, state = nnx.split(model)
    out = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))(state, x)
    return out[0] if isinstance(out, tuple) else out


def _mlp():
    return models.create("mlp", input_shape=(8, 8, 1), num_classes=10, widths=(64, 32), seed=0)


@pytest.mark.parametrize(
    "kw", [{"bits": 8}, {"bits": 4, "group_size": 16}, {"bits": 3, "symmetric": False, "group_size": 32}]
)
def test_packed_mlp_equals_the_dequantized_model(kw):
    model = _mlp()
    q_params, aux = jc.quant.quantize(**kw)(nnx.state(model, nnx.Param))
    small, paux = packed.pack(aux)(model)
    assert set(paux.grids) == {"fc1/kernel", "fc2/kernel", "fc3/kernel"}
    assert all(isinstance(small.__getattribute__(n), packed.PackedLinear) for n in ("fc1", "fc2", "fc3"))
    assert not any(n.endswith("kernel") for n, _ in jc.named_leaves(nnx.state(small, nnx.Param)))
    x = jax.random.uniform(jax.random.key(1), (5, 8, 8, 1))
    want = _jit_forward(models.merge(model, jc.to_pure_dict(q_params)), x)
    np.testing.assert_allclose(_jit_forward(small, x), want, rtol=1e-5, atol=1e-5)
    # the input model is untouched
    assert isinstance(model.fc1, nnx.Linear)


def test_device_bytes_shrink_by_the_bit_width():
    model = models.create("mlp", input_shape=(256,), num_classes=256, widths=(512,), seed=0)
    dense = packed.device_bytes(model)
    kernels = 4 * (256 * 512 + 512 * 256)
    biases = 4 * (512 + 256)
    assert dense == {"params": kernels + biases, "packed": 0, "other": 0, "total": kernels + biases}
    for bits, per_weight in ((8, 1), (4, 0.5)):
        _, aux = jc.quant.quantize(bits=bits, group_size=128)(nnx.state(model, nnx.Param))
        small, _ = packed.pack(aux)(model)
        b = packed.device_bytes(small)
        scales = 4 * (256 // 128 * 512 + 512 // 128 * 256)  # one float32 per group; symmetric: no zero points
        assert b["packed"] == int(per_weight * (256 * 512 + 512 * 256)) + scales
        assert b["params"] == biases
        assert kernels / b["packed"] > {8: 3.8, 4: 7.5}[bits]  # 4x and 8x, less the scales
    _, aux = jc.quant.quantize(bits=4, group_size=128, symmetric=False)(nnx.state(model, nnx.Param))
    b = packed.device_bytes(packed.pack(aux)(model)[0])
    assert b["packed"] == (256 * 512 + 512 * 256) // 2 + 5 * (2 * 512 + 4 * 256)  # + a uint8 zero point per group


def test_packed_cnn_equals_the_dequantized_model():
    """1-D convs, stride 2, explicit padding; asymmetric 3-bit codes in groups of 5 rows."""
    model = models.create("cnn1d", input_shape=(40,), num_classes=10, channels=(8, 8, 8), seed=0)
    quantize = jc.masked(jc.quant.quantize(bits=3, symmetric=False, group_size=5), "conv.*/kernel")
    q_params, aux = quantize(nnx.state(model, nnx.Param))
    small, paux = packed.pack(aux)(model)
    assert sorted(paux.grids) == ["conv1/kernel", "conv2/kernel", "conv3/kernel"]
    assert all(isinstance(getattr(small, f"conv{i}"), packed.PackedConv) for i in (1, 2, 3))
    assert isinstance(small.fc, nnx.Linear) and small.conv2.zero_point.get_value().dtype == jnp.uint8
    left = {n for n, _ in jc.named_leaves(nnx.state(small, nnx.Param)) if n.endswith("kernel")}
    assert left == {"fc/kernel"}
    x = jax.random.uniform(jax.random.key(1), (3, 40))
    want = _jit_forward(models.merge(model, jc.to_pure_dict(q_params)), x)
    np.testing.assert_allclose(_jit_forward(small, x), want, rtol=1e-5, atol=1e-6)


def test_packed_lenet5_logits_and_device_bytes_by_hand():
    model = models.create("lenet5", input_shape=(16, 16, 1), num_classes=10, channels=(6, 8), hidden=16, seed=0)
    q_params, aux = jc.masked(jc.quant.quantize(bits=4), "conv.*/kernel")(nnx.state(model, nnx.Param))
    small, _ = packed.pack(aux)(model)
    assert isinstance(small.conv1, packed.PackedConv) and isinstance(small.fc1, nnx.Linear)
    # the logits of LeNet-5 (VALID convs with biases, an odd 25-row conv1) equal the dequantized model's
    images = jax.random.uniform(jax.random.key(1), (3, 16, 16, 1))
    want = _jit_forward(models.merge(model, jc.to_pure_dict(q_params)), images)
    np.testing.assert_allclose(_jit_forward(small, images), want, rtol=1e-5, atol=1e-6)
    # conv1 (5, 5, 1, 6): 25 rows -> 13 bytes per column; conv2 (5, 5, 6, 8): 150 rows -> 75 bytes
    codes = 13 * 6 + 75 * 8
    scales = 4 * (6 + 8)  # one float32 per output channel; symmetric: no zero points
    assert small.conv1.codes.get_value().shape == (13, 6) and small.conv2.codes.get_value().shape == (75, 8)
    b = packed.device_bytes(small)
    assert b["packed"] == codes + scales
    assert b["packed"] == sum(
        a.nbytes for layer in (small.conv1, small.conv2) for a in (layer.codes.get_value(), layer.scale.get_value())
    )
    fc = 4 * (8 * 16 + 16 + 16 * 10 + 10)  # the Dense layers stay float32
    assert b["params"] == 4 * (6 + 8) + fc  # conv biases stay float32 too
    # a conv layer on its own, with one batch axis too many and none: as nnx.Conv does
    x = jax.random.uniform(jax.random.key(0), (2, 3, 16, 16, 1))
    reference = nnx.Conv(1, 6, (5, 5), padding="VALID", rngs=nnx.Rngs(0))
    reference.kernel.set_value(aux.grids["conv1/kernel"].dequantize())
    reference.bias.set_value(model.conv1.bias.get_value())
    np.testing.assert_allclose(small.conv1(x), reference(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(small.conv1(x[0, 0]), reference(x[0, 0]), rtol=1e-6, atol=1e-6)


def test_packed_conv_keeps_the_conv_settings():
    """SAME padding, stride 2, dilation, two feature groups, no bias; int8 per tensor, under jit."""
    conv = nnx.Conv(4, 6, (3, 3), strides=2, padding="SAME", kernel_dilation=(1, 2), feature_group_count=2,
                    use_bias=False, rngs=nnx.Rngs(0))  # fmt: skip
    qp = quantize_leaf(conv.kernel.get_value(), bits=8, axis=None)
    layer = packed.PackedConv(qp, conv)
    conv.kernel.set_value(qp.dequantize())
    x = jax.random.uniform(jax.random.key(0), (2, 9, 9, 4))
    assert layer.codes.get_value().shape == (3 * 3 * 2, 6) and layer.codes.get_value().dtype == jnp.int8
    assert layer.bias is None and layer.scale.get_value().shape == ()
    np.testing.assert_allclose(_jit_forward(layer, x), _jit_forward(conv, x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="conv kernel's"):
        packed.PackedConv(quantize_leaf(jnp.ones((4, 6)), bits=8), conv)


def test_masked_pack_and_bad_input():
    model = _mlp()
    _, aux = jc.quant.quantize(bits=4)(nnx.state(model, nnx.Param))
    small, paux = jc.masked(packed.pack(aux), "fc2")(model)
    assert list(paux.grids) == ["fc2/kernel"]
    assert isinstance(small.fc2, packed.PackedLinear) and isinstance(small.fc1, nnx.Linear)
    other = models.create("mlp", input_shape=(8, 8, 1), num_classes=10, widths=(48, 32), seed=0)
    with pytest.raises(ValueError, match="grid of 'fc1/kernel' has shape"):
        packed.pack(aux)(other)
    with pytest.raises(ValueError, match="not the kernel of an nnx.Linear or nnx.Conv"):
        packed.pack({"head/kernel": aux.grids["fc1/kernel"]})(model)
    with pytest.raises(TypeError, match="GridAux"):
        packed.pack({"fc1/kernel": np.zeros((64, 32))})
    wide = quantize_leaf(model.fc1.kernel.get_value(), bits=12, axis=-1)
    with pytest.raises(ValueError, match="2 to 8 bits"):
        packed.pack({"fc1/kernel": wide})(model)
    causal = models.create("cnn1d", input_shape=(40,), num_classes=10, channels=(4, 4, 4), seed=0)
    causal.conv2.padding = "CAUSAL"
    grid = quantize_leaf(causal.conv2.kernel.get_value(), bits=4)
    with pytest.raises(ValueError, match="layer 'conv2'.*padding='CAUSAL' is not supported"):
        packed.pack({"conv2/kernel": grid})(causal)


def test_packed_llama_decodes_like_the_dequantized_one():
    cfg = llama.LlamaConfig(
        vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64
    )
    model = llama.Llama(cfg, rngs=nnx.Rngs(0))
    q_params, aux = jc.masked(jc.quant.quantize(bits=4, group_size=16), "layers/.*kernel")(nnx.state(model, nnx.Param))
    small, paux = packed.pack(aux)(model)
    assert len(paux.grids) == 2 * 7
    reference = nnx.clone(model)
    nnx.update(reference, q_params)
    tokens = jnp.array([[1, 5, 9, 2, 7]])
    np.testing.assert_allclose(_jit_forward(small, tokens), _jit_forward(reference, tokens), rtol=2e-5, atol=2e-5)
    b, d = packed.device_bytes(small), packed.device_bytes(model)
    assert b["total"] < d["total"]
