"""Factorised layers: the factorised model equals the model with truncated kernels, on any NNX model."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jcompress import checkpoint, lowrank, models, tree
from jcompress.core.base import FactorAux, chain, masked
from jcompress.nnx import factorize as fz
from jcompress.nnx import surgery


def _split(model):
    graphdef, params, extra = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(extra)


def _with_params(model, params):
    graphdef, p, extra = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, tree.from_pure_dict(p, params), extra)


def _jit_forward(model, x):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, inp: nnx.merge(graphdef, s)(inp))(state, x)


def test_factorize_equals_truncated_model():
    model = models.create("lenet300", input_shape=(28, 28, 1), num_classes=10)
    _, params, _ = _split(model)
    before = jax.tree.map(np.array, params)
    small, aux = masked(fz.factorize(rank={"fc1": 20, "fc2": 10}), r"fc[12]/kernel")(model)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, _split(model)[1]), before)
    truncated, ref_aux = masked(lowrank.svd(rank={"fc1": 20, "fc2": 10}), r"fc[12]/kernel")(params)
    x = jax.random.uniform(jax.random.key(0), (16, 28, 28, 1))
    np.testing.assert_allclose(small(x), _with_params(model, truncated)(x), atol=1e-5)
    np.testing.assert_allclose(_jit_forward(small, x), small(x), atol=1e-6)
    assert isinstance(aux, FactorAux) and aux.ranks == {"fc1/kernel": 20, "fc2/kernel": 10}
    np.testing.assert_allclose(aux.errors["fc1/kernel"], ref_aux.errors["fc1/kernel"], rtol=1e-4)
    assert isinstance(small.fc1, fz.FactorizedLinear) and isinstance(model.fc1, nnx.Linear)
    n_params = tree.tree_size(nnx.state(small, nnx.Param))
    assert n_params == 20 * (784 + 300) + 300 + 10 * (300 + 100) + 100 + 100 * 10 + 10
    assert surgery.forward_flops(small, (28, 28, 1)) == {
        "fc1/u/kernel": 2 * 784 * 20,
        "fc1/v/kernel": 2 * 20 * 300,
        "fc2/u/kernel": 2 * 300 * 10,
        "fc2/v/kernel": 2 * 10 * 100,
        "fc3/kernel": 2 * 100 * 10,
    }
    # the surgery result trains like any model
    graphdef, sparams, extra = nnx.split(small, nnx.Param, ...)
    grads = jax.grad(lambda p: nnx.merge(graphdef, p, extra)(x).sum())(sparams)
    assert nnx.to_pure_dict(grads)["fc1"]["u"]["kernel"].shape == (784, 20)


@pytest.mark.parametrize(
    ("name", "kwargs", "input_shape", "ranks"),
    [
        ("lenet5", {}, (28, 28, 1), {"conv1": 3, "conv2": 7}),  # VALID padding, biases
        ("cnn1d", {}, (40, 1), {"conv2": 4}),  # 1-D, strided, explicit padding
        (
            "resnet",
            {"widths": (8, 16)},
            (12, 12, 3),
            {"blocks/1/conv1": 5, "blocks/1/proj": 3},
        ),  # SAME, stride 2, no bias
    ],
)
def test_factorize_conv_equals_truncated_kernel(name, kwargs, input_shape, ranks):
    model = models.create(name, input_shape=input_shape, num_classes=10, seed=0, **kwargs)
    _, params, _ = _split(model)
    selection = [f"^{layer}/kernel$" for layer in ranks]
    small, aux = masked(fz.factorize(rank={f"^{k}/": r for k, r in ranks.items()}), selection)(model)
    truncated = params
    for layer, r in ranks.items():
        kernel = np.asarray(tree.get_by_name(params, f"{layer}/kernel"))
        m = kernel.reshape(-1, kernel.shape[-1]).astype(np.float64)
        u, sv, vt = np.linalg.svd(m, full_matrices=False)
        want = ((u[:, :r] * sv[:r]) @ vt[:r]).reshape(kernel.shape).astype(np.float32)
        truncated = tree.set_by_name(truncated, {f"{layer}/kernel": jnp.asarray(want)})
        np.testing.assert_allclose(aux.errors[f"{layer}/kernel"], np.sum(sv[r:] ** 2) / np.sum(sv**2), rtol=1e-3)
        node = small
        for part in layer.split("/"):
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        assert isinstance(node, fz.FactorizedConv)
        assert node.u.kernel.shape == (*kernel.shape[:-1], r)
        assert node.v.kernel.shape == (*(1,) * (kernel.ndim - 2), r, kernel.shape[-1])
    x = jax.random.uniform(jax.random.key(0), (4, *input_shape))
    ref = _with_params(model, truncated)
    np.testing.assert_allclose(small(x), ref(x), atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(_jit_forward(small, x), ref(x), atol=2e-5, rtol=1e-4)
    flops_before = surgery.forward_flops(model, input_shape)
    flops_after = surgery.forward_flops(small, input_shape)
    for layer, r in ranks.items():
        k = tree.get_by_name(params, f"{layer}/kernel").shape
        fan_in = int(np.prod(k[:-1]))
        ratio = (flops_after[f"{layer}/u/kernel"] + flops_after[f"{layer}/v/kernel"]) / flops_before[f"{layer}/kernel"]
        np.testing.assert_allclose(ratio, r * (fan_in + k[-1]) / (fan_in * k[-1]), rtol=1e-6)


class TwoTowers(nnx.Module):
    """A model the library has never seen: two Dense towers summed, a depthwise conv left alone."""

    def __init__(self, *, rngs):
        self.dw = nnx.Conv(4, 4, (3,), feature_group_count=4, padding="SAME", rngs=rngs)
        self.left = nnx.Linear(4 * 8, 24, rngs=rngs)
        self.right = nnx.Linear(4 * 8, 24, use_bias=False, rngs=rngs)
        self.head = nnx.Linear(24, 5, rngs=rngs)

    def __call__(self, x):
        h = self.dw(x).reshape(x.shape[0], -1)
        return self.head(nnx.relu(self.left(h) + self.right(h)))


def test_user_model_and_leaf_patterns():
    model = TwoTowers(rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(3), (5, 8, 4))
    t = masked(fz.factorize(budget=0.25), r"(left|right)/kernel")
    small, aux = t(model)
    assert aux.ranks == {"left/kernel": 3, "right/kernel": 3}  # 3 * (32 + 24) <= 0.25 * 32 * 24 < 4 * (32 + 24)
    assert isinstance(small.left, fz.FactorizedLinear) and small.right.v.bias is None
    _, params, _ = _split(model)
    truncated, _ = masked(lowrank.svd(budget=0.25), r"(left|right)/kernel")(params)
    np.testing.assert_allclose(_jit_forward(small, x), _with_params(model, truncated)(x), atol=2e-5)
    # a grouped conv kernel is not one matrix: the error names the leaf
    with pytest.raises(ValueError, match="'dw/kernel' is not the kernel of an nnx.Linear"):
        fz.factorize(rank=1)(model)
    # in a chain with a model-level stage
    _, caux = chain(t, names=["factorize"])(model)
    assert caux.names == ("factorize",) and caux[0].ranks == aux.ranks


def test_factorized_conv_save_load(tmp_path):
    config = {"name": "lenet5", "input_shape": [28, 28, 1], "num_classes": 10}
    small, aux = masked(fz.factorize(rank={"conv2": 5, "fc1": 16}), r"(conv2|fc1)/kernel")(models.create(**config))
    _, params, extra = _split(small)
    checkpoint.save_model(tmp_path / "ck", config, params, extra, meta={"factorize": {"ranks": aux.ranks}})
    loaded, cfg, meta = checkpoint.load_model(
        tmp_path / "ck", build=lambda meta: fz.rebuild(models.create(**meta["model"]), meta["factorize"]["ranks"])
    )
    assert cfg == config and meta["factorize"]["ranks"] == {"conv2/kernel": 5, "fc1/kernel": 16}
    x = jax.random.uniform(jax.random.key(2), (3, 28, 28, 1))
    np.testing.assert_array_equal(loaded(x), small(x))


def test_rank_specs_and_errors():
    model = models.create("mlp", input_shape=(64,), num_classes=10, widths=(40, 20))
    small, aux = masked(fz.factorize(rank={"fc1": 10, "fc2": 5}), [("fc3", False), ("kernel", True)])(model)
    assert aux.ranks == {"fc1/kernel": 10, "fc2/kernel": 5}
    assert isinstance(small.fc3, nnx.Linear)
    with pytest.raises(ValueError, match="fc7"):
        fz.factorize(rank={"fc7": 2, ".*": 1})(model)
    with pytest.raises(ValueError, match="fc2/kernel.*rank=21 exceeds"):
        masked(fz.factorize(rank=21), "fc2/kernel")(model)
    with pytest.raises(ValueError, match="exactly one"):
        fz.factorize(rank=2, energy=0.5)
    with pytest.raises(ValueError, match="energy"):
        fz.factorize(energy=0.0)
    with pytest.raises(ValueError, match="rank of 'fc2/kernel'"):
        fz.rebuild(model, {"fc2/kernel": 21})
    with pytest.raises(ValueError, match="'fc2' is not the kernel"):
        fz.rebuild(model, {"fc2": 2})
    with pytest.raises(TypeError, match="model transform"):
        fz.factorize(rank=2)(_split(model)[1])


def test_compare_latency_fields():
    model = models.create("mlp", input_shape=(64,), num_classes=10, widths=(128, 128))
    small, _ = masked(fz.factorize(rank=8), r"fc[12]/kernel")(model)
    out = fz.compare_latency(model, small, jnp.ones((32, 64)), warmup=1, repeats=3)
    assert out["dense_params"] == 64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
    assert out["factorized_params"] == 8 * (64 + 128) + 128 + 8 * 256 + 128 + 128 * 10 + 10
    assert out["dense_flops"] == 2 * (64 * 128 + 128 * 128 + 128 * 10)
    assert out["factorized_flops"] == 2 * (8 * (64 + 128) + 8 * 256 + 128 * 10)
    assert out["dense_s"] > 0 and out["factorized_s"] > 0
    np.testing.assert_allclose(out["speedup"], out["dense_s"] / out["factorized_s"])
