"""Distillation losses against hand-computed values and the paper's gradient argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from jcompress import models
from jcompress.distill import losses

JIT_OR_NOT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def _maybe_jit(fn, jit):
    return jax.jit(fn) if jit else fn


def _np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# --- KL and Hinton's loss ---------------------------------------------------------------


@JIT_OR_NOT
def test_kl_is_zero_for_equal_and_shifted_logits(jit):
    z = jnp.array([[1.0, -2.0, 0.5], [3.0, 3.0, -1.0]])
    kl = _maybe_jit(lambda a, b: losses.kl_divergence(a, b, temperature=3.0), jit)
    assert float(kl(z, z)) == 0.0
    # a constant added to a row leaves the softmax unchanged
    assert abs(float(kl(z + jnp.array([[5.0], [-7.0]]), z))) < 1e-6


@JIT_OR_NOT
def test_kl_matches_hand_computation(jit):
    # two classes, T = 2: p = softmax([2, 0] / 2) = softmax([1, 0]), q = softmax([0, 0]) = [.5, .5]
    s, t = jnp.array([[0.0, 0.0]]), jnp.array([[2.0, 0.0]])
    p1 = np.e / (np.e + 1.0)
    expected = p1 * np.log(p1 / 0.5) + (1 - p1) * np.log((1 - p1) / 0.5)
    got = _maybe_jit(lambda a, b: losses.kl_divergence(a, b, temperature=2.0), jit)(s, t)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)


@JIT_OR_NOT
def test_hinton_loss_is_the_weighted_sum_of_ce_and_scaled_kl(jit):
    rng = np.random.default_rng(0)
    s = rng.normal(size=(5, 4)).astype(np.float32)
    t = rng.normal(size=(5, 4)).astype(np.float32) * 3
    y = np.array([0, 1, 2, 3, 1], np.int32)
    T, alpha = 4.0, 0.7
    ce = -np.mean(np.log(_np_softmax(s)[np.arange(5), y]))
    p, q = _np_softmax(t / T), _np_softmax(s / T)
    kl = np.mean(np.sum(p * np.log(p / q), -1))
    fn = _maybe_jit(lambda a, b, c: losses.hinton_loss(a, b, c, temperature=T, alpha=alpha), jit)
    loss, terms = fn(s, t, y)
    np.testing.assert_allclose(float(terms.hard), ce, rtol=1e-5)
    np.testing.assert_allclose(float(terms.soft), T**2 * kl, rtol=1e-5)
    np.testing.assert_allclose(float(loss), (1 - alpha) * ce + alpha * T**2 * kl, rtol=1e-5)


def test_soft_gradient_is_T_times_q_minus_p():
    """d(T^2 KL)/dz = T (q - p) / N exactly (N rows, mean over the batch)."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=(3, 10)).astype(np.float32)
    v = rng.normal(size=(3, 10)).astype(np.float32)
    for T in (1.0, 2.0, 5.0, 20.0):
        g = jax.grad(lambda a, T=T: T**2 * losses.kl_divergence(a, v, temperature=T))(z)
        expected = T * (_np_softmax(z / T) - _np_softmax(v / T)) / 3
        np.testing.assert_allclose(np.asarray(g), expected, atol=1e-6)


def test_T_squared_keeps_the_soft_gradient_independent_of_T():
    """Hinton et al. section 2: at high T with zero-mean logits the gradient tends to (z - v) / C.

    Without the T^2 factor it would shrink like 1/T^2; with it, T = 10 and T = 100 give the
    same gradient to within the expansion error, which is what lets one alpha serve every T.
    """
    rng = np.random.default_rng(2)
    C = 10
    z = rng.normal(size=(1, C)).astype(np.float32)
    v = rng.normal(size=(1, C)).astype(np.float32)
    z, v = z - z.mean(), v - v.mean()
    limit = (z - v) / C

    def grad_at(T, scaled=True):
        factor = T**2 if scaled else 1.0
        return np.asarray(jax.grad(lambda a: factor * losses.kl_divergence(a, v, temperature=T))(z))

    g100 = grad_at(100.0)
    np.testing.assert_allclose(g100, limit, atol=0.02 * np.abs(limit).max())
    ratio = np.linalg.norm(grad_at(10.0)) / np.linalg.norm(grad_at(100.0))
    assert 0.85 < ratio < 1.15
    unscaled_ratio = np.linalg.norm(grad_at(10.0, False)) / np.linalg.norm(grad_at(100.0, False))
    assert 80 < unscaled_ratio < 120  # about (100/10)^2 without the T^2 factor


