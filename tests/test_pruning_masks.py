"""Masks with exact counts, the radix-select threshold, and sparsity summaries."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jcompress import models, tree
from jcompress.bench.b1_threshold import DISTRIBUTIONS, make_leaves
from jcompress.core import MaskAux, masked, topk
from jcompress.core.patterns import NM, Block, Units, Unstructured
from jcompress.core.spec import select_names
from jcompress.pruning import scores, summary
from jcompress.pruning.masks import apply_masks, erk_densities, magnitude, make_masks
from jcompress.pruning.masks import random as jc_random


def _zeros(m):
    return int(np.size(m) - np.count_nonzero(np.asarray(m)))


def _ref_keep(values, n_keep):
    """Reference: keep the last n_keep of a stable ascending argsort of the concatenation."""
    flat = np.concatenate([np.asarray(v, np.float32).ravel() for v in values])
    keep = np.zeros(flat.size, bool)
    if n_keep:
        keep[np.argsort(flat, kind="stable")[flat.size - n_keep :]] = True
    out, i = [], 0
    for v in values:
        out.append(keep[i : i + np.size(v)].reshape(np.shape(v)))
        i += np.size(v)
    return out


def _tied_scores(rng, shapes):
    """Scores with many ties (small integers), to exercise the tie rule."""
    return {
        f"l{i}": {"kernel": jnp.asarray(rng.integers(0, 5, size=s).astype(np.float32))} for i, s in enumerate(shapes)
    }


@pytest.fixture(scope="module")
def lenet():
    model = models.create("lenet5", input_shape=(16, 16, 1), num_classes=10)  # small: fast tests
    _, state = nnx.split(model, nnx.Param)
    return state, tree.to_pure_dict(state)


# ----------------------------------------------------------------------------- topk


@pytest.mark.parametrize(
    "make",
    [
        lambda r: [r.standard_normal((37, 5)), r.standard_normal(11)],
        lambda r: [np.array([3.0, 1.0, 2.0, 2.0, -0.0, 0.0, -np.inf, np.inf])],
        lambda r: [np.zeros(100)],
        lambda r: [r.integers(-3, 3, size=(300, 300))],  # heavy ties, histogram path
        lambda r: [r.standard_normal(5000) * 1e-40],  # denormals
        lambda r: [r.standard_normal((700, 300)), np.abs(r.standard_normal(2**20)) ** 3],
        lambda r: [np.sort(r.standard_normal(2**22 + 5))],  # sorted: a biased sample, restart path
    ],
)
def test_kth_largest_equals_np_partition(make):
    vals = [np.asarray(v, np.float32) for v in make(np.random.default_rng(0))]
    flat = np.concatenate([v.ravel() for v in vals])
    n = flat.size
    f = jax.jit(topk.kth_largest, static_argnums=1)
    ks = {1, 2, n // 3 + 1, n // 2, n - 1, n} if n < 2**16 else {3, n // 2, n - 1}
    for k in sorted(ks):
        got = f([jnp.asarray(v) for v in vals], k)
        want = np.partition(flat, n - k)[n - k]
        assert got == want, (k, got, want)


def test_float_key_orders_like_floats_and_round_trips():
    x = np.array([-np.inf, -3.5, -1e-40, -0.0, 0.0, 1e-45, 1e-38, 2.0, np.inf], np.float32)
    keys = np.asarray(topk.float_to_key(jnp.asarray(x)))
    assert np.all(np.diff(keys.astype(np.int64)) >= 0)
    assert keys[3] == keys[4]  # -0.0 and +0.0 tie
    np.testing.assert_array_equal(
        np.asarray(topk.key_to_float(jnp.asarray(keys)))[[0, 1, 2, 5, 6, 7, 8]], x[[0, 1, 2, 5, 6, 7, 8]]
    )


@pytest.mark.parametrize("shapes", [[(50, 7), (13,)], [(300, 300), (1000,)]])
def test_keep_largest_global_matches_stable_argsort(shapes):
    rng = np.random.default_rng(1)
    vals = [rng.integers(0, 7, size=s).astype(np.float32) for s in shapes]
    n = sum(v.size for v in vals)
    for k in [0, 1, n // 2 + 3, n]:
        got = topk.keep_largest_global([jnp.asarray(v) for v in vals], k)
        for g, w in zip(got, _ref_keep(vals, k)):
            np.testing.assert_array_equal(np.asarray(g), w)


def _stable_rank(x, axis):
    return np.argsort(np.argsort(x, axis=axis, kind="stable"), axis=axis, kind="stable")


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_remove_smallest_equals_stable_argsort_rank(axis):
    rng = np.random.default_rng(4)
    ties = rng.integers(0, 5, size=(37, 11)).astype(np.float32)  # many ties: the lower index goes first
    spread = rng.standard_normal((37, 11)).astype(np.float32)
    spread[0, :3] = [-np.inf, np.inf, -0.0]
    for x in (ties, spread):
        n = x.size if axis is None else x.shape[axis]
        rank = _stable_rank(x.ravel(), 0).reshape(x.shape) if axis is None else _stable_rank(x, axis)
        for count in sorted({0, 1, n // 2, n - 1, n}):
            got = np.asarray(topk.remove_smallest(jnp.asarray(x), count, axis=axis))
            np.testing.assert_array_equal(got, rank < count)


def test_remove_smallest_traced_count_compiles_once():
    x = jnp.asarray(np.random.default_rng(5).standard_normal((64, 48)).astype(np.float32))
    traces = []

    @jax.jit
    def f(x, count):
        traces.append(1)
        return topk.remove_smallest(x, count)

    for count in (0, 7, 1000, 3072):
        assert int(jnp.sum(f(x, count))) == count
    assert len(traces) == 1


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
@pytest.mark.parametrize("n_rows", [256, 8192])  # full-range start / sample-bracket start
def test_sharded_threshold_never_gathers_weights(axis_type, n_rows):
    mesh = jax.make_mesh((8,), ("d",), axis_types=(axis_type,))
    rng = np.random.default_rng(2)
    leaves = [rng.standard_normal((n_rows, 512)).astype(np.float32), rng.standard_normal((512, 256)).astype(np.float32)]
    specs = [P("d", None), P(None, "d")]
    sharded = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(leaves, specs)]
    n = sum(x.size for x in leaves)
    k = n // 3
    fn = jax.jit(lambda ls: topk.kth_largest([jnp.abs(x) for x in ls], k, chunk=None))
    hlo = fn.lower(sharded).compile().as_text()
    assert "all-gather" not in hlo
    assert "all-reduce" in hlo  # the bucket counts are summed across devices
    flat = np.abs(np.concatenate([x.ravel() for x in leaves]))
    assert fn(sharded) == np.partition(flat, n - k)[n - k]


def test_global_threshold_and_masks(lenet):
    _, params = lenet
    kernels = [np.abs(np.asarray(tree.get_by_name(params, n))) for n in select_names(params, None)]
    t = topk.global_threshold([jnp.asarray(x) for x in kernels], sparsity=0.8)
    total = sum(x.size for x in kernels)
    flat = np.concatenate([x.ravel() for x in kernels])
    k = total - topk.pruned_count(0.8, total)
    assert t == np.partition(flat, total - k)[total - k]
    masks = topk.keep_largest_global([jnp.asarray(x) for x in kernels], k)
    assert sum(int(np.sum(m)) for m in masks) == k
    assert all(bool(np.all(x[np.asarray(m)] >= t)) for x, m in zip(kernels, masks))
    assert topk.global_threshold([jnp.ones(4)], sparsity=1.0) == jnp.inf


def test_keep_largest_is_the_complement_of_remove_smallest():
    rng = np.random.default_rng(6)
    x = rng.integers(0, 4, size=(12, 8)).astype(np.float32)  # ties: the higher index is kept
    for axis in (None, 0, 1):
        n = x.size if axis is None else x.shape[axis]
        rank = _stable_rank(x.ravel(), 0).reshape(x.shape) if axis is None else _stable_rank(x, axis)
        for count in (0, 1, n // 2, n):
            got = np.asarray(jax.jit(topk.keep_largest, static_argnames="axis")(jnp.asarray(x), count, axis=axis))
            np.testing.assert_array_equal(got, rank >= n - count)
    with pytest.raises(ValueError, match=r"count=97"):
        topk.keep_largest(jnp.asarray(x), 97)


def test_nm_keep_mask_keeps_n_largest_per_group():
    rng = np.random.default_rng(7)
    x = rng.integers(0, 3, size=(16, 6)).astype(np.float32)
    keep = np.asarray(jax.jit(lambda s: topk.nm_keep_mask(s, n=2, m=4))(jnp.asarray(x)))
    groups, kept = x.reshape(4, 4, 6), keep.reshape(4, 4, 6)
    assert np.all(kept.sum(axis=1) == 2)
    rank = _stable_rank(groups, 1)
    np.testing.assert_array_equal(kept, rank >= 2)
    along_last = np.asarray(topk.nm_keep_mask(jnp.asarray(x), n=1, m=3, axis=-1))
    assert np.all(along_last.reshape(16, 2, 3).sum(axis=2) == 1)
    with pytest.raises(ValueError, match="m=5 does not divide"):
        topk.nm_keep_mask(jnp.asarray(x), n=2, m=5)


def test_topk_bad_input():
    with pytest.raises(ValueError, match="outside"):
        topk.kth_largest([jnp.ones(4)], 5)
    with pytest.raises(TypeError, match="floating"):
        topk.kth_largest([jnp.ones(4, jnp.int32)], 1)
    with pytest.raises(ValueError, match="sparsity"):
        topk.global_threshold([jnp.ones((2, 2))], sparsity=1.5)


# ----------------------------------------------------------------------------- exact counts


@settings(max_examples=10, deadline=None)
@given(
    shapes=st.lists(st.sampled_from([(1, 7), (8, 6), (13, 5), (40, 24)]), min_size=1, max_size=3),
    sparsity=st.floats(0.0, 0.99),
    scope=st.sampled_from(["layer", "global"]),
    seed=st.integers(0, 2**16),
)
def test_unstructured_exact_and_equal_to_reference(shapes, sparsity, scope, seed):
    s = _tied_scores(np.random.default_rng(seed), shapes)
    m = make_masks(s, sparsity=sparsity, scope=scope, allow_empty=True)  # counts are checked, empty or not
    got = [np.asarray(x) for _, x in tree.named_leaves(m)]
    vals = [np.asarray(x) for _, x in tree.named_leaves(s)]
    if scope == "layer":
        for g, v in zip(got, vals):
            assert _zeros(g) == topk.pruned_count(sparsity, v.size)
            np.testing.assert_array_equal(g, _ref_keep([v], v.size - topk.pruned_count(sparsity, v.size))[0])
    else:
        total = sum(v.size for v in vals)
        assert sum(_zeros(g) for g in got) == topk.pruned_count(sparsity, total)
        for g, w in zip(got, _ref_keep(vals, total - topk.pruned_count(sparsity, total))):
            np.testing.assert_array_equal(g, w)


@settings(max_examples=10, deadline=None)
@given(
    rows=st.sampled_from([1, 3]),
    cols=st.sampled_from([2, 5]),
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (2, 8)]),
    axis=st.sampled_from([0, 1]),
    seed=st.integers(0, 2**16),
)
def test_nm_every_group_has_exactly_m_minus_n_zeros(rows, cols, nm, axis, seed):
    n, m = nm
    shape = [rows, cols]
    shape[axis] *= m
    s = _tied_scores(np.random.default_rng(seed), [tuple(shape)])
    mask = np.asarray(make_masks(s, sparsity=None, pattern=NM(n, m, axis=axis))["l0"]["kernel"])
    groups = np.moveaxis(mask, axis, -1).reshape(-1, m)
    assert np.all(groups.sum(axis=1) == n)
    # within a group the kept scores are the n largest (ties: higher index kept)
    vals = np.moveaxis(np.asarray(s["l0"]["kernel"]), axis, -1).reshape(-1, m)
    for g, v in zip(groups, vals):
        np.testing.assert_array_equal(g, _ref_keep([v], n)[0])


@settings(max_examples=10, deadline=None)
@given(
    shape=st.sampled_from([(8, 6), (3, 3, 4, 10), (12, 5)]),
    sparsity=st.floats(0.0, 0.95),
    norm=st.sampled_from(["l1", "l2"]),
    seed=st.integers(0, 2**16),
)
def test_structured_removes_whole_units(shape, sparsity, norm, seed):
    s = _tied_scores(np.random.default_rng(seed), [shape])
    mask = np.asarray(make_masks(s, sparsity=sparsity, pattern=Units(norm=norm), allow_empty=True)["l0"]["kernel"])
    units = mask.reshape(-1, shape[-1])
    per_unit = units.all(axis=0)
    assert np.all(per_unit | ~units.any(axis=0))  # each unit all kept or all pruned
    assert int((~per_unit).sum()) == topk.pruned_count(sparsity, shape[-1])
    # the pruned units are those with the lowest aggregated scores
    v = np.abs(np.asarray(s["l0"]["kernel"]).reshape(-1, shape[-1]))
    agg = v.sum(0) if norm == "l1" else np.sqrt((v**2).sum(0))
    np.testing.assert_array_equal(
        per_unit, _ref_keep([agg.astype(np.float32)], shape[-1] - topk.pruned_count(sparsity, shape[-1]))[0]
    )


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_block_pattern_exact_blocks(scope):
    rng = np.random.default_rng(3)
    s = {
        "a": {"kernel": jnp.asarray(rng.random((8, 12), np.float32))},
        "b": {"kernel": jnp.asarray(rng.random((2, 2, 4, 6), np.float32))},
    }
    m = make_masks(s, sparsity=0.5, pattern=Block(2, 3), scope=scope)
    total_blocks = 0
    pruned_blocks = 0
    for _, mask in tree.named_leaves(m):
        mat = np.asarray(mask).reshape(-1, np.shape(mask)[-1])
        blocks = mat.reshape(mat.shape[0] // 2, 2, mat.shape[1] // 3, 3)
        assert np.all(blocks.all(axis=(1, 3)) | ~blocks.any(axis=(1, 3)))
        total_blocks += blocks.shape[0] * blocks.shape[2]
        pruned_blocks += int((~blocks.any(axis=(1, 3))).sum())
        if scope == "layer":
            assert int((~blocks.any(axis=(1, 3))).sum()) == topk.pruned_count(0.5, blocks.shape[0] * blocks.shape[2])
    assert pruned_blocks == topk.pruned_count(0.5, total_blocks) or scope == "layer"


def test_erk_total_exact_and_proportional():
    shapes = {"conv": (3, 3, 16, 32), "fc1": (800, 500), "fc2": (500, 10)}
    keep = erk_densities(shapes, sparsity=0.9)
    total = sum(int(np.prod(s)) for s in shapes.values())
    assert sum(keep.values()) == total - topk.pruned_count(0.9, total)
    dens = {n: keep[n] / np.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / np.prod(s) for n, s in shapes.items()}
    free = [n for n in shapes if dens[n] < 1]
    ratios = [dens[n] / raw[n] for n in free]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-3)  # same epsilon for non-dense layers
    assert dens["fc2"] > dens["fc1"]  # small layers are kept denser
    m = make_masks({n: {"kernel": jnp.ones(s)} for n, s in shapes.items()}, sparsity=0.9, distribution="erk")
    assert {n.split("/")[0]: int(np.sum(x)) for n, x in tree.named_leaves(m)} == keep


def test_sparsity_dict_per_layer(lenet):
    _, params = lenet
    names = select_names(params, None)
    want = {n: 0.1 * (i + 1) for i, n in enumerate(names)}
    m = make_masks(scores.magnitude_scores(params), sparsity=want)
    for n, x in tree.named_leaves(m):
        if n in want:
            assert _zeros(x) == topk.pruned_count(want[n], x.size)
    with pytest.raises(ValueError, match=r"no pattern covers .*fc1/kernel"):
        make_masks(scores.magnitude_scores(params), sparsity={names[0]: 0.5})
    # first match wins: fc1 gets 0.5, every other kernel 0.9
    _, aux = magnitude(sparsity=[("fc1", 0.5), (".*", 0.9)])(params)
    for n, x in tree.named_leaves(aux.masks):
        if n in names:
            assert _zeros(x) == topk.pruned_count(0.5 if n.startswith("fc1") else 0.9, x.size), n


def test_existing_masks_stay_pruned(lenet):
    _, params = lenet
    rnd = scores.random_scores(params, key=jax.random.key(0))
    first = make_masks(rnd, sparsity=0.5)
    second = make_masks(scores.random_scores(params, key=jax.random.key(1)), sparsity=0.7, existing=first)
    for (_, a), (_, b) in zip(tree.named_leaves(first), tree.named_leaves(second)):
        assert not np.any(np.asarray(b) & ~np.asarray(a))


# ----------------------------------------------------------------------------- jit, NNX, determinism

_CONFIGS = [
    {"sparsity": 0.8},
    {"sparsity": 0.8, "scope": "global", "allow_empty": True},  # at init conv2's weights are all below the threshold
    {"sparsity": 0.9, "distribution": "erk"},
    {"pattern": NM(2, 4), "select": ["conv2/kernel", "fc2/kernel"]},  # m divides their input axis
    {"sparsity": 0.5, "pattern": Block(5, 2)},
    {"sparsity": 0.5, "pattern": Units(norm="l2")},
]


@pytest.mark.parametrize("config", _CONFIGS)
def test_jit_state_dict_and_determinism_agree(lenet, config):
    state, params = lenet
    config = dict(config)
    select = config.pop("select", None)
    fn = magnitude(**config) if select is None else masked(magnitude(**config), select)
    new, aux = fn(params)
    new_j, aux_j = jax.jit(fn)(params)
    new_s, aux_s = fn(state)
    assert isinstance(new_s, nnx.State)
    chex.assert_trees_all_equal(aux.masks, aux_j.masks)
    chex.assert_trees_all_equal(aux.masks, tree.to_pure_dict(aux_s.masks))
    chex.assert_trees_all_equal(new, new_j)
    chex.assert_trees_all_equal(new, tree.to_pure_dict(new_s))
    chex.assert_trees_all_equal(aux.masks, fn(params)[1].masks)  # deterministic
    # pruned entries are exactly zero, kept entries untouched, biases untouched
    for n, w in tree.named_leaves(params):
        m = np.asarray(tree.get_by_name(aux.masks, n))
        got = np.asarray(tree.get_by_name(new, n))
        np.testing.assert_array_equal(got, np.where(m, np.asarray(w), 0))
        if n.endswith("bias"):
            assert m.all()
    assert isinstance(aux, MaskAux)
    assert set(aux.errors) == set(select_names(params, select))
    for n, e in aux.errors.items():
        w = np.asarray(tree.get_by_name(params, n), np.float64)
        d = w - np.asarray(tree.get_by_name(new, n), np.float64)
        np.testing.assert_allclose(float(e), np.sum(d * d) / np.sum(w * w), rtol=1e-5)


_HOST_SHAPES = [(96, 704), (130, 257), (64, 33), (7, 111)]  # 103,883 weights; the first alone > 65,536
_GLOBAL = magnitude(sparsity=0.9, scope="global")
_GLOBAL_JIT = jax.jit(_GLOBAL)  # compiled once for all distributions (same shapes)


@pytest.fixture
def host_selections(monkeypatch):
    """Counts the calls of topk's numpy selection (the host path)."""
    calls = []
    select = topk._host_select

    def spy(*args, **kwargs):
        calls.append(1)
        return select(*args, **kwargs)

    monkeypatch.setattr(topk, "_host_select", spy)
    return calls


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_eager_global_magnitude_selects_on_the_host_and_equals_jit(distribution, host_selections):
    """Called eagerly on concrete CPU weights the global masks come from numpy (one host
    selection), under jax.jit from the compiled search; the results are identical and keep
    the stable-argsort reference's weights (ties: the higher position kept)."""
    leaves = make_leaves(_HOST_SHAPES, seed=11, distribution=distribution)
    params = {f"l{i}": {"kernel": jnp.asarray(x)} for i, x in enumerate(leaves)}
    new, aux = _GLOBAL(params)
    assert len(host_selections) == 1
    new_j, aux_j = _GLOBAL_JIT(params)
    assert len(host_selections) == 1  # traced: the compiled path
    chex.assert_trees_all_equal((new, aux.masks), (new_j, aux_j.masks))
    total = sum(x.size for x in leaves)
    want = _ref_keep([np.abs(x) for x in leaves], total - topk.pruned_count(0.9, total))
    for i, w in enumerate(want):
        np.testing.assert_array_equal(np.asarray(aux.masks[f"l{i}"]["kernel"]), w)


