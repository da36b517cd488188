"""Property-based fuzz of the public transforms: a clear error or a correct result, never a silent wrong one.

Random parameter trees (nested dicts of kernels and biases; shapes with size-1 and empty
dimensions; float16, bfloat16 and float32; now and then a NaN or an inf, or integer
leaves) and random hyperparameters inside and outside their ranges are given to every
factory of the README's "Every transform" table that runs without a model or data
(calibration statistics are made here from random inputs, as ``oneshot.calibrate``
makes them). Each call must either

* raise ValueError or TypeError whose message names the argument or the leaf, or
* return a result with the transform's invariants: exact pruned counts, shapes and
  dtypes kept, finite values, masks respected, at most ``k`` shared values, codes inside
  the ``bits`` grid, and a compressed file that reads back to the same values;

and an input that is certainly invalid (NaN or inf in a touched leaf, an integer or empty
touched leaf, a value outside the argument's range, zero calibration tokens) must raise.
The example budget is fixed (``derandomize=True``), so the file runs in the same time and
on the same examples everywhere.
"""

from __future__ import annotations

import math
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from jcompress import compressed, export, lowrank, oneshot, pruning, quant, sharing
from jcompress import tree as jtree
from jcompress.core import base
from jcompress.core.grid import code_range
from jcompress.core.patterns import NM, Block, Units, Unstructured

FUZZ = settings(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)
KEY = jax.random.key(0)


# ----------------------------------------------------------------------------- strategies


def mostly(arg: str, good, bad, *, odds: int = 3):
    """``good`` ``odds`` times out of ``odds + 1``, else ``bad``: most examples get past the checks.

    Which list a value came from is a hypothesis event (``'sparsity: invalid value'``), so
    the statistics (and TESTING.md) count the inputs tried by kind.
    """

    def tagged(ok):
        label = f"{arg}: {'valid' if ok else 'invalid'} value"
        return (good if ok else bad).map(lambda v: (event(label), v)[1])

    # invalid first: hypothesis favours the first choices of a sampled_from, and with the
    # invalid choice last a fixed budget of examples can draw none at all
    return st.sampled_from([False] + [True] * odds).flatmap(tagged)


@st.composite
def arrays(draw, ndim: int, *, dims=(1, 2, 4)):
    """A finite float leaf of a random shape and dtype; normal values, sometimes with exact zeros."""
    shape = [draw(st.sampled_from(dims)) for _ in range(ndim)]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    values = rng.normal(size=shape) * draw(st.sampled_from([1e-2, 1.0, 30.0]))
    if values.size and draw(st.integers(0, 4)) == 0:  # exact zeros, as after pruning
        values[rng.random(size=shape) < 0.4] = 0.0
    return jnp.asarray(values, draw(st.sampled_from(DTYPES)))


FAULTS = ("nan", "inf", "int", "empty")


def with_fault(draw, params: dict, faults=FAULTS) -> dict:
    """``params`` with one leaf (a kernel three times in four) spoiled one in three times."""
    fault = draw(st.sampled_from([None, None, *faults]))
    event(f"params: {'finite floats' if fault is None else f'one leaf {fault}'}")
    if fault is None:
        return params
    named = leaves(params)
    ks = [n for n in named if n.endswith("kernel")]
    name = draw(st.sampled_from(ks if fault == "empty" or draw(st.integers(0, 3)) else sorted(named)))
    x = named[name]
    if fault == "int":
        x = jnp.round(jnp.asarray(x, jnp.float32)).astype(jnp.int32)
    elif fault == "empty":
        shape = list(x.shape)
        shape[draw(st.integers(0, len(shape) - 1))] = 0
        x = jnp.zeros(shape, x.dtype)
    else:
        flat = np.array(x, np.float32).ravel()
        flat[draw(st.integers(0, flat.size - 1))] = (
            np.nan if fault == "nan" else draw(st.sampled_from([np.inf, -np.inf]))
        )
        x = jnp.asarray(flat.reshape(x.shape), x.dtype)
    return jtree.set_by_name(params, {name: x})


