"""Truncated SVD: exact Eckart-Young errors, rank rules, randomized SVD."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jcompress import lowrank, models
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
    np.testing.assert_allclose(float(rnd_j.errors["big/kernel"]), r, rtol=1e-3)
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