def test_eager_per_layer_and_structured_masks_equal_jit(host_selections):
    """Per layer, only a leaf above 65,536 weights is selected on the host; units (l2 norms
    from the same compiled function) too when there are that many. Same masks as under jit."""
    rng = np.random.default_rng(12)
    params = {
        "a": {"kernel": jnp.asarray(rng.integers(-3, 4, _HOST_SHAPES[0]).astype(np.float32))},
        "b": {"kernel": jnp.asarray(rng.standard_normal(_HOST_SHAPES[1]).astype(np.float32))},
        "wide": {"kernel": jnp.asarray(rng.integers(0, 3, (2, 70_000)).astype(np.float32))},
    }
    layer = masked(magnitude(sparsity={"a": 0.3, ".*": 0.6}), ["a/kernel", "b/kernel"])
    units = masked(magnitude(sparsity=0.5, pattern=Units(norm="l2"), scope="global"), ["wide/kernel"])
    for fn, host_calls in ((layer, 1), (units, 1)):
        before = len(host_selections)
        eager = fn(params)
        assert len(host_selections) - before == host_calls
        chex.assert_trees_all_equal(eager, jax.jit(fn)(params))


def test_kept_scores_are_above_pruned_scores(lenet):
    _, params = lenet
    _, aux = magnitude(sparsity=0.7)(params)
    for n in select_names(params, None):
        w = np.abs(np.asarray(tree.get_by_name(params, n)))
        m = np.asarray(tree.get_by_name(aux.masks, n))
        np.testing.assert_array_equal(np.asarray(tree.get_by_name(aux.scores, n)), w)
        assert np.min(w[m]) >= np.max(w[~m])


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs(lenet):
    _, params = lenet
    s = scores.magnitude_scores(params)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="sparsity|emptied"):
            make_masks(s, sparsity=bad)
    with pytest.raises(TypeError, match="sparsity"):
        make_masks(s, sparsity="0.5")
    with pytest.raises(ValueError, match="does not divide"):
        make_masks({"w": {"kernel": jnp.ones((6, 4))}}, sparsity=None, pattern=NM(2, 4, axis=0))
    with pytest.raises(ValueError, match="contradicts"):
        make_masks(s, ["fc2/kernel"], sparsity=0.3, pattern=NM(2, 4))
    with pytest.raises(ValueError, match="does not tile"):
        make_masks({"w": {"kernel": jnp.ones((6, 4))}}, sparsity=0.5, pattern=Block(4, 4))
    with pytest.raises(ValueError, match="match none of the leaves"):
        masked(magnitude(sparsity=0.5), r"nothing_here")(params)
    with pytest.raises(ValueError, match="scope"):
        make_masks(s, sparsity=0.5, scope="model")
    with pytest.raises(ValueError, match="global"):
        make_masks(s, sparsity=0.5, scope="global", distribution="erk")
    with pytest.raises(ValueError, match="single float"):
        magnitude(sparsity={"fc": 0.5}, scope="global")
    with pytest.raises(TypeError, match="pattern"):
        magnitude(sparsity=0.5, pattern="nm")
    with pytest.raises(TypeError, match="floating"):
        make_masks({"w": {"kernel": jnp.ones((4, 4), jnp.int32)}}, sparsity=0.5)
    with pytest.raises(TypeError, match="params/w/kernel"):
        magnitude(sparsity=0.5)({"w": {"kernel": jnp.ones((4, 4), jnp.int32)}})
    with pytest.raises(ValueError, match="key="):
        jc_random(sparsity=0.5)(params)
    with pytest.raises(ValueError, match="NaN"):
        make_masks({"w": {"kernel": jnp.full((4, 4), jnp.nan)}}, sparsity=0.5)
    m = make_masks(s, sparsity=0.5)
    with pytest.raises(ValueError, match="structure"):
        apply_masks(params, {"fc1": m["fc1"]})
    bad_shape = jax.tree.map(lambda x: x[..., :1], m)
    with pytest.raises(ValueError, match="shape"):
        apply_masks(params, bad_shape)
    with pytest.raises(ValueError, match="bool"):
        apply_masks(params, jax.tree.map(lambda x: x.astype(jnp.float32), m))
    with pytest.raises(ValueError, match="existing"):
        make_masks(s, sparsity=0.5, existing={"fc1": m["fc1"]})


