"""Wanda's unstructured selection: the host path (concrete CPU kernels) and the compiled path
(under ``jax.jit``) give the same masks as a stable argsort of the scores per output unit."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress.core import topk

wanda = importlib.import_module("jcompress.oneshot.wanda")


def reference_keep(kernel, h, count):
    """Keep mask: per column, the ``count`` entries first in a stable ascending argsort of the
    scores are removed (equal scores: the lower input index goes first; -0.0 equals +0.0)."""
    score = np.abs(kernel.astype(np.float32)) * np.sqrt(np.maximum(np.diag(h), 0.0))[:, None]
    order = np.argsort(score + np.float32(0.0), axis=0, kind="stable")  # + 0.0 turns -0.0 into +0.0
    keep = np.ones(kernel.shape, bool)
    np.put_along_axis(keep, order[:count], False, axis=0)
    return keep


def problem(kind, n_in, n_out, seed=0):
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(n_in, n_out)).astype(np.float32)
    diag = rng.uniform(0.5, 2.0, size=n_in).astype(np.float32)
    if kind == "tied":  # integer weights and one input scale: many equal scores per column
        kernel = rng.integers(-3, 4, size=(n_in, n_out)).astype(np.float32)
        diag = np.full(n_in, 4.0, np.float32)
    elif kind == "half_zero":  # more zero scores than the count in some columns
        kernel[rng.random(size=kernel.shape) < 0.5] = 0.0
    elif kind == "signed_zero":  # -0.0 and +0.0 weights are the same score
        kernel = np.where(rng.random(size=kernel.shape) < 0.5, np.float32(-0.0), np.float32(0.0))
        kernel[rng.random(size=kernel.shape) < 0.3] = 1.0
    elif kind == "dead":  # inputs never seen in calibration (diag H = 0): all their scores are 0
        diag[rng.random(size=n_in) < 0.4] = 0.0
    return kernel, np.diag(diag)


KINDS = ["random", "tied", "half_zero", "signed_zero", "dead"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("count_of", [lambda n: 0, lambda n: 1, lambda n: n // 2, lambda n: n - 1, lambda n: n])
def test_host_and_jit_masks_equal_the_stable_argsort(kind, count_of):
    kernel, h = problem(kind, 48, 40)
    count = count_of(48)
    ref = reference_keep(kernel, h, count)
    k, hj = jnp.asarray(kernel), jnp.asarray(h)
    assert topk.on_host([k, hj])
    new_host, keep_host = wanda.prune_matrix(k, hj, count=count)
    new_jit, keep_jit = jax.jit(lambda k, h: wanda.prune_matrix(k, h, count=count))(k, hj)
    np.testing.assert_array_equal(np.asarray(keep_host), ref)
    np.testing.assert_array_equal(np.asarray(keep_jit), ref)
    np.testing.assert_array_equal(np.asarray(new_host), np.where(ref, kernel, 0.0))
    np.testing.assert_array_equal(np.asarray(new_jit), np.asarray(new_host))
    assert np.all(np.sum(~np.asarray(keep_host), axis=0) == count)


def test_host_path_equals_remove_smallest_on_a_larger_tied_kernel():
    # one column tied beyond the count, the others not: both branches of the host path
    kernel, h = problem("random", 300, 257, seed=1)
    kernel[:, 7] = np.round(kernel[:, 7])
    k, hj = jnp.asarray(kernel), jnp.asarray(h)
    for count in (150, 299):
        _, keep = wanda.prune_matrix(k, hj, count=count)
        old = ~topk.remove_smallest(wanda.wanda_scores(k, hj), count, axis=0)
        np.testing.assert_array_equal(np.asarray(keep), np.asarray(old))
        np.testing.assert_array_equal(np.asarray(keep), reference_keep(kernel, h, count))


def test_bfloat16_kernel_keeps_its_dtype_and_mask():
    kernel, h = problem("random", 64, 32, seed=2)
    k = jnp.asarray(kernel, jnp.bfloat16)
    new, keep = wanda.prune_matrix(k, jnp.asarray(h), count=20)
    assert new.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(keep), reference_keep(np.asarray(k, np.float32), h, 20))


@pytest.mark.parametrize("count", [-1, 49])
def test_count_out_of_range_is_an_error_naming_count(count):
    kernel, h = problem("random", 48, 8)
    with pytest.raises(ValueError, match=r"count=-?\d+ must be in \[0, 48\]"):
        wanda.prune_matrix(jnp.asarray(kernel), jnp.asarray(h), count=count)