@st.composite
def param_trees(draw, *, kernel_ndim=(2, 2, 2, 3, 4), faults=FAULTS, dims=(1, 2, 4)):
    """``{'l0': {'kernel', 'bias'}, ...}``, sometimes nested under ``'block'``; one leaf spoiled now and then."""
    params = {}
    for i in range(draw(st.integers(1, 3))):
        kernel = draw(arrays(draw(st.sampled_from(kernel_ndim)), dims=dims))
        params[f"l{i}"] = {"kernel": kernel, "bias": draw(arrays(1, dims=dims))}
    if len(params) > 1 and draw(st.booleans()):
        params = {"block": {k: params[k] for k in list(params)[1:]}, "l0": params["l0"]}
    return with_fault(draw, params, faults) if faults else params


def sparsities():
    """In range (plain, numpy scalar, per-leaf spec) and out of range (negative, > 1, NaN, bool, str)."""
    inside = st.floats(0.0, 1.0, allow_nan=False)
    return mostly(
        "sparsity",
        st.one_of(inside, inside.map(np.float32), st.tuples(inside, inside).map(lambda p: {"l0/": p[0], ".*": p[1]})),
        st.sampled_from([-0.25, 1.5, float("nan"), float("inf"), True, "0.5"]),
    )


def patterns():
    return st.sampled_from([Unstructured()] * 5 + [NM(2, 4), NM(1, 2), Units(), Units(axis=0), Block(2, 2)])


# ----------------------------------------------------------------------------- helpers


def leaves(params) -> dict:
    return dict(jtree.named_leaves(params))


def kernels(params) -> dict:
    """The leaves a transform touches by default (Dense and conv kernels)."""
    return {n: x for n, x in leaves(params).items() if jtree.default_selection(n, x)}


def is_bad_leaf(x) -> bool:
    """Integer, empty or non-finite: no transform may return a result for such a touched leaf."""
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.size == 0:
        return True
    return not bool(np.isfinite(np.asarray(x, np.float32)).all())


def pruned_count(sparsity: float, size: int) -> int:
    """Round half up, the rule the README states for every mask."""
    return math.floor(sparsity * size + 0.5)


def in_unit_range(value, *, hi_open: bool = False) -> bool:
    if isinstance(value, (bool, str)):
        return False
    v = float(value)
    return 0.0 <= v < 1.0 if hi_open else 0.0 <= v <= 1.0


def per_leaf(spec, name: str):
    """A plain value, or the value of the first regex of ``{'l0/': a, '.*': b}`` matching ``name``."""
    if isinstance(spec, dict):
        return spec["l0/"] if name.startswith("l0/") else spec[".*"]
    return spec


def assert_clear_error(error: Exception, params, *args: str) -> None:
    """ValueError or TypeError whose message names one of ``args``, a leaf or a layer of ``params``."""
    assert isinstance(error, (ValueError, TypeError)), f"{type(error).__name__}: {error}"
    message = str(error)
    names = list(leaves(params))
    tokens = [*args, *names, *(n.rsplit("/", 1)[0] for n in names)]
    assert any(t in message for t in tokens), f"the message names none of {tokens}: {message}"


def call(make, params, *args: str, **kw):
    """``make()(params, **kw)``; None after checking that a raised error is a clear one.

    Each outcome is a hypothesis event, so ``--hypothesis-show-statistics`` (and TESTING.md)
    shows how many examples were refused and how many were checked.
    """
    try:
        out = make()(params, **kw)
    except (ValueError, TypeError) as e:
        assert_clear_error(e, params, *args)
        event(f"refused with {type(e).__name__}")
        return None
    event("returned a result (invariants checked)")
    return out


