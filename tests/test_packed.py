"""Packed low-bit Dense and conv layers: exact storage round trips, outputs equal the
dequantized model's, real device bytes, and the decoder LM packed end to end."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jcompress as jc
from jcompress import models
from jcompress.core.grid import quantize_leaf
from jcompress.models import llama
from jcompress.nnx import hooks, packed


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


def _w8a8_layer(act, *, axis=-1, bias=True):
    from jcompress.oneshot.smoothquant import ActQuant

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(48, 24)) / 7, jnp.float32)
    qp = quantize_leaf(w, bits=8, axis=axis)
    b = jnp.asarray(rng.normal(size=(24,)), jnp.float32) if bias else None
    return qp, b, packed.PackedLinear(qp, b, act=ActQuant(*act))


@pytest.mark.parametrize(
    "act, axis", [((8, True, 0.0), -1), ((8, False, 2.5), -1), ((8, True, 0.0), None), ((6, False, 4.0), -1)]
)
def test_integer_w8a8_equals_the_float_path_on_the_fake_quantized_input(act, axis):
    """Per token / per tensor (clipping at absmax) inputs, per column / per tensor weights, one zero row."""
    from jcompress.oneshot.smoothquant import fake_quant_input

    qp, b, layer = _w8a8_layer(act, axis=axis)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5, 48)) * 2, jnp.float32).at[0, 0].set(0.0)
    codes, scale = packed.quantize_input(x, bits=act[0], per_token=act[1], absmax=act[2])
    assert codes.dtype == jnp.int8
    fq = fake_quant_input(x, bits=act[0], per_token=act[1], absmax=act[2])
    np.testing.assert_array_equal(codes.astype(jnp.float32) * scale, fq)  # the very grid of the hook
    y = _jit_forward(layer, x)
    assert y.shape == (3, 5, 24) and y.dtype == jnp.float32
    w = qp.dequantize()
    y_float = jax.jit(lambda v: jnp.dot(v, w) + b)(fq)
    # exact in float64: the int32 sums are exact, so the integer path is off by a few float32 roundings
    exact = np.asarray(fq, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
    magnitude = np.abs(np.asarray(fq, np.float64)) @ np.abs(np.asarray(w, np.float64)) + np.abs(np.asarray(b))
    eps = np.finfo(np.float32).eps
    assert np.all(np.abs(np.asarray(y, np.float64) - exact) <= 4 * eps * magnitude)
    # the float path's error is bounded by its 48-term sums: the two agree to that bound
    assert np.all(np.abs(np.asarray(y - y_float, np.float64)) <= (48 + 4) * eps * magnitude)


def _integer_dots(hlo: str) -> list[str]:
    """The dot instructions of compiled HLO text whose operands are s8 and whose result is s32."""
    found = []
    for block in hlo.split("\n\n"):
        types = dict(re.findall(r"(%[\w.\-]+) = (\w+)\[", block))
        for line in block.splitlines():
            m = re.search(r"= s32\[[\d,]*\]\S* dot\((%[\w.\-]+), (%[\w.\-]+)\)", line)
            if m and types.get(m.group(1)) == "s8" and types.get(m.group(2)) == "s8":
                found.append(line.strip())
    return found


def test_integer_w8a8_compiles_to_an_s8_dot_with_s32_result():
    _, _, layer = _w8a8_layer((8, True, 0.0))
    graphdef, state = nnx.split(layer)
    f = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))
    x = jnp.ones((4, 48))
    lowered = f.lower(state, x)
    assert re.search(r"dot_general .*\(tensor<4x48xi8>, tensor<48x24xi8>\) -> tensor<4x24xi32>", lowered.as_text())
    if jax.default_backend() != "cpu":
        return  # other backends may compile the dot to a library call (cuBLAS int8 GEMM)
    assert len(_integer_dots(lowered.compile().as_text())) == 1  # XLA:CPU keeps s8 x s8 -> s32
    # the default (float) path has no integer dot
    float_layer = packed.PackedLinear(quantize_leaf(jnp.ones((48, 24)), bits=8), None)
    g2, s2 = nnx.split(float_layer)
    assert _integer_dots(jax.jit(lambda s, v: nnx.merge(g2, s)(v)).lower(s2, x).compile().as_text()) == []


class _NormMLP(nnx.Module):
    """LayerNorm -> Dense -> relu -> Dense, the norm folding SmoothQuant's scales of fc1."""

    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(16, rngs=rngs)
        self.fc1 = nnx.Linear(16, 32, rngs=rngs)
        self.fc2 = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(self.norm(x))))


