"""Exactness of the global threshold and masks of ``core.topk`` on every B1 weight
distribution, on both selection paths: numpy on the host (concrete single-device CPU
arrays) and the compiled histogram search (under ``jax.jit``, and on sharded arrays)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jcompress.bench.b1_threshold import DISTRIBUTIONS, make_leaves
from jcompress.core import topk

SHAPES = [(96, 640), (130, 257), (64, 33), (777,)]  # 96,833 weights: above the host-path minimum


def _reference(leaves, k):
    """k-th largest |w| by np.partition, and the masks of a stable argsort (ties: higher position kept)."""
    flat = np.abs(np.concatenate([x.ravel() for x in leaves]))
    n = flat.size
    keep = np.zeros(n, bool)
    keep[np.argsort(flat, kind="stable")[n - k :]] = True
    masks = np.split(keep, np.cumsum([x.size for x in leaves])[:-1])
    return flat, np.partition(flat, n - k)[n - k], [m.reshape(x.shape) for m, x in zip(masks, leaves)]


def _ks(n):
    return [1, n // 10, n // 2 + 1, n - 1, n]


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_host_path_equals_partition_and_stable_argsort(distribution):
    leaves = make_leaves(SHAPES, seed=3, distribution=distribution)
    device = [jnp.asarray(x) for x in leaves]
    assert topk.on_host(device)
    n = sum(x.size for x in leaves)
    for k in _ks(n):
        _, want, want_masks = _reference(leaves, k)
        got = topk.kth_largest(device, k, magnitude=True)
        assert got.dtype == jnp.float32 and got == want, (k, got, want)
        masks = topk.keep_largest_global(device, k, magnitude=True)
        assert sum(int(m.sum()) for m in masks) == k
        for g, w in zip(masks, want_masks):
            np.testing.assert_array_equal(np.asarray(g), w)


def test_compiled_path_equals_partition_and_host_path():
    """Under jit (traced: the histogram search), the threshold and masks are the host path's."""
    n = sum(int(np.prod(s)) for s in SHAPES)
    k = n // 10
    both = jax.jit(
        lambda ls: (topk.kth_largest(ls, k, magnitude=True), topk.keep_largest_global(ls, k, magnitude=True))
    )
    for distribution in DISTRIBUTIONS:  # one compilation: same shapes and k
        leaves = make_leaves(SHAPES, seed=4, distribution=distribution)
        device = [jnp.asarray(x) for x in leaves]
        _, want, want_masks = _reference(leaves, k)
        got, masks = both(device)
        assert got == want == topk.kth_largest(device, k, magnitude=True), distribution
        for g, w in zip(masks, want_masks):
            np.testing.assert_array_equal(np.asarray(g), w)


def test_magnitude_equals_abs_and_signed_values_work():
    leaves = make_leaves(SHAPES, seed=5, distribution="student_t2")
    device = [jnp.asarray(x) for x in leaves]
    n = sum(x.size for x in leaves)
    flat = np.concatenate([x.ravel() for x in leaves])
    for k in (7, n // 3):
        assert topk.kth_largest(device, k) == np.partition(flat, n - k)[n - k]  # signed, host path
        assert topk.kth_largest(device, k, magnitude=True) == topk.kth_largest([jnp.abs(x) for x in device], k)


def test_host_path_all_zero_denormals_and_a_missed_bracket():
    zeros = [jnp.zeros((300, 300)), jnp.full((10,), -0.0)]
    assert topk.kth_largest(zeros, 5) == 0.0 and not jnp.signbit(topk.kth_largest(zeros, 5))
    assert [int(m.sum()) for m in topk.keep_largest_global(zeros, 90_001)] == [
        89_991,
        10,
    ]  # the highest-placed ties kept
    tiny = np.random.default_rng(6).standard_normal(100_000).astype(np.float32) * np.float32(1e-40)
    assert (
        topk.kth_largest([jnp.asarray(tiny)], 12_345, magnitude=True)
        == np.partition(np.abs(tiny), 100_000 - 12_345)[100_000 - 12_345]
    )
    # every sampled element (every 67th) is large: the bracket misses and the fallback selects over everything
    x = np.arange(100_000, dtype=np.float32) / 1e5
    x[::67] += 10.0
    for k in (10, 50_000):
        _, want, want_masks = _reference([x], k)
        assert topk.kth_largest([jnp.asarray(x)], k) == want
        np.testing.assert_array_equal(np.asarray(topk.keep_largest_global([jnp.asarray(x)], k)[0]), want_masks[0])


def test_sampled_compiled_path_on_every_distribution(monkeypatch):
    """The compiled search's sampled bracket (normally from 4M weights on) at a small size."""
    monkeypatch.setattr(topk, "_SAMPLE_ABOVE", 1 << 14)
    f = jax.jit(lambda ls, k: topk.kth_largest(ls, k, magnitude=True), static_argnums=1)
    for distribution in DISTRIBUTIONS:
        leaves = make_leaves(SHAPES, seed=7, distribution=distribution)
        n = sum(x.size for x in leaves)
        for k in (n // 10, n // 2):
            assert f([jnp.asarray(x) for x in leaves], k) == _reference(leaves, k)[1], (distribution, k)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_sharded_leaves_over_8_devices_take_the_compiled_path(axis_type):
    """Rows, a vector and columns sharded, ties at the threshold that end inside the
    column-sharded last leaf: the single-device masks, and the leaves' shardings kept."""
    mesh = jax.make_mesh((8,), ("d",), axis_types=(axis_type,))
    leaves = make_leaves([(256, 320), (512,), (64, 512)], seed=8, distribution="int8_ties")
    specs = [P("d", None), P("d"), P(None, "d")]
    sharded = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(leaves, specs)]
    assert not topk.on_host(sharded)
    flat = np.abs(np.concatenate([x.ravel() for x in leaves]))
    t = np.partition(flat, flat.size * 9 // 10)[flat.size * 9 // 10]
    k = int(np.sum(flat > t)) + int(np.sum(np.abs(leaves[-1]) == t)) // 2
    want_masks = _reference(leaves, k)[2]
    assert k < int(np.sum(flat >= t))  # ties must be resolved (the threshold: test_pruning_masks)
    for g, w, x in zip(topk.keep_largest_global(sharded, k, magnitude=True), want_masks, sharded):
        np.testing.assert_array_equal(np.asarray(g), w)
        assert axis_type == AxisType.Auto or g.sharding.is_equivalent_to(x.sharding, x.ndim)  # not gathered


def test_tie_cut_axis_by_axis_on_explicitly_sharded_leaves():
    """``_last_true`` (the tie step of the masks) keeps the r last-placed True entries in
    row-major order, for every r, on leaves sharded along each of their axes."""
    mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Explicit,))
    rng = np.random.default_rng(9)
    last_true = jax.jit(topk._last_true)
    for shape, spec in [((16, 24), P("d", None)), ((6, 40), P(None, "d")), ((40,), P("d")), ((3, 8, 5), P(None, "d"))]:
        e = rng.random(shape) < 0.3
        x = jax.device_put(e, NamedSharding(mesh, spec))
        positions = np.flatnonzero(e)
        for r in sorted({0, 1, 2, positions.size // 2, positions.size - 1, positions.size}):
            want = np.zeros(e.size, bool)
            want[positions[positions.size - r :]] = True
            got = last_true(x, jnp.int32(r))
            np.testing.assert_array_equal(np.asarray(got), want.reshape(shape), err_msg=f"{shape} {spec} r={r}")
            assert got.sharding.is_equivalent_to(x.sharding, x.ndim)