def assert_same_leaves(old, new, names) -> None:
    """``new`` has ``old``'s structure, shapes and dtypes; the leaves not in ``names`` are unchanged."""
    jtree.check_same_structure(old, new, "params", "result")
    lo, ln = leaves(old), leaves(new)
    for n in lo:
        assert ln[n].shape == lo[n].shape and ln[n].dtype == lo[n].dtype, n
        if n not in names:
            assert np.array_equal(np.asarray(ln[n]), np.asarray(lo[n]), equal_nan=True), n
        else:
            assert np.isfinite(np.asarray(ln[n], np.float32)).all(), n


def f32(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32))


# ----------------------------------------------------------------------------- pruning


def unit_keep(mask: np.ndarray, pattern) -> np.ndarray:
    """Kept flags per prunable unit, checking that the mask is constant within each unit."""
    if isinstance(pattern, Units):
        ax = pattern.axis % mask.ndim
        others = tuple(i for i in range(mask.ndim) if i != ax)
        keep = mask.any(axis=others)
        view = [1] * mask.ndim
        view[ax] = -1
        assert np.array_equal(np.broadcast_to(keep.reshape(view), mask.shape), mask)
        return keep
    if isinstance(pattern, Block):
        mat = mask.reshape(-1, mask.shape[-1])
        tiles = mat.reshape(mat.shape[0] // pattern.rows, pattern.rows, mat.shape[1] // pattern.cols, pattern.cols)
        keep = tiles.any(axis=(1, 3))
        assert np.array_equal(tiles, np.broadcast_to(keep[:, None, :, None], tiles.shape))
        return keep.ravel()
    return mask.ravel()


def score_tree(kind: str, params, seed: int):
    """The data a pruning factory takes: gradients (taylor), a Hessian diagonal (obd) or scores."""
    rng = np.random.default_rng(seed)

    def one(x):
        values = rng.normal(size=x.shape)
        return jnp.asarray(np.abs(values) if kind in ("obd", "by_scores") else values, jnp.float32)

    return jax.tree.map(one, params)


@settings(FUZZ, max_examples=25)
@given(
    params=param_trees(),
    kind=st.sampled_from(["magnitude", "random", "by_scores", "taylor", "obd"]),
    sparsity=sparsities(),
    pattern=patterns(),
    plan=st.sampled_from([("layer", "uniform")] * 3 + [("global", "uniform"), ("layer", "erk")]),
    allow_empty=st.booleans(),
    seed=st.integers(0, 100),
)
def test_pruning(params, kind, sparsity, pattern, plan, allow_empty, seed):
    """jc.pruning.magnitude, random, by_scores, taylor, obd: exact pruned counts per leaf, unit, N:M group or in all; pruned entries zero, kept ones unchanged."""
    scope, distribution = plan
    kw = {
        "sparsity": sparsity,
        "pattern": pattern,
        "scope": scope,
        "distribution": distribution,
        "allow_empty": allow_empty,
    }
    data = () if kind in ("magnitude", "random") else (score_tree(kind, params, seed),)
    out = call(lambda: getattr(pruning, kind)(*data, **kw), params, *kw, key=KEY)
    touched = kernels(params)
    nm = isinstance(pattern, NM)
    bad_sparsity = not nm and not all(in_unit_range(per_leaf(sparsity, n)) for n in touched)
    if out is None:
        return
    assert not bad_sparsity, f"sparsity={sparsity!r} was accepted"
    assert not any(is_bad_leaf(x) for x in touched.values()), "a NaN/inf, integer or empty kernel was pruned"
    new, aux = out
    assert isinstance(aux, base.MaskAux)
    assert_same_leaves(params, new, touched)
    masks, old_leaves, new_leaves = leaves(aux.masks), leaves(params), leaves(new)
    for n, m in masks.items():
        m = np.asarray(m)
        assert m.dtype == bool and m.shape == old_leaves[n].shape, n
        # pruned entries are exactly zero, kept ones exactly unchanged
        assert np.array_equal(f32(new_leaves[n]), np.where(m, f32(old_leaves[n]), 0), equal_nan=True), n
        if n not in touched:
            assert m.all(), n
    for n in touched:
        assert 0.0 <= float(aux.errors[n]) <= 1.0 + 1e-6, (n, aux.errors[n])
        if not allow_empty:
            assert np.asarray(masks[n]).any(), f"{n} was emptied without allow_empty"
    if nm:  # exactly n kept in every group of m along the pattern's axis
        for n in touched:
            m = np.moveaxis(np.asarray(masks[n]), pattern.axis, -1)
            groups = m.reshape(*m.shape[:-1], -1, pattern.m)
            assert (groups.sum(-1) == pattern.n).all(), n
        return
    units = {n: unit_keep(np.asarray(masks[n]), pattern) for n in touched}
    removed = {n: int((~u).sum()) for n, u in units.items()}
    if scope == "global":
        total = sum(u.size for u in units.values())
        assert sum(removed.values()) == pruned_count(float(sparsity), total)
    elif distribution == "erk":
        if isinstance(pattern, Unstructured):
            total = sum(u.size for u in units.values())
            assert sum(removed.values()) == pruned_count(float(sparsity), total)
    else:
        for n, u in units.items():
            assert removed[n] == pruned_count(float(per_leaf(sparsity, n)), u.size), n


# ----------------------------------------------------------------------------- low rank


@settings(FUZZ, max_examples=15)
@given(
    params=param_trees(kernel_ndim=(2, 2, 3)),
    rule=st.one_of(
        st.tuples(
            st.just("rank"), mostly("rank", st.sampled_from([1, 2, np.int64(2)]), st.sampled_from([-1, 0, 2.0, 9]))
        ),
        st.tuples(st.just("energy"), mostly("energy", st.floats(0.01, 1.0), st.sampled_from([0.0, 1.5, float("nan")]))),
        st.tuples(
            st.just("budget"), mostly("budget", st.floats(0.05, 1.0), st.sampled_from([0.0, -1.0, float("inf")]))
        ),
    ),
    method=st.sampled_from(["exact", "exact", "randomized"]),
)
@example(params={"l0": {"kernel": jnp.zeros((0, 1)), "bias": jnp.zeros(1)}}, rule=("budget", 1.0), method="exact")
@example(params={"l0": {"kernel": jnp.zeros((0, 1)), "bias": jnp.zeros(1)}}, rule=("energy", 1.0), method="exact")
@example(params={"l0": {"kernel": jnp.full((1, 1), jnp.nan, jnp.bfloat16)}}, rule=("rank", 1), method="exact")
def test_lowrank_svd(params, rule, method):
    """jc.lowrank.svd: rank, energy or budget, exact or randomized; ranks in range, params equal to the factors' product, error within the energy."""
    name, value = rule
    out = call(lambda: lowrank.svd(**{name: value}, method=method), params, name, "method", key=KEY)
    touched = kernels(params)
    if out is None:
        return
    assert not any(is_bad_leaf(x) for x in touched.values())
    if name == "rank":
        assert not isinstance(value, float) and value >= 1
    else:
        assert 0 < value <= 1
    assert method == "exact" or name != "energy"
    new, aux = out
    assert_same_leaves(params, new, touched)
    for n, w in touched.items():
        m, k = int(np.prod(w.shape[:-1])), w.shape[-1]
        r = aux.ranks[n]
        assert isinstance(r, int) and 1 <= r <= min(m, k), (n, r)
        if name == "rank":
            assert r == value
        us, v = aux.factors[n]
        assert us.shape == (m, r) and v.shape == (r, k)
        product = np.asarray(us @ v).reshape(w.shape)
        scale = float(np.abs(product).max()) + 1e-30
        np.testing.assert_allclose(
            f32(leaves(new)[n]), f32(jnp.asarray(product, w.dtype)), rtol=1e-2, atol=1e-2 * scale
        )
        error = float(aux.errors[n])
        assert 0.0 <= error <= 1.0 + 1e-5
        if name == "energy" and method == "exact":
            assert error <= 1.0 - value + 1e-4, (n, error, value)


# ----------------------------------------------------------------------------- k-means


@settings(FUZZ, max_examples=20)
@given(
    params=param_trees(kernel_ndim=(2,), dims=(2, 4)),
    k=mostly("k", st.sampled_from([1, 3, np.int32(3)]), st.sampled_from([-1, 0, 2.0, 200])),
    init=st.sampled_from(["linear", "density", "random", "kmeans++"]),
    shared=st.booleans(),
    preserve_zeros=st.booleans(),
)
@example(
    params={"l0": {"kernel": jnp.zeros((0, 2))}, "l1": {"kernel": jnp.arange(1.0, 5.0).reshape(2, 2)}},
    k=1,
    init="linear",
    shared=True,
    preserve_zeros=False,
)
def test_kmeans(params, k, init, shared, preserve_zeros):
    """jc.sharing.kmeans: every weight a codebook entry, at most k distinct nonzero values, zeros kept."""
    kw = {"k": k, "init": init, "shared": shared, "preserve_zeros": preserve_zeros, "iters": 20}
    out = call(lambda: sharing.kmeans(**kw), params, *kw, key=KEY)
    touched = kernels(params)
    if out is None:
        return
    assert not isinstance(k, float) and int(k) >= 1
    assert not any(is_bad_leaf(x) for x in touched.values())
    new, aux = out
    assert_same_leaves(params, new, touched)
    new_leaves = leaves(new)
    for group, members in aux.indices.items():
        codebook = np.asarray(aux.codebooks[group])
        assert codebook.shape == (int(k) + 1,) and codebook[0] == 0
        for n, idx in members.items():
            idx = np.asarray(idx)
            assert idx.shape == touched[n].shape and idx.min() >= 0 and idx.max() <= int(k)
            assert np.array_equal(f32(new_leaves[n]), f32(codebook[idx])), n
            values = f32(new_leaves[n])
            assert len(np.unique(values[values != 0])) <= int(k), n
            if preserve_zeros:
                assert (values[f32(touched[n]) == 0] == 0).all(), n


# ----------------------------------------------------------------------------- quantization


@settings(FUZZ, max_examples=15)
@given(
    params=param_trees(dims=(2, 4)),
    bits=mostly("bits", st.sampled_from([2, 3, 4, 8, np.int8(4)]), st.sampled_from([0, 1, 17, 4.0])),
    axis=mostly("axis", st.sampled_from([-1, 0, None]), st.just(5)),
    group_size=mostly("group_size", st.sampled_from([None, None, 1, 2]), st.sampled_from([0, 3])),
    symmetric=st.booleans(),
    rounding=st.sampled_from(["nearest", "nearest", "stochastic"]),
)
def test_quantize(params, bits, axis, group_size, symmetric, rounding):
    """jc.quant.quantize: codes inside the bits grid, params equal to the dequantized grid, zeros kept (symmetric)."""
    kw = {"bits": bits, "axis": axis, "group_size": group_size, "symmetric": symmetric, "rounding": rounding}
    out = call(lambda: quant.quantize(**kw), params, *kw, key=KEY)
    touched = kernels(params)
    if out is None:
        return
    assert not isinstance(bits, float) and (2 if symmetric else 1) <= int(bits) <= 16
    assert group_size is None or group_size >= 1
    assert not any(is_bad_leaf(x) for x in touched.values())
    new, aux = out
    assert_same_leaves(params, new, touched)
    qmin, qmax = code_range(int(bits), symmetric)
    for n, w in touched.items():
        qp = aux.grids[n]
        codes = np.asarray(qp.codes)
        assert codes.shape == w.shape and codes.min() >= qmin and codes.max() <= qmax, n
        assert len(np.unique(codes)) <= 2 ** int(bits)
        assert np.array_equal(f32(leaves(new)[n]), f32(qp.dequantize(w.dtype))), n
        if symmetric:  # zero is on every symmetric grid
            assert (f32(leaves(new)[n])[f32(w) == 0] == 0).all(), n
        assert np.isfinite(float(aux.errors[n]))


# ----------------------------------------------------------------------------- one-shot


@st.composite
def calibrated(draw):
    """Params of 2-D kernels and statistics ``H = X^T X`` of random inputs, as ``oneshot.calibrate`` makes them.

    One time in three, one layer gets no calibration rows (zero tokens), inputs of the
    wrong width, or a NaN in its statistic.
    """
    params = draw(param_trees(kernel_ndim=(2,)))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    names = list(kernels(params))
    fault = draw(st.sampled_from([None, None, None, None, "no tokens", "wrong width", "NaN"]))
    event(f"stats: {'valid' if fault is None else f'one layer with {fault}'}")
    spoiled = draw(st.sampled_from(names))
    stats = {}
    for n in names:
        n_in = leaves(params)[n].shape[0]
        rows = 0 if (fault == "no tokens" and n == spoiled) else draw(st.sampled_from([1, 4, 16]))
        width = n_in + 1 if (fault == "wrong width" and n == spoiled) else n_in
        x = rng.normal(size=(rows, width)).astype(np.float32)
        h = x.T @ x
        if fault == "NaN" and n == spoiled and h.size:
            h[0, 0] = np.nan
        stats[n] = oneshot.LayerStats(jnp.asarray(h), jnp.float32(rows))
    return params, stats


def stats_ok(params, stats) -> bool:
    ks = kernels(params)
    return all(
        float(s.count) > 0 and s.h.shape == (ks[n].shape[0],) * 2 and bool(jnp.isfinite(s.h).all())
        for n, s in stats.items()
    )


def check_pruned(params, new, aux, stats, sparsity, pattern, *, per_output: bool) -> None:
    masks = leaves(aux.masks)
    for n in stats:
        w, m = leaves(params)[n], np.asarray(masks[n])
        assert m.shape == w.shape and (f32(leaves(new)[n])[~m] == 0).all(), n
        if isinstance(pattern, NM):
            groups = m.T.reshape(w.shape[1], -1, pattern.m)
            assert (groups.sum(-1) == pattern.n).all(), n
        elif per_output:  # Wanda and OBS: the same count in every output unit
            assert ((~m).sum(axis=0) == pruned_count(float(per_leaf(sparsity, n)), w.shape[0])).all(), n
        else:
            assert (~m).sum() == pruned_count(float(per_leaf(sparsity, n)), w.size), n
        assert np.isfinite(float(aux.errors[n])) and float(aux.errors[n]) >= 0, n


@settings(FUZZ, max_examples=15)
@given(
    data=calibrated(),
    method=st.sampled_from(["sparsegpt", "sparsegpt", "wanda", "obs", "gptq", "gptq"]),
    sparsity=sparsities(),
    pattern=st.sampled_from([Unstructured()] * 3 + [NM(2, 4), NM(1, 2)]),
    bits=mostly("bits", st.sampled_from([None, 2, 4, 8]), st.sampled_from([0, 1, 17, 4.5])),
    group_size=mostly("group_size", st.sampled_from([None, None, 2, 4]), st.sampled_from([0, 3])),
)
@example(
    data=(
        {"l0": {"kernel": jnp.zeros((1, 0)), "bias": jnp.zeros(1)}},
        {"l0/kernel": oneshot.LayerStats(jnp.ones((1, 1)), jnp.float32(1))},
    ),
    method="obs",
    sparsity=0.0,
    pattern=Unstructured(),
    bits=None,
    group_size=None,
)
@example(
    data=(
        {"l0": {"kernel": jnp.ones((1, 1)), "bias": jnp.zeros(1)}},
        {"l0/kernel": oneshot.LayerStats(jnp.ones((1, 1)), jnp.float32(1))},
    ),
    method="obs",
    sparsity=0.0,
    pattern=Unstructured(),
    bits=None,
    group_size=None,
)
def test_oneshot(data, method, sparsity, pattern, bits, group_size):
    """jc.oneshot.sparsegpt, gptq, wanda, obs: statistics of random inputs; exact counts (per layer or output), codes in the grid."""
    params, stats = data
    if method == "sparsegpt":
        kw = {"sparsity": sparsity, "pattern": pattern, "bits": bits, "block_size": 4}
    elif method == "wanda":
        kw = {"sparsity": sparsity, "pattern": pattern}
    elif method == "obs":
        kw = {"sparsity": sparsity}
    else:
        kw = {"bits": 4 if bits is None else bits, "group_size": group_size, "block_size": 4}
    out = call(lambda: getattr(oneshot, method)(stats, **kw), params, *kw, "stats", key=None)
    if out is None:
        return
    touched = {n: leaves(params)[n] for n in stats}
    assert stats_ok(params, stats), "zero-token, wrong-width or NaN statistics were accepted"
    assert not any(is_bad_leaf(x) for x in touched.values())
    new, aux = out
    assert_same_leaves(params, new, touched)
    nm = isinstance(kw.get("pattern"), NM)
    if "sparsity" in kw and not nm:
        assert all(in_unit_range(per_leaf(sparsity, n), hi_open=True) for n in stats), f"sparsity={sparsity!r}"
    if method == "gptq":
        qmin, qmax = code_range(kw["bits"], True)
        for n, w in touched.items():
            codes = np.asarray(aux.grids[n].codes)
            assert codes.min() >= qmin and codes.max() <= qmax
            assert np.array_equal(f32(leaves(new)[n]), f32(aux.grids[n].dequantize(w.dtype))), n
        return
    masks = aux[0] if isinstance(aux, base.ChainAux) else aux
    check_pruned(params, new, masks, stats, sparsity, kw.get("pattern"), per_output=method != "sparsegpt")


# ----------------------------------------------------------------------------- chain, masked, compress, export


@settings(FUZZ, max_examples=6)
@given(
    params=param_trees(kernel_ndim=(2,), faults=None, dims=(4,)),
    sparsity=st.floats(0.0, 0.9),
    second=st.sampled_from(["kmeans", "quantize", "none"]),
    k=st.sampled_from([1, 3]),
    bits=st.sampled_from([2, 8]),
    only_first_layer=st.booleans(),
)
def test_chain_masked_compress_export_round_trip(params, sparsity, second, k, bits, only_first_layer):
    """jc.chain, jc.masked, jc.compressed.compress, jc.export.write, load_params: removed weights stay removed, the file reads back exactly."""
    stages = [pruning.magnitude(sparsity=sparsity, allow_empty=True)]
    if second == "kmeans":
        stages.append(sharing.kmeans(k=k, iters=20))
    elif second == "quantize":
        stages.append(quant.quantize(bits=bits))
    if only_first_layer:
        stages = [base.masked(s, r"^l0/kernel$") for s in stages]
    t = base.chain(*stages)
    touched = {n: x for n, x in kernels(params).items() if not only_first_layer or n == "l0/kernel"}
    out = call(lambda: t, params, "k", "sparsity", "bits")
    if out is None:
        return
    new, aux = out
    assert isinstance(aux, base.ChainAux) and len(aux) == len(stages)
    assert_same_leaves(params, new, touched)
    masks = leaves(aux[0].masks)
    for n, x in leaves(new).items():  # what the pruning stage removed stays removed after the second stage
        assert (f32(x)[~np.asarray(masks[n])] == 0).all(), n
    ctree = compressed.compress(new, aux)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.jcz")
        size = export.write(path, ctree)
        assert size == os.path.getsize(path)
        back = leaves(export.load_params(path))
    for n, x in leaves(new).items():
        assert np.array_equal(f32(jnp.asarray(back[n], x.dtype)), f32(x)), n