# ----------------------------------------------------------------------------- summary


def test_summary_counts_and_table(lenet):
    _, params = lenet
    new, aux = magnitude(sparsity=0.75)(params)
    kernels = select_names(params, "kernel")
    sm = summary.sparsity_summary(aux.masks, names=kernels)
    sp = summary.sparsity_summary(new, names=kernels)
    for n, c in sm["layers"].items():
        assert c["zeros"] == topk.pruned_count(0.75, c["size"])
        assert sp["layers"][n]["zeros"] >= c["zeros"]  # a kept weight may itself be 0
    assert sm["total"]["size"] == sum(c["size"] for c in sm["layers"].values())
    table = summary.format_summary(sm)
    assert "total" in table and re.search(r"fc1/kernel\s+[\d,]+\s+[\d,]+\s+75\.00%", table)
    full = summary.sparsity_summary(aux.masks)
    assert full["layers"]["fc1/bias"]["zeros"] == 0


# ----------------------------------------------------------------------------- validation (no silent empty layers)


@pytest.mark.parametrize(
    "pattern, sparsity, what",
    [(None, 1.0, "weight"), (None, 0.97, "weight"), (Units(), 0.9, "unit"), (Block(2, 2), 0.9, "block")],
)
def test_emptying_a_layer_raises_unless_allowed(pattern, sparsity, what):
    params = {"fc1": {"kernel": jnp.arange(1.0, 17.0).reshape(4, 4)}, "fc2": {"kernel": jnp.ones((4, 16))}}
    kw = {} if pattern is None else {"pattern": pattern}
    t = masked(magnitude(sparsity=sparsity, **kw), "fc1")
    with pytest.raises(ValueError, match=rf"fc1/kernel \(shape \(4, 4\), 16 weights\) would lose every {what}"):
        t(params)
    with pytest.raises(ValueError, match="allow_empty=True"):
        jax.jit(t)(params)  # the counts are static: the check also runs under jit
    new, aux = masked(magnitude(sparsity=sparsity, allow_empty=True, **kw), "fc1")(params)
    assert not np.asarray(aux.masks["fc1"]["kernel"]).any() and not np.asarray(new["fc1"]["kernel"]).any()
    assert np.asarray(aux.masks["fc2"]["kernel"]).all()


