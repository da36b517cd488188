"""Quantization-aware training: straight-through gradients, forward parity with PTQ, QAT beats PTQ."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jcompress import data, models, qat, quant, train
from jcompress.nnx import hooks


def test_ste_value_and_gradient():
    w = jax.random.normal(jax.random.key(0), (32, 8))
    c = jax.random.normal(jax.random.key(1), (32, 8))
    kw = dict(bits=3, axis=-1)
    q = quant.fake_quant(w, **kw)
    np.testing.assert_allclose(qat.ste_fake_quant(w, **kw), q, atol=1e-6)  # w + (q - w) == q up to an ulp

    def loss(v):
        return jnp.sum(jnp.sin(v) * c)

    g_ste = jax.grad(lambda w: loss(qat.ste_fake_quant(w, **kw)))(w)
    g_float_at_q = jax.grad(loss)(q)
    np.testing.assert_allclose(g_ste, g_float_at_q, atol=1e-6)
    # without the STE, gradients reach only the element that sets each channel's scale
    g_plain = jax.grad(lambda w: loss(quant.fake_quant(w, **kw)))(w)
    assert int(jnp.sum(g_plain != 0)) <= w.shape[1]
    g_jit = jax.jit(jax.grad(lambda w: loss(qat.ste_fake_quant(w, **kw))))(w)
    np.testing.assert_allclose(g_jit, g_ste, atol=1e-6)
    x = jnp.linspace(-1.0, 3.0, 50)
    r = (0.0, 2.0)
    np.testing.assert_allclose(qat.ste_fake_quant_range(x, r, bits=4), quant.fake_quant_range(x, r, bits=4), atol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda x: qat.ste_fake_quant_range(x, r, bits=4).sum())(x), jnp.ones(50))


def test_qat_params_on_dict_and_state():
    model = models.create("mlp", input_shape=(64,), num_classes=10, widths=(32, 16))
    _, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    before = jax.tree.map(np.array, params)
    out = qat.qat_params(params, bits=4, axis=-1)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, params), before)
    ref, _ = quant.quantize(bits=4, axis=-1)(params)
    chex.assert_trees_all_close(out, ref, atol=1e-6)
    assert out["fc1"]["bias"] is params["fc1"]["bias"]
    out_s = qat.qat_params(state, bits=4, axis=-1)
    assert isinstance(out_s, nnx.State)
    chex.assert_trees_all_equal(nnx.to_pure_dict(out_s), out)
    chex.assert_trees_all_close(jax.jit(lambda p: qat.qat_params(p, bits=4, axis=-1))(params), out, atol=1e-6)
    with pytest.raises(ValueError, match="fc3/kernel.*group_size=3"):
        qat.qat_params(params, bits=4, axis=-1, group_size=3, names=["fc3/kernel"])
    only = qat.qat_params(params, bits=4, names=["fc1/kernel"])
    assert only["fc2"]["kernel"] is params["fc2"]["kernel"]


def ptq_apply(model, *, bits, axis=-1, act_bits=None, act_ranges=None):
    """Evaluation with round-to-nearest weights and (optionally) inputs quantized on calibrated ranges."""
    if act_bits is not None:
        model = hooks.with_hook(model, quant.input_quantizer(act_ranges, bits=act_bits, symmetric=False))
    weights = quant.quantize(bits=bits, axis=axis)
    apply_fn = models.functional(model).apply
    return lambda params, extra, x, **kw: apply_fn(weights(params)[0], extra, x, **kw)


def qat_apply(model, *, bits, axis=-1, act_bits=None, act_ranges=None):
    """Training through weight (and input) quantizers: qat_apply on the model of quantize_inputs."""
    if act_bits is not None:
        model = qat.quantize_inputs(model, act_ranges, bits=act_bits)
    return qat.qat_apply(models.functional(model).apply, bits=bits, axis=axis)


@pytest.fixture(scope="module")
def trained():
    ds = data.load("mnist5k")
    model = models.create("lenet300", input_shape=ds.input_shape, num_classes=10)
    fn = models.functional(model)
    res = train.fit(fn.apply, fn.params, fn.extra, ds, tx=optax.adam(1e-3), epochs=8, batch_size=128, progress=False)
    params = jax.tree.map(np.asarray, res.params)
    extra = jax.tree.map(np.asarray, res.extra)
    ranges = quant.calibrate_ranges(models.merge(model, params, extra), [ds.x_train[:1000]])
    return ds, model, fn, params, extra, ranges


def test_qat_forward_equals_the_ptq_forward(trained):
    ds, model, fn, params, extra, ranges = trained
    x = ds.x_test[:100]
    kw = dict(bits=4, axis=-1, act_bits=4, act_ranges=ranges)
    out_qat, _ = qat_apply(model, **kw)(params, extra, x)
    out_ptq, _ = ptq_apply(model, **kw)(params, extra, x)
    np.testing.assert_allclose(out_qat, out_ptq, atol=1e-5)
    w_only, _ = qat.qat_apply(fn.apply, bits=4, axis=-1)(params, extra, x)
    np.testing.assert_allclose(w_only, ptq_apply(model, bits=4, axis=-1)(params, extra, x)[0], atol=1e-5)
    with pytest.raises(TypeError, match="apply function"):
        qat.qat_apply(model, bits=4)
    with pytest.raises(ValueError, match="bits=0"):
        qat.qat_apply(fn.apply, bits=0)
    with pytest.raises(ValueError, match="fc9"):
        qat.quantize_inputs(model, {"fc9": (0.0, 1.0)}, bits=8)
    # the input quantizers pass gradients straight through
    hooked = models.functional(qat.quantize_inputs(model, ranges, bits=2))
    g = jax.grad(lambda p: hooked.apply(p, extra, x)[0].sum())(params)
    assert float(jnp.abs(g["fc1"]["kernel"]).sum()) > 0


def _fit(apply_fn, params, extra, ds, epochs):
    res = train.fit(apply_fn, params, extra, ds, tx=optax.adam(1e-4), epochs=epochs, batch_size=128, progress=False)
    return jax.tree.map(np.asarray, res.params), jax.tree.map(np.asarray, res.extra)


@pytest.mark.parametrize(
    "kw, margin",
    [
        (dict(bits=4, axis=None, act_bits=4), 0.0),  # per-tensor int4 weights and inputs
        (dict(bits=2, axis=None), 0.1),  # per-tensor ternary weights: PTQ collapses, QAT recovers
    ],
)
def test_qat_recovers_accuracy_lost_by_ptq(trained, kw, margin):
    ds, model, fn, params, extra, ranges = trained
    if kw.get("act_bits"):
        kw = dict(kw, act_ranges=ranges)
    evaluate = ptq_apply(model, **kw)
    ptq = train.evaluate(evaluate, params, extra, ds.x_test, ds.y_test)["accuracy"]
    p_qat, e_qat = _fit(qat_apply(model, **kw), params, extra, ds, epochs=3)
    acc_qat = train.evaluate(evaluate, p_qat, e_qat, ds.x_test, ds.y_test)["accuracy"]
    assert acc_qat >= ptq + margin, (acc_qat, ptq)
    # the deployable codes reproduce exactly the network QAT trained
    q_params, aux = quant.quantize(bits=kw["bits"], axis=None)(p_qat)
    x = ds.x_test[:50]
    np.testing.assert_allclose(
        fn.apply(q_params, e_qat, x)[0] if not kw.get("act_bits") else evaluate(q_params, e_qat, x)[0],
        evaluate(p_qat, e_qat, x)[0],
        atol=1e-5,
    )
    qmin, qmax = quant.code_range(kw["bits"], True)
    assert all(int(q.codes.min()) >= qmin and int(q.codes.max()) <= qmax for q in aux.grids.values())
