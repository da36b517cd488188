"""Uniform quantization: codes against a numpy reference, error bounds, PTQ accuracy on MNIST."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jcompress import core, data, models, quant, train, tree
from jcompress.nnx import hooks


def reference_codes(w: np.ndarray, bits: int, symmetric: bool, axis, group_size):
    """Independent numpy reference: codes, per-element scale and zero point."""
    w = np.asarray(w, np.float64)
    axis = None if axis is None else axis % w.ndim
    if axis is None:
        mat = w.reshape(-1, 1)
    else:
        mat = np.moveaxis(w, axis, -1).reshape(-1, w.shape[axis])
    k, c = mat.shape
    g = k if group_size is None else group_size
    codes = np.zeros_like(mat, dtype=np.int64)
    scale_el = np.zeros_like(mat)
    zp_el = np.zeros_like(mat)
    for j in range(c):
        for start in range(0, k, g):
            v = mat[start : start + g, j]
            lo, hi = min(v.min(), 0.0), max(v.max(), 0.0)
            if symmetric:
                qmax = 2 ** (bits - 1) - 1
                s = max(-lo, hi) / qmax
                z = 0
                lim = (-qmax, qmax)
            else:
                qmax = 2**bits - 1
                s = (hi - lo) / qmax
                z = int(np.clip(np.round(-lo / s), 0, qmax)) if s > 0 else 0
                lim = (0, qmax)
            q = np.round(v / (s if s > 0 else 1.0)) + z
            codes[start : start + g, j] = np.clip(q, *lim)
            scale_el[start : start + g, j] = s
            zp_el[start : start + g, j] = z

    def back(a):
        if axis is None:
            return a.reshape(w.shape)
        moved = tuple(d for i, d in enumerate(w.shape) if i != axis) + (w.shape[axis],)
        return np.moveaxis(a.reshape(moved), -1, axis)

    return back(codes), back(scale_el), back(zp_el)


CASES = [
    dict(shape=(64, 32), axis=None, group_size=None),
    dict(shape=(64, 32), axis=-1, group_size=None),
    dict(shape=(64, 32), axis=0, group_size=None),
    dict(shape=(64, 32), axis=1, group_size=16),
    dict(shape=(3, 3, 8, 16), axis=-1, group_size=24),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 5])
def test_codes_match_numpy_reference(case, symmetric, bits):
    w = np.asarray(jax.random.normal(jax.random.key(bits), case["shape"]))
    qp = quant.quantize_leaf(w, bits=bits, symmetric=symmetric, axis=case["axis"], group_size=case["group_size"])
    codes, scale_el, zp_el = reference_codes(w, bits, symmetric, case["axis"], case["group_size"])
    assert qp.codes.dtype == jnp.int32 and qp.codes.shape == w.shape
    # float32 vs float64 may move a value sitting on a rounding boundary by one code.
    assert np.mean(np.asarray(qp.codes) != codes) < 1e-3
    assert np.max(np.abs(np.asarray(qp.codes) - codes)) <= 1
    deq = np.asarray(quant.dequantize(qp))
    np.testing.assert_allclose(deq, (codes - zp_el) * scale_el, atol=float(scale_el.max()) * 1.0001)
    qmin, qmax = quant.code_range(bits, symmetric)
    assert qp.codes.min() >= qmin and qp.codes.max() <= qmax
    assert qp.zero_point.shape == qp.scale.shape


def test_scale_layouts():
    w = jax.random.normal(jax.random.key(0), (3, 3, 8, 16))
    assert quant.quantize_leaf(w, bits=4, axis=None).scale.shape == ()
    assert quant.quantize_leaf(w, bits=4).scale.shape == (1, 1, 1, 16)
    assert quant.quantize_leaf(w, bits=4, axis=2).scale.shape == (1, 1, 8, 1)
    qp = quant.quantize_leaf(w, bits=4, axis=-1, group_size=24)
    assert qp.scale.shape == (3, 16) and qp.axis == 3
    # group 1 of output channel 5 covers flattened rows 24..47 of the (72, 16) matrix view.
    rows = np.asarray(w).reshape(72, 16)[24:48, 5]
    np.testing.assert_allclose(float(qp.scale[1, 5]), np.abs(rows).max() / 7, rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    layout=st.sampled_from([(None, None), (-1, None), (0, None), (-1, 4), (-1, 8)]),
    scale=st.floats(1e-3, 1e3),
)
def test_round_to_nearest_error_at_most_half_a_step(seed, bits, symmetric, layout, scale):
    axis, group_size = layout
    w = scale * jax.random.normal(jax.random.key(seed), (16, 6)) + (0.0 if symmetric else scale)
    qp = quant.quantize_leaf(w, bits=bits, symmetric=symmetric, axis=axis, group_size=group_size)
    step = quant.dequantize(
        quant.QuantParams(
            jnp.ones_like(qp.codes), qp.scale, jnp.zeros_like(qp.zero_point), bits, symmetric, qp.axis, group_size
        )
    )
    err = jnp.abs(quant.dequantize(qp) - w)
    assert bool(jnp.all(err <= step / 2 * (1 + 1e-5) + 1e-6 * scale))
    once = quant.fake_quant(w, bits=bits, symmetric=symmetric, axis=axis, group_size=group_size)
    twice = quant.fake_quant(once, bits=bits, symmetric=symmetric, axis=axis, group_size=group_size)
    np.testing.assert_allclose(np.asarray(twice), np.asarray(once), rtol=1e-6, atol=1e-6 * scale)


def test_stochastic_rounding_is_unbiased():
    w = jax.random.uniform(jax.random.key(1), (200,), minval=-1.0, maxval=1.0).at[0].set(1.0)
    keys = jax.random.split(jax.random.key(2), 4000)
    draws = jax.vmap(lambda k: quant.fake_quant(w, bits=3, axis=None, rounding="stochastic", key=k))(keys)
    step = 1.0 / 3  # max|w| = 1, qmax = 3
    mean = draws.mean(0)
    # per element: the sd of one draw is at most step / 2, so of the mean step / 2 / sqrt(4000)
    assert float(jnp.max(jnp.abs(mean - w))) < 5 * step / 2 / np.sqrt(4000)
    assert float(jnp.max(jnp.abs(draws - w))) < step * (1 + 1e-5)
    nearest = quant.fake_quant(w, bits=3, axis=None)
    assert float(jnp.mean(jnp.abs(nearest - w))) > 10 * float(jnp.mean(jnp.abs(mean - w)))
    # fixed key -> reproducible
    a = quant.quantize_leaf(w, bits=3, axis=None, rounding="stochastic", key=keys[0]).codes
    b = quant.quantize_leaf(w, bits=3, axis=None, rounding="stochastic", key=keys[0]).codes
    np.testing.assert_array_equal(a, b)


def test_zero_channels_and_exact_zeros():
    w = jax.random.normal(jax.random.key(0), (8, 4)).at[:, 2].set(0.0).at[3, 0].set(0.0)
    for symmetric in (True, False):
        qp = quant.quantize_leaf(w, bits=4, symmetric=symmetric, axis=-1)
        deq = quant.dequantize(qp)
        assert bool(jnp.all(jnp.isfinite(deq)))
        assert bool(jnp.all(qp.codes[:, 2] == qp.zero_point[0, 2]))
        assert float(deq[3, 0]) == 0.0 and bool(jnp.all(deq[:, 2] == 0.0))
    allzero = quant.fake_quant(jnp.zeros((5, 5)), bits=8, symmetric=False)
    assert bool(jnp.all(allzero == 0.0))


def test_asymmetric_positive_tensor_uses_full_range():
    w = jnp.linspace(0.0, 2.0, 256)
    qp = quant.quantize_leaf(w, bits=8, symmetric=False, axis=None)
    assert int(qp.zero_point) == 0 and int(qp.codes.max()) == 255
    np.testing.assert_allclose(float(qp.scale), 2.0 / 255, rtol=1e-6)


def test_sixteen_bits_and_one_bit_asymmetric():
    w = jax.random.normal(jax.random.key(3), (100,))
    err16 = jnp.abs(quant.fake_quant(w, bits=16, axis=None) - w).max()
    assert float(err16) <= float(jnp.abs(w).max()) / (2**15 - 1) / 2 * 1.0001
    qp1 = quant.quantize_leaf(w, bits=1, symmetric=False, axis=None)
    assert set(np.unique(np.asarray(qp1.codes))) <= {0, 1}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=0), "bits=0"),
        (dict(bits=17), "bits=17"),
        (dict(bits=1), "symmetric"),
        (dict(bits=4, axis=-1, group_size=5), "group_size=5"),
        (dict(bits=4, axis=None, group_size=4), "group_size needs"),
        (dict(bits=4, axis=2), "axis=2"),
        (dict(bits=4, rounding="up"), "rounding"),
        (dict(bits=4, rounding="stochastic"), "key"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quant.quantize_leaf(jnp.ones((8, 4)), **kwargs)


def test_bad_values():
    with pytest.raises(TypeError, match="dtype int32"):
        quant.quantize_leaf(jnp.ones((4, 4), jnp.int32), bits=8)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quant.quantize_leaf(jnp.ones((4, 4)).at[1, 1].set(jnp.nan), bits=8)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quant.quantize_leaf(jnp.ones((4, 4)).at[1, 1].set(jnp.inf), bits=8)
    with pytest.raises(ValueError, match="bits=40"):
        quant.quantize(bits=40)
    with pytest.raises(ValueError, match="bits=0"):
        quant.quantize(bits={"fc1": 8, ".*": 0})


def _mlp_params():
    model = models.create("mlp", input_shape=(64,), num_classes=10, widths=(32, 16))
    _, state = nnx.split(model, nnx.Param)
    return model, state, nnx.to_pure_dict(state)


@pytest.mark.parametrize("kw", [dict(bits=8, axis=-1), dict(bits=4, axis=-1, group_size=4, symmetric=False)])
def test_quantize_transform_dict_state_jit(kw):
    _, state, params = _mlp_params()
    before = jax.tree.map(np.array, params)
    t = quant.quantize(**kw)
    new, aux = t(params)
    assert isinstance(aux, core.GridAux)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, params), before)  # not mutated
    assert sorted(aux.grids) == ["fc1/kernel", "fc2/kernel", "fc3/kernel"]
    assert new["fc1"]["bias"] is params["fc1"]["bias"]
    for name, qp in aux.grids.items():
        w = tree.get_by_name(params, name)
        deq = quant.dequantize(qp)
        chex.assert_trees_all_close(tree.get_by_name(new, name), deq)
        want = float(jnp.sum((w - deq) ** 2) / jnp.sum(w**2))
        np.testing.assert_allclose(float(aux.errors[name]), want, rtol=1e-4)
        assert 0 < want < (0.01 if kw["bits"] == 8 else 0.1)
    new_s, _ = t(state)
    assert isinstance(new_s, nnx.State)
    chex.assert_trees_all_equal(nnx.to_pure_dict(new_s), new)
    new_j, aux_j = jax.jit(t)(params)
    chex.assert_trees_all_close(new_j, new, atol=1e-7)
    for name in aux.grids:
        np.testing.assert_array_equal(aux_j.grids[name].codes, aux.grids[name].codes)
        assert aux_j.grids[name].bits == kw["bits"]
    q_eager = quant.quantize_leaf(params["fc2"]["kernel"], **kw)
    q_jit = jax.jit(lambda w: quant.quantize_leaf(w, **kw))(params["fc2"]["kernel"])
    chex.assert_trees_all_close(q_jit, q_eager)


def test_quantize_per_leaf_bits_masked_and_leaf_errors():
    _, _, params = _mlp_params()
    new, aux = quant.quantize(bits={"fc3": 8, ".*": 4})(params)
    assert {n: g.bits for n, g in aux.grids.items()} == {"fc1/kernel": 4, "fc2/kernel": 4, "fc3/kernel": 8}
    new, aux = core.masked(quant.quantize(bits=8), r"fc1/")(params)
    assert sorted(aux.grids) == ["fc1/bias", "fc1/kernel"]
    assert new["fc2"]["kernel"] is params["fc2"]["kernel"]
    with pytest.raises(ValueError, match="match none of the leaves"):
        core.masked(quant.quantize(bits=8), "conv")(params)
    with pytest.raises(ValueError, match="fc3/kernel.*group_size=7"):
        core.masked(quant.quantize(bits=8, group_size=7), "fc3/kernel")(params)
    bad = {"a": {"kernel": jnp.ones((4, 4), jnp.int8)}}
    with pytest.raises(TypeError, match="a/kernel"):
        quant.quantize(bits=8)(bad)
    nan = {"a": {"kernel": jnp.ones((4, 4)).at[0, 0].set(jnp.nan)}}
    with pytest.raises(ValueError, match="NaN"):
        quant.quantize(bits=8)(nan)
    stochastic = quant.quantize(bits=4, rounding="stochastic")
    with pytest.raises(ValueError, match="key"):
        stochastic(params)
    k1, k2 = jax.random.split(jax.random.key(0))
    s1, _ = stochastic(params, key=k1)
    s2, _ = stochastic(params, key=k2)
    assert not np.array_equal(s1["fc1"]["kernel"], s2["fc1"]["kernel"])


# ---------------------------------------------------------------------------------------
# Post-training quantization of a trained LeNet-300-100 on mnist5k
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    ds = data.load("mnist5k")
    model = models.create("lenet300", input_shape=ds.input_shape, num_classes=10)
    fn = models.functional(model)
    res = train.fit(fn.apply, fn.params, fn.extra, ds, tx=optax.adam(1e-3), epochs=8, batch_size=128, progress=False)
    params = jax.tree.map(np.asarray, res.params)
    extra = jax.tree.map(np.asarray, res.extra)
    trained_model = models.merge(model, params, extra)
    acc = train.evaluate(fn.apply, params, extra, ds.x_test, ds.y_test)["accuracy"]
    return ds, trained_model, fn, params, extra, acc


def _evaluate(model, ds):
    fn = models.functional(model)
    return train.evaluate(fn.apply, fn.params, fn.extra, ds.x_test, ds.y_test)["accuracy"]


def test_calibration_ranges_match_manual_forward(trained):
    ds, model, _, params, _, _ = trained
    batches = [ds.x_train[:500], (ds.x_train[500:1000], ds.y_train[500:1000])]
    _, aux = quant.activations(batches, method="minmax")(model)
    ranges = aux.ranges
    assert isinstance(aux, core.ActRangeAux) and sorted(ranges) == ["fc1", "fc2", "fc3"]
    x = ds.x_train[:1000].reshape(1000, -1)
    h1 = np.maximum(x @ params["fc1"]["kernel"] + params["fc1"]["bias"], 0)
    h2 = np.maximum(h1 @ params["fc2"]["kernel"] + params["fc2"]["bias"], 0)
    for name, v in (("fc1", x), ("fc2", h1), ("fc3", h2)):
        np.testing.assert_allclose(ranges[name], (v.min(), v.max()), rtol=1e-5)
    pct = quant.calibrate_ranges(model, batches, method="percentile", percentile=99.0)
    np.testing.assert_allclose(pct["fc3"][1], np.percentile(h2, 99.0), rtol=1e-4)
    _, mse_aux = core.masked(quant.activations(batches, method="mse", bits=4), "fc3")(model)
    mse = mse_aux.ranges
    assert list(mse) == ["fc3"] and 0.0 < mse["fc3"][1] <= ranges["fc3"][1] * (1 + 1e-6)

    def mse_of(r):
        return float(np.mean((np.asarray(quant.fake_quant_range(jnp.asarray(h2), r, bits=4)) - h2) ** 2))

    assert mse_of(mse["fc3"]) <= mse_of(ranges["fc3"])
    # subsampling draws from key, and needs one
    with pytest.raises(ValueError, match="key"):
        quant.calibrate_ranges(model, batches, method="percentile", max_samples=100)
    sub = quant.calibrate_ranges(model, batches, method="percentile", max_samples=100, key=jax.random.key(0))
    assert sub["fc1"][0] >= ranges["fc1"][0] and sub["fc1"][1] <= ranges["fc1"][1]
    # calibrating after another transform sees its params: doubled weights double fc2's inputs
    doubled = core.Transform(lambda p, names, key: (jax.tree.map(lambda a: 2 * a, p), None), "double")
    _, chained = core.chain(doubled, quant.activations(batches))(model)
    np.testing.assert_allclose(chained[1].ranges["fc2"][1], 2 * ranges["fc2"][1], rtol=1e-5)
    with pytest.raises(ValueError, match="method"):
        quant.activations(batches, method="kl")


def test_activation_model_matches_manual_quantization(trained):
    ds, model, fn, params, extra, _ = trained
    x = ds.x_test[:64]
    w4, _ = quant.quantize(bits=4)(params)
    m4, _ = core.chain(quant.quantize(bits=4))(model)  # a params transform on a model, through chain
    f4 = models.functional(m4)
    np.testing.assert_allclose(f4.apply(f4.params, f4.extra, x)[0], fn.apply(w4, extra, x)[0], atol=1e-6)
    ranges = {"fc2": (0.0, 2.0)}
    hooked = hooks.with_hook(model, quant.input_quantizer(ranges, bits=2, symmetric=False))
    out = models.functional(hooked).apply(params, extra, x)[0]
    h1 = np.maximum(x.reshape(64, -1) @ params["fc1"]["kernel"] + params["fc1"]["bias"], 0)
    h1q = np.clip(np.round(h1 / (2.0 / 3)), 0, 3) * (2.0 / 3)
    h2 = np.maximum(h1q @ params["fc2"]["kernel"] + params["fc2"]["bias"], 0)
    ref = h2 @ params["fc3"]["kernel"] + params["fc3"]["bias"]
    np.testing.assert_allclose(out, ref, atol=1e-4)
    # the hooked model keeps its parameter names and survives jit
    chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(hooked, nnx.Param)), params)
    np.testing.assert_allclose(jax.jit(models.functional(hooked).apply)(params, extra, x)[0], ref, atol=1e-4)
    with pytest.raises(ValueError, match="fc9"):
        quant.check_act_ranges(model, {"fc9": (0, 1)}, 8, False)
    with pytest.raises(ValueError, match="act_ranges"):
        quant.check_act_ranges(model, {}, 8, False)


def test_ptq_accuracy_int8_and_int4(trained):
    ds, model, _, _, _, acc_float = trained
    assert acc_float > 0.9
    batches = [ds.x_train[i : i + 500] for i in range(0, 2000, 500)]
    key = jax.random.key(0)
    for method in ("minmax", "percentile", "mse"):
        q8, _ = core.chain(quant.quantize(bits=8, axis=None), quant.activations(batches, method=method))(model, key=key)
        acc8 = _evaluate(q8, ds)
        assert acc8 >= acc_float - 0.01, (method, acc8, acc_float)
    q4, _ = core.chain(quant.quantize(bits=4), quant.activations(batches, bits=8))(model)
    acc4 = _evaluate(q4, ds)
    assert acc4 >= acc_float - 0.03, (acc4, acc_float)
    q2, _ = core.chain(quant.quantize(bits=2, axis=None))(model)
    acc2 = _evaluate(q2, ds)
    assert acc2 < acc4  # the measurement can see a real loss


def test_conv_layers_are_calibrated():
    model = models.create("lenet5", input_shape=(16, 16, 1), num_classes=10)
    x = jax.random.uniform(jax.random.key(0), (4, 16, 16, 1))
    qmodel, aux = core.chain(quant.quantize(bits=8), quant.activations([x]))(model)
    ranges = aux[1].ranges
    assert sorted(ranges) == ["conv1", "conv2", "fc1", "fc2"]
    np.testing.assert_allclose(ranges["conv1"], (float(x.min()), float(x.max())))
    fn, qfn = models.functional(model), models.functional(qmodel)
    out, _ = jax.jit(qfn.apply)(qfn.params, qfn.extra, x)
    ref, _ = fn.apply(fn.params, fn.extra, x)
    assert 0 < float(jnp.max(jnp.abs(out - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))