def test_global_scope_never_empties_a_layer_silently():
    params = {"big": {"kernel": jnp.full((8, 8), 10.0)}, "small": {"kernel": jnp.full((2, 2), 0.1)}}
    with pytest.raises(ValueError, match=r"small/kernel \(shape \(2, 2\), 4 weights\)"):
        magnitude(sparsity=0.06, scope="global")(params)
    _, aux = magnitude(sparsity=0.06, scope="global", allow_empty=True)(params)
    assert int(np.sum(aux.masks["big"]["kernel"])) == 64 and not np.asarray(aux.masks["small"]["kernel"]).any()
    with pytest.raises(ValueError, match="emptied"):
        magnitude(sparsity=1.0, scope="global")(params)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_non_finite_weights_are_rejected_with_the_leaf_name(bad):
    params = {"fc1": {"kernel": jnp.ones((4, 4)).at[1, 2].set(bad)}, "fc2": {"kernel": jnp.ones((4, 4))}}
    for t in (magnitude(sparsity=0.5), jc_random(sparsity=0.5), magnitude(sparsity=0.5, scope="global")):
        with pytest.raises(ValueError, match=r"params/fc1/kernel contains NaN or inf"):
            t(params, key=jax.random.key(0))


@pytest.mark.parametrize("sparsity", [np.float32(0.5), np.float64(0.5), jnp.float32(0.5), 0.5])
def test_numpy_and_jax_scalars_are_accepted_as_sparsity(lenet, sparsity):
    _, params = lenet
    want = magnitude(sparsity=0.5)(params)[1].masks
    chex.assert_trees_all_equal(magnitude(sparsity=sparsity)(params)[1].masks, want)
    chex.assert_trees_all_equal(magnitude(sparsity={"kernel": sparsity})(params)[1].masks, want)
    assert topk.pruned_count(sparsity, 10) == 5


