"""Leaf names, selection, and the NNX <-> dict adapters."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jcompress import models, tree
from jcompress.core import spec


@pytest.fixture
def lenet5():
    return models.create("lenet5", input_shape=(28, 28, 1), num_classes=10)


def test_names_match_between_state_and_dict(lenet5):
    _, state, _ = nnx.split(lenet5, nnx.Param, ...)
    d = nnx.to_pure_dict(state)
    assert [n for n, _ in tree.named_leaves(state)] == [n for n, _ in tree.named_leaves(d)]
    assert "conv2/kernel" in dict(tree.named_leaves(state))


def test_default_selection_is_kernels_only(lenet5):
    fn = models.functional(lenet5)
    assert spec.select_names(fn.params, None) == ["conv1/kernel", "conv2/kernel", "fc1/kernel", "fc2/kernel"]


def test_regex_pairs_predicate_and_bool_tree_selection(lenet5):
    p = models.functional(lenet5).params
    assert spec.select_names(p, r"^fc\d/kernel") == ["fc1/kernel", "fc2/kernel"]
    assert spec.select_names(p, [r"conv1/", r"fc2/bias"]) == ["conv1/bias", "conv1/kernel", "fc2/bias"]
    assert spec.select_names(p, lambda n, x: x.ndim == 1 and x.shape[0] == 500) == ["fc1/bias"]
    assert spec.select_names(p, [("conv", False), ("kernel", True)]) == ["fc1/kernel", "fc2/kernel"]
    flags = spec.selection_tree(r"fc1/kernel")(p)
    assert spec.select_names(p, flags) == ["fc1/kernel"]


def test_selection_errors_name_the_leaves(lenet5):
    p = models.functional(lenet5).params
    with pytest.raises(ValueError, match="selects no leaf.*conv1/kernel"):
        spec.select_names(p, lambda n, x: False)
    with pytest.raises(ValueError, match=r"\^layers/.*match none of the leaves"):
        spec.select_names(p, r"^layers/")
    with pytest.raises(ValueError, match="does not compile"):
        spec.select_names(p, "fc1[")
    with pytest.raises(ValueError, match="does not match the structure"):
        spec.select_names(p, {"fc1": {"kernel": True}})


def test_selection_tree_on_nnx_state_gives_state_of_bools(lenet5):
    _, state, _ = nnx.split(lenet5, nnx.Param, ...)
    sel = spec.selection_tree(r"fc1/kernel")(state)
    assert isinstance(sel, nnx.State)
    assert sum(jax.tree.leaves(sel)) == 1


def test_pure_dict_round_trip_through_the_model(lenet5):
    x = jnp.ones((2, 28, 28, 1))
    fn = models.functional(lenet5)
    doubled = jax.tree.map(lambda a: 2 * a, fn.params)
    m2 = models.merge(lenet5, doubled)
    _, state2, _ = nnx.split(m2, nnx.Param, ...)
    chex.assert_trees_all_equal(nnx.to_pure_dict(state2), doubled)
    y_apply, _ = fn.apply(doubled, fn.extra, x)
    np.testing.assert_allclose(m2(x), y_apply, rtol=1e-6)
    # the original model is untouched
    chex.assert_trees_all_equal(models.functional(lenet5).params, fn.params)
    # from_pure_dict puts dict leaves back into a State with the same names
    _, state, _ = nnx.split(lenet5, nnx.Param, ...)
    back = tree.from_pure_dict(state, doubled)
    assert isinstance(back, nnx.State)
    chex.assert_trees_all_equal(nnx.to_pure_dict(back), doubled)


def test_get_set_by_name_and_finite_check():
    p = {"a": {"kernel": jnp.ones((2, 2))}, "b": jnp.zeros(3)}
    q = tree.set_by_name(p, {"a/kernel": jnp.full((2, 2), 5.0)})
    assert float(tree.get_by_name(q, "a/kernel")[0, 0]) == 5.0 and float(p["a"]["kernel"][0, 0]) == 1.0
    with pytest.raises(KeyError, match="a/kernel"):
        tree.set_by_name(p, {"zz": 1})
    with pytest.raises(ValueError, match="params/b contains NaN"):
        tree.check_finite({"b": jnp.array([1.0, jnp.nan])})
    with pytest.raises(TypeError, match="w has dtype int32"):
        tree.as_float_array(jnp.arange(3), "w")
