"""Model shapes, parameter counts (as the papers state them) and FLOP counting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress import models, report, tree


@pytest.mark.parametrize(
    "name, shape, kwargs, count",
    [
        ("lenet300", (28, 28, 1), {}, 266_610),  # Han et al.: 267K
        ("lenet5", (28, 28, 1), {}, 431_080),  # Han et al.: 431K
        ("mlp", (28, 28, 1), {"widths": (1200, 1200)}, 784 * 1200 + 1200 + 1200 * 1200 + 1200 + 12010),
        ("mlp", (28, 28, 1), {"widths": (800, 800)}, 784 * 800 + 800 + 800 * 800 + 800 + 8010),
    ],
)
def test_parameter_counts(name, shape, kwargs, count):
    m = models.create(name, input_shape=shape, num_classes=10, **kwargs)
    assert tree.tree_size(models.functional(m).params) == count


@pytest.mark.parametrize(
    "name, shape", [("lenet300", (28, 28, 1)), ("lenet5", (28, 28, 1)), ("cnn1d", (40,)), ("resnet", (8, 8, 1))]
)
def test_forward_shapes_and_jit(name, shape):
    fn = models.functional(models.create(name, input_shape=shape, num_classes=10))
    x = jax.random.normal(jax.random.key(0), (3, *shape))
    eager, _ = fn.apply(fn.params, fn.extra, x)
    jitted, _ = jax.jit(fn.apply)(fn.params, fn.extra, x)
    assert eager.shape == (3, 10)
    np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-6)


def test_dropout_only_in_training():
    fn = models.functional(models.create("mlp", input_shape=(10,), num_classes=3, widths=(50,), dropout=0.5))
    x = jnp.ones((4, 10))
    a, _ = fn.apply(fn.params, fn.extra, x)
    b, _ = fn.apply(fn.params, fn.extra, x)
    np.testing.assert_array_equal(a, b)
    c, _ = fn.apply(fn.params, fn.extra, x, train=True, key=jax.random.key(1))
    d, _ = fn.apply(fn.params, fn.extra, x, train=True, key=jax.random.key(2))
    assert not np.allclose(c, d)


def test_batchnorm_stats_update_only_in_training():
    fn = models.functional(models.create("resnet", input_shape=(8, 8, 1), num_classes=10, widths=(4, 8)))
    x = jax.random.normal(jax.random.key(0), (6, 8, 8, 1)) + 3.0
    _, extra_eval = fn.apply(fn.params, fn.extra, x)
    _, extra_train = fn.apply(fn.params, fn.extra, x, train=True, key=jax.random.key(0))
    np.testing.assert_array_equal(extra_eval["stem_bn"]["mean"], fn.extra["stem_bn"]["mean"])
    assert not np.allclose(extra_train["stem_bn"]["mean"], fn.extra["stem_bn"]["mean"])


def test_layer_flops_match_hand_counts():
    f = report.layer_flops(models.create("lenet5", input_shape=(28, 28, 1), num_classes=10), (28, 28, 1))
    assert f == {
        "conv1/kernel": 2 * 5 * 5 * 1 * 20 * 24 * 24,
        "conv2/kernel": 2 * 5 * 5 * 20 * 50 * 8 * 8,
        "fc1/kernel": 2 * 800 * 500,
        "fc2/kernel": 2 * 500 * 10,
    }


def test_unknown_model_and_too_small_input():
    with pytest.raises(ValueError, match="lenet300, lenet5"):
        models.create("vgg", input_shape=(28, 28, 1), num_classes=10)
    with pytest.raises(ValueError, match="at least 12x12"):
        models.create("lenet5", input_shape=(8, 8, 1), num_classes=10)


@pytest.mark.parametrize("kw", [{"dropout": 1.5}, {"dropout": 1.0}, {"input_dropout": -0.1}, {"dropout": float("nan")}])
def test_mlp_refuses_dropout_outside_0_1(kw):
    with pytest.raises(ValueError, match=next(iter(kw)) + r"=.* must be in \[0, 1\)"):
        models.create("mlp", input_shape=(4,), num_classes=2, widths=(3,), **kw)