def test_random_pruning_needs_a_key_and_is_exact(lenet):
    _, params = lenet
    t = jc_random(sparsity=0.6)
    _, a = t(params, key=jax.random.key(0))
    _, b = jax.jit(t)(params, key=jax.random.key(0))
    chex.assert_trees_all_equal(a.masks, b.masks)
    for n in select_names(params, None):
        x = np.asarray(tree.get_by_name(a.masks, n))
        assert _zeros(x) == topk.pruned_count(0.6, x.size)


# ----------------------------------------------------------------------------- fuzz


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.sampled_from([0, 1, 2, 4, 8]), st.sampled_from([1, 2, 4, 6])), min_size=1, max_size=3),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    sparsity=st.one_of(
        st.floats(-0.5, 1.5), st.sampled_from([None, float("nan"), float("inf"), np.float32(0.5), 0.0, 1.0])
    ),
    pattern=st.sampled_from([Unstructured(), NM(2, 4), NM(1, 2), Block(2, 2), Units()]),
    scope=st.sampled_from(["layer", "global"]),
    poison=st.sampled_from([None, np.nan, np.inf]),
    seed=st.integers(0, 1000),
)
def test_fuzz_magnitude_raises_a_named_error_or_keeps_its_invariants(
    shapes, dtype, sparsity, pattern, scope, poison, seed
):
    rng = np.random.default_rng(seed)
    params = {
        f"l{i}": {"kernel": jnp.asarray(rng.standard_normal(s), dtype), "bias": jnp.zeros((s[1],), dtype)}
        for i, s in enumerate(shapes)
    }
    if poison is not None and params["l0"]["kernel"].size:
        params["l0"]["kernel"] = params["l0"]["kernel"].at[0, 0].set(poison)
    try:
        new, aux = magnitude(sparsity=sparsity, pattern=pattern, scope=scope)(params)
    except (ValueError, TypeError) as e:
        assert re.search(r"sparsity|pattern|scope|l\d/kernel", str(e)), str(e)
        return
    assert poison is None or params["l0"]["kernel"].size == 0
    assert sparsity is None or 0.0 <= float(sparsity) <= 1.0
    for name, w in tree.named_leaves(params):
        m = np.asarray(tree.get_by_name(aux.masks, name))
        got = tree.get_by_name(new, name)
        assert m.dtype == bool and m.shape == w.shape and got.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.where(m, np.asarray(w, np.float32), 0))
        if name.endswith("bias"):
            assert m.all()
        else:
            assert m.any()  # never emptied without allow_empty=True
            if isinstance(pattern, Unstructured) and scope == "layer":
                assert _zeros(m) == topk.pruned_count(sparsity, m.size)
            if isinstance(pattern, NM):
                groups = np.moveaxis(m, -2, -1).reshape(-1, pattern.m)
                assert np.all(groups.sum(axis=1) == pattern.n)