@pytest.mark.parametrize("act_scale", ["token", "tensor"])
def test_smoothquant_mlp_packed_in_integers_equals_the_hooked_fake_quant_model(act_scale):
    from jcompress.oneshot.smoothquant import act_quantizer

    model = _NormMLP(nnx.Rngs(0))
    model.norm.scale.set_value(model.norm.scale.get_value().at[:2].set(25.0))  # two outlier channels
    x = jax.random.normal(jax.random.key(1), (40, 16))
    h1 = model.norm(x)
    h2 = jax.nn.relu(model.fc1(h1))
    channels = {f"fc{i}/kernel": jc.oneshot.ChannelStats(jnp.abs(h).mean(0), jnp.abs(h).max(0)) for i, h in ((1, h1), (2, h2))}
    stats = jc.oneshot.calibrate(model, x)
    sq = jc.oneshot.smoothquant(stats, channels, groups=[("norm", ("fc1",))], alpha=0.5, act_scale=act_scale)
    w8_params, aux = sq(nnx.state(model, nnx.Param))
    w8 = models.merge(model, jc.to_pure_dict(w8_params))
    hooked = hooks.with_hook(w8, act_quantizer(aux.act))
    int8_model, paux = packed.pack(aux, act=aux.act)(w8)
    assert sorted(paux.grids) == ["fc1/kernel", "fc2/kernel"]
    assert int8_model.fc1.act_bits == 8 and int8_model.fc2.act_per_token == (act_scale == "token")
    assert packed.pack(aux)(w8)[0].fc1.act_bits is None  # default: the float path
    want = _jit_forward(hooked, x)
    got = _jit_forward(int8_model, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))
    # the inputs' quantization matters at that tolerance: the unhooked model is farther off
    assert float(jnp.max(jnp.abs(_jit_forward(w8, x) - want))) > 1e-3 * float(jnp.max(jnp.abs(want)))


def test_integer_path_refuses_grids_it_cannot_take():
    from jcompress.oneshot.smoothquant import ActQuant

    model = _mlp()
    kernel = model.fc1.kernel.get_value()
    act = {"fc1": ActQuant(8, True, 0.0)}
    for kw, why in (
        ({"bits": 4}, "weight grid of 4 bits"),
        ({"bits": 8, "group_size": 16}, "weight grid with group_size=16"),
        ({"bits": 8, "symmetric": False}, "asymmetric weight grid"),
        ({"bits": 8, "axis": 0}, "weight grid with axis=0"),
    ):
        with pytest.raises(ValueError, match=f"layer 'fc1': {why}"):
            packed.pack({"fc1/kernel": quantize_leaf(kernel, **kw)}, act=act)(model)
    grids = {"fc1/kernel": quantize_leaf(kernel, bits=8)}
    with pytest.raises(ValueError, match=r"act names layers \['head'\] that have no grid"):
        packed.pack(grids, act={"head": ActQuant(8, True, 0.0)})
    with pytest.raises(ValueError, match="layer 'fc1': act bits=16"):
        packed.pack(grids, act={"fc1": ActQuant(16, True, 0.0)})(model)
    with pytest.raises(TypeError, match="act must be"):
        packed.pack(grids, act=[ActQuant(8, True, 0.0)])
    cnn = nnx.Module()
    cnn.conv2 = nnx.Conv(2, 3, (3,), rngs=nnx.Rngs(0))
    grid = {"conv2/kernel": quantize_leaf(cnn.conv2.kernel.get_value(), bits=8)}
    with pytest.raises(ValueError, match="layer 'conv2': act: the integer path is for Dense layers"):
        packed.pack(grid, act={"conv2": ActQuant(8, True, 0.0)})(cnn)