def test_alpha_zero_is_plain_cross_entropy_and_alpha_one_ignores_labels():
    s = jnp.array([[2.0, 0.0, -1.0]])
    t = jnp.array([[0.0, 3.0, 0.0]])
    loss0, terms = losses.hinton_loss(s, t, jnp.array([0]), temperature=5.0, alpha=0.0)
    assert float(loss0) == pytest.approx(float(terms.hard))
    a, _ = losses.hinton_loss(s, t, jnp.array([0]), temperature=5.0, alpha=1.0)
    b, _ = losses.hinton_loss(s, t, jnp.array([2]), temperature=5.0, alpha=1.0)
    assert float(a) == float(b)


@settings(max_examples=30, deadline=None)
@given(
    arrays(np.float32, (4, 6), elements=st.floats(-20, 20, width=32)),
    arrays(np.float32, (4, 6), elements=st.floats(-20, 20, width=32)),
    st.sampled_from([0.5, 1.0, 4.0, 20.0]),
)
def test_kl_is_nonnegative_and_finite(s, t, T):
    kl = float(losses.kl_divergence(s, t, temperature=T))
    assert np.isfinite(kl) and kl >= -1e-6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0, "alpha": 0.5}, "temperature"),
        ({"temperature": -1.0, "alpha": 0.5}, "temperature"),
        ({"temperature": float("nan"), "alpha": 0.5}, "temperature"),
        ({"temperature": 2.0, "alpha": 1.5}, "alpha"),
        ({"temperature": 2.0, "alpha": -0.1}, "alpha"),
    ],
)
def test_hinton_loss_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        losses.hinton_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32), **kwargs)


def test_bad_logits_and_labels_are_named():
    with pytest.raises(ValueError, match="same shape"):
        losses.kl_divergence(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    with pytest.raises(TypeError, match="student_logits"):
        losses.kl_divergence(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3)))
    with pytest.raises(TypeError, match="labels"):
        losses.hinton_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(2), temperature=2.0, alpha=0.5)
    with pytest.raises(ValueError, match="labels"):
        losses.hinton_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(3, jnp.int32), temperature=2.0, alpha=0.5)


def test_teacher_logits_get_no_gradient():
    s, t, y = jnp.ones((2, 3)), jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]]), jnp.array([0, 1])
    g = jax.grad(lambda b: losses.hinton_loss(s, b, y, temperature=2.0, alpha=0.5)[0])(t)
    assert float(jnp.abs(g).sum()) == 0.0
    g = jax.grad(lambda b: losses.logit_mse(s, b))(t)
    assert float(jnp.abs(g).sum()) == 0.0


# --- logit MSE ------------------------------------------------------------------------


@JIT_OR_NOT
def test_logit_mse_hand_value(jit):
    fn = _maybe_jit(losses.logit_mse, jit)
    got = fn(jnp.array([[1.0, 2.0], [0.0, -1.0]]), jnp.array([[0.0, 0.0], [0.0, 1.0]]))
    assert float(got) == pytest.approx((1 + 4 + 0 + 4) / 4)


# --- FitNets hints ----------------------------------------------------------------------


@JIT_OR_NOT
def test_hint_loss_hand_value(jit):
    s = {"fc1": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
    t = {"fc2": jnp.array([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])}
    reg = {"fc1": {"kernel": jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), "bias": jnp.array([0.0, 0.0, 1.0])}}
    # regressed: [[1, 2, 1], [3, 4, 1]]; minus teacher: [[0, 2, -1], [3, 4, 1]]
    expected = (0 + 4 + 1 + 9 + 16 + 1) / 6
    fn = _maybe_jit(lambda r, a, b: losses.hint_loss(r, a, b, hints=[("fc1", "fc2")]), jit)
    assert float(fn(reg, s, t)) == pytest.approx(expected)


