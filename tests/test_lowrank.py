"""Truncated SVD: exact Eckart-Young errors, rank rules, randomized SVD, factorised Dense surgery."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jcompress import lowrank, models, report, tree
from jcompress.core.base import FactorAux, masked


def _params(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return {
        "conv": {"kernel": jax.random.normal(k[0], (3, 3, 4, 8)), "bias": jnp.zeros(8)},
        "fc": {"kernel": jax.random.normal(k[1], (40, 24)), "bias": jnp.ones(24)},
    }


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.sampled_from([(2, 5), (7, 3), (16, 16), (30, 12)]),
    frac=st.floats(0.01, 1.0),
    scale=st.floats(1e-3, 1e3),
)
def test_exact_error_is_the_discarded_singular_values(seed, shape, frac, scale):
    m, n = shape
    w = scale * np.asarray(jax.random.normal(jax.random.key(seed), (m, n)))
    r = max(1, int(frac * min(m, n)))
    new, aux = lowrank.svd(rank=r)({"k": {"kernel": w}})
    assert isinstance(aux, FactorAux)
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    discarded = np.sum(s[r:] ** 2) / np.sum(s**2)
    tol = 1e-5 * s[0]  # float32 SVD
    np.testing.assert_allclose(float(aux.errors["k/kernel"]), discarded, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(
        np.linalg.norm(w - np.asarray(new["k"]["kernel"])), np.sqrt(np.sum(s[r:] ** 2)), rtol=1e-3, atol=tol
    )
    assert np.linalg.matrix_rank(np.asarray(new["k"]["kernel"]), tol=1e-4 * s[0]) == r
    us, v = aux.factors["k/kernel"]
    assert us.shape == (m, r) and v.shape == (r, n) and aux.ranks["k/kernel"] == r
    np.testing.assert_allclose(us @ v, new["k"]["kernel"], atol=tol)


def test_conv_kernel_uses_its_matrix_view():
    params = _params()
    new, aux = lowrank.svd(rank=3)(params)
    assert sorted(aux.ranks) == ["conv/kernel", "fc/kernel"]
    mat = np.asarray(params["conv"]["kernel"]).reshape(36, 8)
    s = np.linalg.svd(mat, compute_uv=False)
    np.testing.assert_allclose(float(aux.errors["conv/kernel"]), np.sum(s[3:] ** 2) / np.sum(s**2), rtol=1e-4)
    assert new["conv"]["kernel"].shape == (3, 3, 4, 8)
    us, v = aux.factors["conv/kernel"]
    np.testing.assert_allclose((us @ v).reshape(3, 3, 4, 8), new["conv"]["kernel"], atol=1e-5)
    assert new["fc"]["bias"] is params["fc"]["bias"]


def test_rank_spec_per_leaf_and_masked():
    params = _params()
    _, aux = lowrank.svd(rank={"conv": 2, "fc": 5})(params)
    assert aux.ranks == {"conv/kernel": 2, "fc/kernel": 5}
    new, aux = masked(lowrank.svd(rank=4), "fc/kernel")(params)
    assert aux.ranks == {"fc/kernel": 4}
    assert new["conv"]["kernel"] is params["conv"]["kernel"]
    with pytest.raises(ValueError, match=r"rank: no pattern covers \['fc/kernel'\]"):
        lowrank.svd(rank={"conv": 2})(params)
    with pytest.raises(ValueError, match="leaf 'fc/kernel'.*rank=0"):
        lowrank.svd(rank={"conv": 2, "fc": 0})(params)


@pytest.mark.parametrize("energy", [0.3, 0.75, 0.9, 0.999, 1.0])
def test_energy_picks_the_smallest_sufficient_rank(energy):
    params = _params()
    _, aux = masked(lowrank.svd(energy=energy), "fc/kernel")(params)
    s = np.linalg.svd(np.asarray(params["fc"]["kernel"], np.float64), compute_uv=False)
    cum = np.cumsum(s**2) / np.sum(s**2)
    r = aux.ranks["fc/kernel"]
    assert cum[r - 1] >= energy - 1e-6
    assert r == 1 or cum[r - 2] < energy
    assert float(aux.errors["fc/kernel"]) <= 1 - energy + 1e-5


@pytest.mark.parametrize("budget", [0.2, 0.3, 0.5, 1.0])
def test_budget_rank_is_the_largest_that_fits(budget):
    params = _params()
    _, aux = lowrank.svd(budget=budget)(params)
    for name, (m, n) in (("fc/kernel", (40, 24)), ("conv/kernel", (36, 8))):
        r = aux.ranks[name]
        assert r * (m + n) <= budget * m * n
        assert r == min(m, n) or (r + 1) * (m + n) > budget * m * n


def test_randomized_matches_exact_on_low_rank_plus_noise():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    low = jax.random.normal(k1, (300, 12)) @ jax.random.normal(k2, (12, 200))
    w = low + 0.01 * jax.random.normal(k3, (300, 200))
    params = {"big": {"kernel": w}}
    _, exact = lowrank.svd(rank=12)(params)
    t = lowrank.svd(rank=12, method="randomized")
    new, rnd = t(params, key=jax.random.key(5))
    e, r = float(exact.errors["big/kernel"]), float(rnd.errors["big/kernel"])
    assert e <= r <= 1.02 * e
    np.testing.assert_allclose(r, float(jnp.sum((w - new["big"]["kernel"]) ** 2) / jnp.sum(w**2)), rtol=1e-3)
    us, v = rnd.factors["big/kernel"]
    np.testing.assert_allclose(us @ v, new["big"]["kernel"], atol=1e-4)
    # the same key gives the same result, under jit too
    new_j, rnd_j = jax.jit(lambda p, k: t(p, key=k))(params, jax.random.key(5))
    np.testing.assert_allclose(new_j["big"]["kernel"], new["big"]["kernel"], atol=1e-4)
    # without power iterations or oversampling on a slowly decaying spectrum, it is worse but valid
    _, crude = lowrank.svd(rank=12, method="randomized", oversample=0, power_iters=0)(params, key=jax.random.key(5))
    assert float(crude.errors["big/kernel"]) >= e


def test_dict_state_jit_and_no_mutation():
    model = models.create("mlp", input_shape=(64,), num_classes=10, widths=(32, 16))
    _, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    before = jax.tree.map(np.array, params)
    new, aux = lowrank.svd(rank=8)(params)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, params), before)
    new_s, _ = lowrank.svd(rank=8)(state)
    assert isinstance(new_s, nnx.State)
    chex.assert_trees_all_close(nnx.to_pure_dict(new_s), new, atol=1e-6)
    new_j, aux_j = jax.jit(lambda p: lowrank.svd(rank=8)(p))(params)
    chex.assert_trees_all_close(new_j, new, atol=2e-5)
    chex.assert_trees_all_close(aux_j.errors, aux.errors, rtol=1e-3, atol=1e-7)
    new_b, _ = jax.jit(lambda p: lowrank.svd(budget=0.2)(p))(params)
    ref_b, aux_b = lowrank.svd(budget=0.2)(params)
    chex.assert_trees_all_close(new_b, ref_b, atol=2e-5)
    assert aux_b.ranks == {"fc1/kernel": 4, "fc2/kernel": 2, "fc3/kernel": 1}
    with pytest.raises(ValueError, match="energy= picks a data-dependent rank"):
        jax.jit(lambda p: lowrank.svd(energy=0.9)(p))(params)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0), "rank=0"),
        (dict(rank=9), "conv/kernel.*rank=9 exceeds"),
        (dict(energy=0.0), "energy=0.0"),
        (dict(energy=1.5), "energy=1.5"),
        (dict(energy=float("nan")), "energy=nan"),
        (dict(budget=0.0), "budget=0.0"),
        (dict(budget=0.01), "conv/kernel.*budget=0.01"),
        (dict(rank=2, energy=0.5), "exactly one"),
        (dict(), "exactly one"),
        (dict(rank=2, method="randomized"), "key"),
        (dict(energy=0.5, method="randomized"), "energy"),
        (dict(rank=2, method="lanczos"), "method"),
        (dict(rank=2, oversample=-1), "oversample"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lowrank.svd(**kwargs)(_params())


def test_bad_leaves():
    with pytest.raises(ValueError, match="fc/bias.*matrix"):
        masked(lowrank.svd(rank=2), "fc/bias")(_params())
    with pytest.raises(ValueError, match="nothing.*match none of the leaves"):
        masked(lowrank.svd(rank=2), "nothing")(_params())
    with pytest.raises(TypeError, match="fc/kernel"):
        lowrank.svd(rank=1)({"fc": {"kernel": jnp.ones((4, 4), jnp.int32)}})
    with pytest.raises(ValueError, match="fc/kernel contains NaN"):
        lowrank.svd(rank=1)({"fc": {"kernel": jnp.ones((4, 4)).at[0, 0].set(jnp.nan)}})
    assert lowrank.svd(rank=np.int64(2))(_params())[1].ranks["fc/kernel"] == 2


# ---------------------------------------------------------------------------------------
# Surgery
# ---------------------------------------------------------------------------------------


def test_factorize_dense_equals_truncated_model():
    model = models.create("lenet300", input_shape=(28, 28, 1), num_classes=10)
    fn = models.functional(model)
    before = jax.tree.map(np.array, fn.params)
    small, aux = lowrank.factorize_dense(model, ranks={"fc1": 20, "fc2": 10})
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, models.functional(model).params), before)
    truncated, ref_aux = masked(lowrank.svd(rank={"fc1": 20, "fc2": 10}), r"fc[12]/kernel")(fn.params)
    x = jax.random.uniform(jax.random.key(0), (16, 28, 28, 1))
    np.testing.assert_allclose(small(x), models.merge(model, truncated)(x), atol=1e-5)
    assert aux.ranks == {"fc1/kernel": 20, "fc2/kernel": 10}
    np.testing.assert_allclose(aux.discarded_energy["fc1/kernel"], ref_aux.errors["fc1/kernel"], rtol=1e-4)
    assert isinstance(small.fc1, lowrank.FactorizedLinear) and isinstance(model.fc1, nnx.Linear)
    n_params = tree.tree_size(nnx.state(small, nnx.Param))
    assert n_params == 20 * (784 + 300) + 300 + 10 * (300 + 100) + 100 + 100 * 10 + 10
    flops = report.layer_flops(small, (28, 28, 1))
    assert flops == {
        "fc1/u/kernel": 2 * 784 * 20,
        "fc1/v/kernel": 2 * 20 * 300,
        "fc2/u/kernel": 2 * 300 * 10,
        "fc2/v/kernel": 2 * 10 * 100,
        "fc3/kernel": 2 * 100 * 10,
    }
    # the surgery result trains like any model
    sfn = models.functional(small)
    grads = jax.grad(lambda p: sfn.apply(p, sfn.extra, x)[0].sum())(sfn.params)
    assert grads["fc1"]["u"]["kernel"].shape == (784, 20)


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
    fn = models.functional(model)
    small, aux = lowrank.factorize_dense(model, ranks=ranks)
    truncated = fn.params
    for layer, r in ranks.items():
        kernel = np.asarray(tree.get_by_name(fn.params, f"{layer}/kernel"))
        m = kernel.reshape(-1, kernel.shape[-1]).astype(np.float64)
        u, sv, vt = np.linalg.svd(m, full_matrices=False)
        want = ((u[:, :r] * sv[:r]) @ vt[:r]).reshape(kernel.shape).astype(np.float32)
        truncated = tree.set_by_name(truncated, {f"{layer}/kernel": jnp.asarray(want)})
        np.testing.assert_allclose(aux.errors[f"{layer}/kernel"], np.sqrt(np.sum(sv[r:] ** 2)), rtol=1e-4)
        node = small
        for part in layer.split("/"):
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        assert isinstance(node, lowrank.FactorizedConv)
        assert node.u.kernel.shape == (*kernel.shape[:-1], r)
        assert node.v.kernel.shape == (*(1,) * (kernel.ndim - 2), r, kernel.shape[-1])
    x = jax.random.uniform(jax.random.key(0), (4, *input_shape))
    ref = models.merge(model, truncated, fn.extra)
    np.testing.assert_allclose(small(x), ref(x), atol=2e-5, rtol=1e-4)
    flops_before, flops_after = report.layer_flops(model, input_shape), report.layer_flops(small, input_shape)
    for layer, r in ranks.items():
        k = tree.get_by_name(fn.params, f"{layer}/kernel").shape
        fan_in = int(np.prod(k[:-1]))
        ratio = (flops_after[f"{layer}/u/kernel"] + flops_after[f"{layer}/v/kernel"]) / flops_before[f"{layer}/kernel"]
        np.testing.assert_allclose(ratio, r * (fan_in + k[-1]) / (fan_in * k[-1]), rtol=1e-6)


def test_factorized_conv_save_load(tmp_path):
    config = {"name": "lenet5", "input_shape": [28, 28, 1], "num_classes": 10}
    small, _ = lowrank.factorize_dense(models.create(**config), ranks={"conv2": 5, "fc1": 16})
    lowrank.save(tmp_path / "ck", small, config=config, ranks={"conv2": 5, "fc1": 16})
    loaded, _, _ = lowrank.load(tmp_path / "ck")
    x = jax.random.uniform(jax.random.key(2), (3, 28, 28, 1))
    np.testing.assert_array_equal(loaded(x), small(x))


def test_rank_fraction_selection_and_errors():
    model = models.create("mlp", input_shape=(64,), num_classes=10, widths=(40, 20))
    small, aux = lowrank.factorize_dense(model, rank_fraction=0.25, exclude="fc3")
    assert aux.ranks == {"fc1/kernel": 10, "fc2/kernel": 5}
    assert isinstance(small.fc3, nnx.Linear)
    with pytest.raises(ValueError, match="fc7"):
        lowrank.factorize_dense(model, ranks={"fc7": 2})
    with pytest.raises(ValueError, match="1..20"):
        lowrank.factorize_dense(model, ranks={"fc2": 21})
    with pytest.raises(ValueError, match="exactly one"):
        lowrank.factorize_dense(model, ranks={"fc2": 2}, rank_fraction=0.5)
    with pytest.raises(ValueError, match="rank_fraction"):
        lowrank.factorize_dense(model, rank_fraction=0.0)


def test_save_load_round_trip(tmp_path):
    config = {"name": "mlp", "input_shape": [64], "num_classes": 10, "widths": [40, 20]}
    model = models.create(**config)
    small, aux = lowrank.factorize_dense(model, ranks={"fc1": 6})
    lowrank.save(tmp_path / "ck", small, config=config, ranks={"fc1": 6})
    loaded, cfg, meta = lowrank.load(tmp_path / "ck")
    assert cfg == config and meta["lowrank"]["ranks"] == {"fc1": 6}
    x = jax.random.normal(jax.random.key(1), (5, 64))
    np.testing.assert_array_equal(loaded(x), small(x))
    with pytest.raises(FileNotFoundError):
        lowrank.load(tmp_path / "missing")


def test_compare_latency_fields():
    model = models.create("mlp", input_shape=(64,), num_classes=10, widths=(128, 128))
    small, _ = lowrank.factorize_dense(model, ranks={"fc1": 8, "fc2": 8})
    out = lowrank.compare_latency(model, small, jnp.ones((32, 64)), warmup=1, repeats=3)
    assert out["dense_params"] == 64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
    assert out["factorized_params"] == 8 * (64 + 128) + 128 + 8 * 256 + 128 + 128 * 10 + 10
    assert out["factorized_flops"] < out["dense_flops"]
    assert out["dense_s"] > 0 and out["factorized_s"] > 0
    np.testing.assert_allclose(out["speedup"], out["dense_s"] / out["factorized_s"])
