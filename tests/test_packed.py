"""Packed low-bit Dense layers: exact storage round trips, outputs equal the dequantized
model's, real device bytes, and the decoder LM packed end to end."""

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


def test_masked_pack_and_bad_input():
    model = _mlp()
    _, aux = jc.quant.quantize(bits=4)(nnx.state(model, nnx.Param))
    small, paux = jc.masked(packed.pack(aux), "fc2")(model)
    assert list(paux.grids) == ["fc2/kernel"]
    assert isinstance(small.fc2, packed.PackedLinear) and isinstance(small.fc1, nnx.Linear)
    other = models.create("mlp", input_shape=(8, 8, 1), num_classes=10, widths=(48, 32), seed=0)
    with pytest.raises(ValueError, match="grid of 'fc1/kernel' has shape"):
        packed.pack(aux)(other)
    with pytest.raises(ValueError, match="not the kernel of an nnx.Linear"):
        packed.pack({"head/kernel": aux.grids["fc1/kernel"]})(model)
    with pytest.raises(TypeError, match="GridAux"):
        packed.pack({"fc1/kernel": np.zeros((64, 32))})
    wide = quantize_leaf(model.fc1.kernel.get_value(), bits=12, axis=-1)
    with pytest.raises(ValueError, match="2 to 8 bits"):
        packed.pack({"fc1/kernel": wide})(model)


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