def test_hint_regressor_shapes_gradients_and_nnx_state():
    key = jax.random.key(0)
    s = {"conv2": jnp.ones((2, 8, 8, 16)), "blocks/0/conv1": jnp.ones((2, 4, 4, 8))}
    t = {"conv2": jnp.ones((2, 8, 8, 50)), "stem": jnp.ones((2, 4, 4, 32))}
    hints = [("conv2", "conv2"), ("blocks/0/conv1", "stem")]
    reg = losses.init_hint_regressor(key, s, t, hints=hints)
    assert jax.tree.map(jnp.shape, reg) == {
        "conv2": {"kernel": (16, 50), "bias": (50,)},
        "blocks.0.conv1": {"kernel": (8, 32), "bias": (32,)},
    }
    # gradients reach the regressor and the student features, never the teacher features
    g_reg, g_s, g_t = jax.grad(lambda r, a, b: losses.hint_loss(r, a, b, hints=hints), argnums=(0, 1, 2))(reg, s, t)
    assert all(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves((g_reg, g_s)))
    assert all(float(jnp.abs(x).sum()) == 0 for x in jax.tree.leaves(g_t))
    # an NNX State holding the regressor gives the same loss as the plain dict
    state = nnx.State(jax.tree.map(nnx.Param, reg))
    assert float(losses.hint_loss(nnx.to_pure_dict(state), s, t, hints=hints)) == pytest.approx(
        float(losses.hint_loss(reg, s, t, hints=hints))
    )


def test_hint_errors_name_the_features():
    s, t = {"fc1": jnp.ones((2, 5))}, {"fc1": jnp.ones((3, 5))}
    with pytest.raises(ValueError, match="fc1"):
        losses.init_hint_regressor(jax.random.key(0), s, t, hints=[("fc1", "fc1")])
    with pytest.raises(KeyError, match="fc9"):
        losses.init_hint_regressor(jax.random.key(0), s, {"fc1": jnp.ones((2, 5))}, hints=[("fc1", "fc9")])
    with pytest.raises(ValueError, match="hints"):
        losses.init_hint_regressor(jax.random.key(0), s, t, hints=[])
    reg = losses.init_hint_regressor(jax.random.key(0), s, {"a": jnp.ones((2, 4))}, hints=[("fc1", "a")])
    with pytest.raises(ValueError, match="rebuild the regressor"):
        losses.hint_loss(reg, s, {"a": jnp.ones((2, 7))}, hints=[("fc1", "a")])


# --- attention transfer ---------------------------------------------------------------------


@JIT_OR_NOT
def test_attention_map_hand_value(jit):
    # one example, 2 positions, 2 channels: mean of squares per position = [(1+9)/2, (4+0)/2] = [5, 2]
    a = jnp.array([[[[1.0, 3.0], [2.0, 0.0]]]])  # (1, 1, 2, 2)
    q = _maybe_jit(losses.attention_map, jit)(a)
    np.testing.assert_allclose(np.asarray(q), [[5 / np.sqrt(29), 2 / np.sqrt(29)]], rtol=1e-6)


@JIT_OR_NOT
def test_attention_transfer_is_scale_invariant_and_hand_checked(jit):
    rng = np.random.default_rng(3)
    f = jnp.asarray(rng.normal(size=(2, 4, 4, 6)), jnp.float32)
    fn = _maybe_jit(lambda a, b: losses.attention_transfer_loss(a, b, pairs=[("s", "t")]), jit)
    # same map up to scale and channel count (duplicated channels): zero loss
    teacher = {"t": 3.0 * jnp.concatenate([f, f], axis=-1)}
    assert float(fn({"s": f}, teacher)) < 1e-12
    g = {"s": jnp.asarray(rng.normal(size=(2, 4, 4, 6)), jnp.float32)}
    qs = np.asarray(losses.attention_map(g["s"]))
    qt = np.asarray(losses.attention_map(teacher["t"]))
    assert float(fn(g, teacher)) == pytest.approx(np.mean((qs - qt) ** 2), rel=1e-5)


def test_attention_rejects_dense_features_and_mismatched_sizes():
    with pytest.raises(ValueError, match="conv features"):
        losses.attention_map(jnp.ones((2, 10)))
    with pytest.raises(ValueError, match="spatial size"):
        losses.attention_transfer_loss({"s": jnp.ones((2, 4, 4, 3))}, {"t": jnp.ones((2, 8, 8, 3))}, pairs=[("s", "t")])


def test_attention_map_of_zeros_is_zero_not_nan():
    q = losses.attention_map(jnp.zeros((1, 3, 3, 2)))
    assert np.all(np.asarray(q) == 0.0)


# --- parameter distance ---------------------------------------------------------------------


@JIT_OR_NOT
def test_param_distance_hand_value_dict_and_nnx_state(jit):
    model = models.create("mlp", input_shape=(4,), num_classes=3, widths=(5,))
    _, teacher_state = nnx.split(model, nnx.Param)
    teacher = nnx.to_pure_dict(teacher_state)
    student = jax.tree.map(lambda x: x + 0.5, teacher)
    n = sum(x.size for x in jax.tree.leaves(teacher))  # 4*5 + 5 + 5*3 + 3 = 43
    fn = _maybe_jit(lambda a, b: losses.param_distance(a, b, weight=0.1), jit)
    assert float(fn(student, teacher)) == pytest.approx(0.1 * 0.5 * n, rel=1e-6)
    student_state = jax.tree.map(lambda x: x + 0.5, teacher_state)
    assert float(fn(student_state, teacher)) == pytest.approx(0.1 * 0.5 * n, rel=1e-6)
    only_kernels = losses.param_distance(student, teacher, weight=1.0, leaves=r"kernel")
    assert float(only_kernels) == pytest.approx(0.5 * (20 + 15), rel=1e-6)
    assert float(losses.param_distance(teacher, teacher, weight=3.0)) == 0.0


def test_param_distance_gradient_is_weight_times_sign():
    t = {"w": jnp.array([0.0, 1.0, 2.0])}
    s = {"w": jnp.array([1.0, 0.0, 2.5])}
    g = jax.grad(lambda p: losses.param_distance(p, t, weight=0.25))(s)
    np.testing.assert_allclose(np.asarray(g["w"]), [0.25, -0.25, 0.25])


def test_param_distance_errors():
    with pytest.raises(ValueError, match="structure"):
        losses.param_distance({"a": jnp.ones(2)}, {"b": jnp.ones(2)}, weight=1.0)
    with pytest.raises(ValueError, match="params/a"):
        losses.param_distance({"a": jnp.ones(2)}, {"a": jnp.ones(3)}, weight=1.0)
    with pytest.raises(ValueError, match="weight"):
        losses.param_distance({"a": jnp.ones(2)}, {"a": jnp.ones(2)}, weight=-1.0)


def test_hinton_loss_refuses_labels_outside_the_classes_and_an_infinite_temperature():
    s, t = jnp.zeros((2, 3)), jnp.ones((2, 3))
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 3\), got values from 0 to 5"):
        losses.hinton_loss(s, t, jnp.array([0, 5]), temperature=2.0, alpha=0.5)
    with pytest.raises(ValueError, match=r"labels must be class indices"):
        losses.hinton_loss(s, t, jnp.array([-1, 0]), temperature=2.0, alpha=0.5)
    for bad in (float("inf"), float("nan"), 0.0):
        with pytest.raises(ValueError, match="temperature="):
            losses.hinton_loss(s, t, jnp.array([0, 2]), temperature=bad, alpha=0.5)
    loss, _ = losses.hinton_loss(s, t, jnp.array([0, 2]), temperature=2.0, alpha=0.5)
    assert np.isfinite(float(loss))
