"""K-means weight sharing (Deep Compression, Han et al. 2016, section 3).

The weights of a layer (or of several layers sharing one codebook) are clustered in one
dimension into ``k`` centroids; every weight is then replaced by its centroid, so a layer
is stored as a small codebook plus one ``log2(k)``-bit index per weight.

**Sparsity is preserved.** Exact zeros (pruned weights) take no part in the clustering
and stay exactly zero. Index 0 is reserved for them: a codebook has ``k + 1`` entries,
``codebook[0] == 0`` and ``codebook[1:]`` are the ``k`` sorted centroids, so
``params == codebook[indices]`` holds for every weight, pruned or not. With
``k = 2**b - 1`` the indices of a pruned layer fit exactly in ``b`` bits.

**Fast 1-D Lloyd.** In one dimension the clusters of sorted centroids are contiguous
ranges of the sorted data, split at the midpoints between neighbouring centroids. The
weights are sorted once (``O(n log n)``); each Lloyd iteration then finds the range
boundaries with ``searchsorted`` of the ``k - 1`` midpoints into the sorted weights and
the cluster sums from prefix sums, ``O(k log n)`` per iteration instead of ``O(n k)``.
The iteration stops when the assignment no longer changes (as scikit-learn's Lloyd with
``tol=0``) or after ``iters`` iterations; the final labels are the nearest centroids.
An empty cluster takes one of the points farthest from their centre, as in
scikit-learn (with the linear initialisation the outermost centroids often start empty).

Initialisations (the paper finds linear best): ``'linear'`` (``k`` points evenly spaced
over ``[min, max]``), ``'density'`` (the data's quantiles at levels ``(j + 0.5) / k``,
evenly spaced on the CDF), ``'random'`` (Forgy: ``k`` distinct data points, needs a key),
``'kmeans++'`` (D^2 sampling, needs a key).

:func:`kmeans` is the params transform (``kmeans(k=31)(params) -> (params, CodebookAux)``);
:func:`kmeans_1d` clusters one array.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import tree
from jcompress.core import base
from jcompress.core import spec as spec_lib

__all__ = ["INITS", "KMeansResult", "kmeans", "kmeans_1d", "reconstruct"]

INITS = ("linear", "density", "random", "kmeans++")
_MIN_PADDED = 1 << 16  # kmeans_1d pads its input to at least this many entries


class KMeansResult(NamedTuple):
    """Result of :func:`kmeans_1d`.

    Attributes:
      centroids: ``(k,)`` float32, sorted ascending.
      labels: ``(n,)`` int32 in ``[0, k)`` (nearest centroid); ``-1`` where ``valid`` is false.
      inertia: scalar float32, sum of squared distances of valid points to their centroid.
      iterations: scalar int32, Lloyd iterations run.
      history: ``(iters,)`` float32 inertia of the nearest-centroid assignment after each
        iteration's update (repeated after convergence) when ``history=True``; else ``None``.
    """

    centroids: jax.Array
    labels: jax.Array
    inertia: jax.Array
    iterations: jax.Array
    history: jax.Array | None


def _sortable(v: jax.Array) -> jax.Array:
    """An int32 key with the order of float32 ``v`` (sorting ints is much faster on CPU)."""
    i = jax.lax.bitcast_convert_type(v, jnp.int32)
    return jnp.where(i < 0, i ^ 0x7FFFFFFF, i)


def _unsortable(i: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(jnp.where(i < 0, i ^ 0x7FFFFFFF, i), jnp.float32)


def _count(a: jax.Array, q: jax.Array, *, strict: bool) -> jax.Array:
    """Number of elements of sorted ``a`` that are ``< q`` (strict) or ``<= q``, per query.

    A branch-free binary search of ``floor(log2(len(a))) + 1`` steps in a ``fori_loop``
    (it compiles several times faster than ``jnp.searchsorted`` nested in the Lloyd loop).
    """
    n = a.shape[0]
    if n == 0:  # k = 1: no midpoints, every query is in the one cluster
        return jnp.zeros(q.shape, jnp.int32)
    top = max(n.bit_length() - 1, 0)

    def body(i, pos):
        cand = pos + jnp.left_shift(1, top - i)
        probe = jnp.take(a, jnp.minimum(cand, n) - 1, mode="clip")
        ok = (cand <= n) & ((probe < q) if strict else (probe <= q))
        return jnp.where(ok, cand, pos)

    return jax.lax.fori_loop(0, top + 1, body, jnp.zeros(q.shape, jnp.int32))


class _RangeSums(NamedTuple):
    """Prefix sums of the sorted values, split into an exact integer part and a float rest.

    Each value is ``q * grid + r`` with integer ``q`` (``|q| <= (2**31 - 1) / n``) and a
    small float rest ``|r| <= grid / 2``. Integer prefix sums wrap modulo 2**32, but their
    differences over any range are exact because no range sum of ``q`` can overflow; so a
    cluster's sum is exact up to the (tiny) round-off of summing the rests.
    """

    q: jax.Array
    r: jax.Array
    grid: jax.Array

    @classmethod
    def build(cls, values: jax.Array) -> _RangeSums:
        n = values.shape[0]
        levels = max((2**31 - 1) // max(n, 1), 1)
        grid = jnp.maximum(jnp.max(jnp.abs(values)), jnp.finfo(jnp.float32).tiny) / levels
        q = jnp.round(values / grid).astype(jnp.int32)
        r = values - q.astype(jnp.float32) * grid
        q_cs = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(q)])
        r_cs = jnp.concatenate([jnp.zeros((1,), r.dtype), jnp.cumsum(r)])  # |r| <= grid / 2: tiny sums
        return cls(q_cs, r_cs, grid)

    def range_sum(self, start: jax.Array, stop: jax.Array) -> jax.Array:
        dq = self.q[stop] - self.q[start]  # exact despite wrap-around
        hi = (dq >> 12).astype(jnp.float32) * 4096.0 + (dq & 4095).astype(jnp.float32)
        return hi * self.grid + (self.r[stop] - self.r[start])


@jax.jit
def _sort_valid(x, valid):
    """``(xs, n_valid)``: the valid values sorted ascending, followed by +inf."""
    xs = _unsortable(jax.lax.sort(_sortable(jnp.where(valid, x, jnp.inf)), is_stable=False))
    return xs, jnp.sum(valid).astype(jnp.int32)


@jax.jit
def _sorted_stats(x, valid, xs, n_valid):
    """``(finite, distinct)``: whether every valid value is finite, and how many distinct values
    the sorted valid values ``xs[:n_valid]`` hold."""
    finite = jnp.all(jnp.isfinite(jnp.where(valid, x, 0.0)))
    in_range = jnp.arange(1, xs.shape[0]) < n_valid
    distinct = jnp.sum(in_range & (xs[1:] != xs[:-1])) + jnp.minimum(n_valid, 1)
    return finite, distinct


def _on_cpu(x: jax.Array | np.ndarray) -> bool:
    """True for a concrete array held by host (CPU) devices, or a numpy array when JAX
    computes on the CPU."""
    if isinstance(x, np.ndarray):
        return jax.default_backend() == "cpu"
    return all(d.platform == "cpu" for d in x.devices())


@functools.partial(jax.jit, static_argnames=("k", "init"))
def _init_centroids(xs, n_valid, key, *, k, init):
    """Initial centroids from the sorted valid data ``xs[:n_valid]`` (rest is +inf)."""
    n = xs.shape[0]
    last = xs[jnp.maximum(n_valid - 1, 0)]
    if init == "linear":
        return jnp.linspace(xs[0], last, k)
    if init == "density":
        levels = (jnp.arange(k, dtype=jnp.float32) + 0.5) / k
        pos = jnp.clip(jnp.floor(levels * n_valid).astype(jnp.int32), 0, jnp.maximum(n_valid - 1, 0))
        return xs[pos]
    in_range = jnp.arange(n) < n_valid
    if init == "random":
        u = jnp.where(in_range, jax.random.uniform(key, (n,)), 2.0)
        _, pos = jax.lax.top_k(-u, k)
        return jnp.sort(xs[pos])
    # kmeans++: first centre uniform, then each next one with probability ~ D(x)^2.
    finite = jnp.where(in_range, xs, 0.0)
    keys = jax.random.split(key, k)
    first = finite[jax.random.randint(keys[0], (), 0, jnp.maximum(n_valid, 1))]
    cents = jnp.zeros((k,), xs.dtype).at[0].set(first)
    d2 = jnp.where(in_range, (finite - first) ** 2, 0.0)

    def body(j, carry):
        cents, d2 = carry
        cdf = jnp.cumsum(d2)
        r = jax.random.uniform(keys[j]) * cdf[-1]
        pos = jnp.clip(jnp.searchsorted(cdf, r, side="right"), 0, jnp.maximum(n_valid - 1, 0))
        c = finite[pos]
        return cents.at[j].set(c), jnp.minimum(d2, jnp.where(in_range, (finite - c) ** 2, 0.0))

    cents, _ = jax.lax.fori_loop(1, k, body, (cents, d2))
    return jnp.sort(cents)


def _labels(c: jax.Array, x: jax.Array) -> jax.Array:
    """Index of the nearest of the sorted centroids ``c`` for every value of ``x`` (int32;
    a value on a midpoint goes to the lower centroid): the number of midpoints below it.

    Every value is compared with 16 midpoints at a time (``O(n k)`` in all, vectorised
    over ``x``): on CPU that runs several times faster than a binary search, whose
    ``log2(k)`` dependent gathers per value do not vectorise.
    """
    if c.shape[0] == 1:
        return jnp.zeros(x.shape, jnp.int32)
    mid = (c[1:] + c[:-1]) / 2
    mid = jnp.pad(mid, (0, -mid.shape[0] % 16), constant_values=jnp.inf).reshape(-1, 16)

    def add(j, acc):
        return acc + jnp.sum(x[:, None] > mid[j][None, :], axis=1, dtype=jnp.int32)

    return jax.lax.fori_loop(0, mid.shape[0], add, jnp.zeros(x.shape, jnp.int32))


@functools.partial(jax.jit, static_argnames=("iters", "history"))
def _lloyd(x, valid, xs, n_valid, c0, *, iters, history):
    """The Lloyd iterations of :func:`kmeans_1d` from centroids ``c0`` (arguments checked).

    Initialisation is a separate compiled function, so all initialisations share this one.
    """
    n, k = x.shape[0], c0.shape[0]
    in_range = jnp.arange(n) < n_valid
    sums = _RangeSums.build(jnp.where(in_range, xs, 0.0))

    def bounds(c):
        mid = (c[1:] + c[:-1]) / 2
        inner = _count(xs, mid, strict=False)
        inner = jnp.minimum(inner, n_valid)
        return jnp.concatenate([jnp.zeros((1,), jnp.int32), inner, n_valid[None]])

    positions = jnp.arange(n)

    def update(c, b):
        cnt = jnp.diff(b)
        s = sums.range_sum(b[:-1], b[1:])
        empty = cnt == 0

        def relocate(args):
            # As scikit-learn: each empty cluster takes one of the points farthest from
            # their centre (farthest first), which leaves its old cluster.
            s, cnt = args
            labels = jnp.minimum(_count(b[1:], positions, strict=False), k - 1)
            d = jnp.where(in_range, (xs - c[labels]) ** 2, -1.0)
            _, far = jax.lax.top_k(d, k)
            p = far[jnp.clip(jnp.cumsum(empty) - 1, 0, k - 1)]
            xp = jnp.where(empty, xs[p], 0.0)
            moved = empty.astype(cnt.dtype)
            s = jnp.where(empty, xp, s) - jnp.zeros_like(s).at[labels[p]].add(xp)
            cnt = jnp.where(empty, 1, cnt) - jnp.zeros_like(cnt).at[labels[p]].add(moved)
            return s, cnt

        s, cnt = jax.lax.cond(jnp.any(empty), relocate, lambda a: a, (s, cnt))
        return jnp.where(cnt > 0, s / jnp.maximum(cnt, 1), c)

    def sorted_inertia(c):
        c = jnp.sort(c)
        labels = _labels(c, xs)
        d = jnp.where(in_range, xs - c[labels], 0.0)
        return jnp.sum(d * d)

    def cond(state):
        _, _, it, done, _ = state
        return (it < iters) & ~done

    def body(state):
        c, b_prev, it, _, hist = state
        c = jnp.sort(c)
        b = bounds(c)
        c_new = update(c, b)
        if history:
            hist = jnp.where(jnp.arange(iters) >= it, sorted_inertia(c_new), hist)
        return c_new, b, it + 1, jnp.all(b == b_prev), hist

    hist0 = jnp.zeros((iters if history else 1,), jnp.float32)
    b0 = jnp.full((k + 1,), -1, jnp.int32)
    c, _, it, _, hist = jax.lax.while_loop(
        cond, body, (c0.astype(jnp.float32), b0, jnp.int32(0), jnp.bool_(False), hist0)
    )
    labels, inertia = _assign(x, valid, c)
    return KMeansResult(jnp.sort(c), labels, inertia, it, hist if history else None)


@jax.jit
def _assign(x, valid, c):
    """``(labels, inertia)`` of the valid values of ``x`` for the centroids ``c`` (label -1
    where not valid)."""
    c = jnp.sort(c)
    labels = _labels(c, x)
    d = jnp.where(valid, x - c[labels], 0.0)
    return jnp.where(valid, labels, -1), jnp.sum(d * d)


def _lloyd_host(xs: np.ndarray, c: np.ndarray, *, iters: int, history: bool):
    """The Lloyd iterations of :func:`_lloyd` in numpy, on the sorted valid values ``xs``.

    On CPU a Lloyd iteration is a few microseconds of numpy (a ``searchsorted`` of ``k - 1``
    midpoints and ``O(k)`` arithmetic) against about 0.3 ms for a step of XLA's
    ``while_loop``, whose small operations each cost a dispatch. Same iterations, stopping
    rule and empty-cluster relocation as :func:`_lloyd`; the prefix sums are float64.

    Returns:
      ``(centroids, iterations, history)``: ``(k,)`` float32, int, ``(iters,)`` float32 or None.
    """
    n, k = xs.size, c.size
    xs64 = xs.astype(np.float64)
    cs = np.concatenate([[0.0], np.cumsum(xs64)])
    cs2 = np.concatenate([[0.0], np.cumsum(xs64 * xs64)]) if history else None
    hist = np.zeros(iters, np.float32) if history else None

    def bounds(c):
        return np.concatenate([[0], np.searchsorted(xs, (c[1:] + c[:-1]) / 2, side="right"), [n]])

    b_prev = None
    for it in range(1, iters + 1):
        c = np.sort(c)
        b = bounds(c)
        cnt, s = np.diff(b), cs[b[1:]] - cs[b[:-1]]
        empty = cnt == 0
        if empty.any():
            # Each empty cluster takes one of the points farthest from their centre
            # (farthest first, the lower position among equal distances).
            labels = np.repeat(np.arange(k), cnt)
            d = (xs - c[labels]) ** 2
            far = np.flatnonzero(d >= np.partition(d, n - k)[n - k])
            far = far[np.lexsort((far, -d[far]))][: np.count_nonzero(empty)]
            np.subtract.at(s, labels[far], xs[far])
            np.subtract.at(cnt, labels[far], 1)
            s[empty], cnt[empty] = xs[far], 1
        c = np.where(cnt > 0, s / np.maximum(cnt, 1), c).astype(np.float32)
        if history:  # inertia of the nearest-centroid ranges, from prefix sums of x and x^2
            cb = np.sort(c)
            b2, c64 = bounds(cb), cb.astype(np.float64)
            s1, s2 = cs[b2[1:]] - cs[b2[:-1]], cs2[b2[1:]] - cs2[b2[:-1]]
            hist[it - 1 :] = np.sum(s2 - 2 * c64 * s1 + np.diff(b2) * c64 * c64)
        if b_prev is not None and np.array_equal(b, b_prev):
            break
        b_prev = b
    return np.sort(c), it, hist


def kmeans_1d(
    x: jax.Array,
    *,
    k: int,
    init: str | jax.Array = "linear",
    iters: int = 300,
    key: jax.Array | None = None,
    valid: jax.Array | None = None,
    history: bool = False,
) -> KMeansResult:
    """Lloyd's k-means on the values of ``x`` (any shape, flattened), exact in 1-D.

    Args:
      x: float array; all of its values are clustered unless ``valid`` says otherwise.
      k: number of centroids (>= 1).
      init: ``'linear'``, ``'density'``, ``'random'``, ``'kmeans++'``, or a ``(k,)`` array
        of initial centroids.
      iters: maximum Lloyd iterations (>= 1); stops earlier when the assignment is stable.
      key: PRNG key, required for ``'random'`` and ``'kmeans++'``.
      valid: optional bool array of ``x``'s shape; only these values are clustered (the
        others get label -1). :func:`kmeans` passes ``x != 0``.
      history: also return the inertia after every iteration (``O(n log k)`` each).

    Returns:
      :class:`KMeansResult`.

    Raises:
      ValueError: bad ``k``/``iters``/``init``, a missing key, non-finite values, or (when
        ``x`` is concrete) ``k`` larger than the number of distinct valid values.

    Example:
      >>> res = kmeans_1d(w, k=32)               # w: (300, 100) float32
      >>> w_shared = res.centroids[res.labels].reshape(w.shape)
    """
    if isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating):
        x = x.reshape(-1).astype(np.float32, copy=False)  # stays on the host (see _on_cpu)
    else:
        x = tree.as_float_array(x, "x").reshape(-1).astype(jnp.float32)
    n = x.shape[0]
    k = spec_lib.check_value(k, arg="k", kind=int, lo=1)
    iters = spec_lib.check_value(iters, arg="iters", kind=int, lo=1)
    explicit = not isinstance(init, str)
    if explicit:
        init_arr = jnp.asarray(init, jnp.float32).reshape(-1)
        if init_arr.shape != (k,):
            raise ValueError(f"init array must have shape ({k},), got {init_arr.shape}")
    elif init not in INITS:
        raise ValueError(f"init must be one of {INITS} or a (k,) array, got {init!r}")
    elif init in ("random", "kmeans++") and key is None:
        raise ValueError(f"init={init!r} draws random points: pass key=jax.random.key(seed)")
    if n == 0:
        raise ValueError("x is empty; nothing to cluster")
    if valid is not None:
        valid = (np.asarray if isinstance(valid, np.ndarray) else jnp.asarray)(valid, bool).reshape(-1)
        if valid.shape != (n,):
            raise ValueError(f"valid must have x's size {n}, got {valid.shape}")
    # Pad with invalid entries to 65,536 or the next power of two, so that layers of
    # different sizes share compiled code: compiling the Lloyd loop takes ~0.5-0.8 s per
    # shape on CPU, while sorting 65,536 values takes about a millisecond.
    padded = max(_MIN_PADDED, 1 << max(n - 1, 1).bit_length())
    concrete = not isinstance(x, jax.core.Tracer) and not isinstance(valid, jax.core.Tracer)
    if concrete and _on_cpu(x):
        # On CPU numpy sorts several times faster than XLA, and runs the Lloyd iterations
        # on the sorted values without XLA's per-iteration dispatch (see _lloyd_host).
        x_host = np.asarray(x)
        valid_host = np.ones(n, bool) if valid is None else np.asarray(valid)
        xs_host = np.sort(x_host if valid is None else x_host[valid_host])
        n_valid = xs_host.size
        finite = n_valid == 0 or bool(np.isfinite(xs_host[0]) and np.isfinite(xs_host[-1]))  # NaN sorts last
        distinct = int(np.count_nonzero(xs_host[1:] != xs_host[:-1])) + min(n_valid, 1)
    else:
        valid = jnp.ones((n,), bool) if valid is None else valid
        x_p, valid_p = jnp.pad(x, (0, padded - n)), jnp.pad(valid, (0, padded - n))
        xs, n_valid = _sort_valid(x_p, valid_p)
        if concrete:
            finite, distinct = (v.item() for v in _sorted_stats(x_p, valid_p, xs, n_valid))
    if concrete:
        if not finite:
            raise ValueError("x contains NaN or Inf; k-means of non-finite values is undefined")
        if k > distinct:
            raise ValueError(
                f"k={k} exceeds the number of distinct values to cluster ({distinct}); "
                f"use k <= {distinct} (zeros are excluded when clustering a pruned layer)"
            )
    if concrete and _on_cpu(x):
        if explicit:
            c0 = init_arr
        else:
            xs = jnp.asarray(np.pad(xs_host, (0, padded - n_valid), constant_values=np.inf))
            c0 = _init_centroids(xs, jnp.int32(n_valid), key, k=k, init=init)
        c, iterations, hist = _lloyd_host(xs_host, np.asarray(c0, np.float32), iters=int(iters), history=bool(history))
        x_p = jnp.asarray(np.pad(x_host, (0, padded - n)))
        labels, inertia = _assign(x_p, jnp.asarray(np.pad(valid_host, (0, padded - n))), jnp.asarray(c))
        hist = None if hist is None else jnp.asarray(hist)
        return KMeansResult(jnp.asarray(c), labels[:n], inertia, jnp.int32(iterations), hist)
    c0 = init_arr if explicit else _init_centroids(xs, n_valid, key, k=k, init=init)
    res = _lloyd(x_p, valid_p, xs, n_valid, c0, iters=int(iters), history=bool(history))
    return res._replace(labels=res.labels[:n])


def _groups(names: list[str], shared) -> list[tuple[str, list[str]]]:
    """``[(group, members)]``: which leaves share a codebook (see :func:`kmeans`'s ``shared``)."""
    if shared is True:
        return [("shared", list(names))]
    if shared is False or shared is None:
        return [(n, [n]) for n in names]
    labels = spec_lib.resolve(shared, names, arg="shared", default=None)
    groups: dict[str, list[str]] = {}
    own: list[tuple[str, list[str]]] = []
    for n in names:
        label = labels[n]
        if label is None or label is False:
            own.append((n, [n]))
        elif isinstance(label, str):
            if label in names and label != n:
                raise ValueError(f"shared: group name {label!r} is also a leaf name; pick another label")
            groups.setdefault(label, []).append(n)
        else:
            raise TypeError(
                f"shared: the value for {n!r} is {label!r}; a group is named by a str (None: the leaf's own codebook)"
            )
    return list(groups.items()) + own


@functools.partial(jax.jit, static_argnames=("length", "preserve_zeros"))
def _flatten_group(arrays, *, length, preserve_zeros):
    """A group's leaves as one float32 vector padded to ``length``, and its valid entries.

    One compiled function per group shape, instead of a compilation for each of the
    eager operations it replaces (on CPU those dominated k-means sharing for models with
    many layer shapes).
    """
    flat = jnp.concatenate([a.reshape(-1).astype(jnp.float32) for a in arrays])
    valid = flat != 0 if preserve_zeros else jnp.ones(flat.shape, bool)
    return jnp.pad(flat, (0, length - flat.shape[0])), jnp.pad(valid, (0, length - flat.shape[0]))


@functools.partial(jax.jit, static_argnames=("shapes", "dtype"))
def _unflatten_group(centroids, labels, *, shapes, dtype):
    """``(codebook, [indices per leaf], [codebook[indices] per leaf])`` from the group's labels."""
    codebook = jnp.concatenate([jnp.zeros((1,), jnp.float32), centroids]).astype(dtype)
    sizes = [math.prod(shape) for shape in shapes]
    idx = labels[: sum(sizes)] + 1
    parts = jnp.split(idx, np.cumsum(sizes)[:-1]) if len(sizes) > 1 else [idx]
    leaf_indices = [p.reshape(shape) for p, shape in zip(parts, shapes)]
    return codebook, leaf_indices, [codebook[i] for i in leaf_indices]


def kmeans(
    *,
    k: spec_lib.Spec,
    init: str = "linear",
    iters: int = 300,
    shared: bool | spec_lib.Spec = False,
    preserve_zeros: bool = True,
) -> base.Transform:
    """Weight sharing: replace each weight by its k-means centroid (Deep Compression).

    Args:
      k: centroids per codebook for the nonzero weights, as a spec (an int, or
        ``{regex: k}`` / ``[(regex, k)]``, first match wins). Leaves sharing a codebook
        must agree. ``k = 2**b - 1`` gives ``b``-bit indices for a pruned layer (index 0 is
        the zero). ``k`` larger than a group's distinct nonzero values is refused (under
        ``jax.jit``, where the values are not known, the surplus centroids repeat existing
        ones and every weight still keeps its exact value).
      init: ``'linear'`` (the paper's best), ``'density'``, ``'random'`` or ``'kmeans++'``
        (the last two need ``key`` at call time; group ``i`` uses ``fold_in(key, i)``).
      iters: maximum Lloyd iterations.
      shared: ``False``: one codebook per leaf; ``True``: one for all touched leaves; a
        spec of group names (``{regex: 'group'}``, first match wins): the leaves with the
        same name share a codebook, leaves that no pattern covers keep their own.
      preserve_zeros: keep exact zeros at zero and out of the clustering (default).

    Returns:
      a :class:`~jcompress.core.base.Transform`; ``t(params, *, key=None)`` returns
      ``(new_params, CodebookAux)``. ``new_params`` has the structure of ``params``; each
      touched leaf (Dense and conv kernels by default, see
      :func:`jcompress.core.base.masked`) equals ``codebooks[g][indices[g][name]]``
      exactly, in its own dtype; the other leaves are unchanged. A group is named after
      its leaf when the leaf has its own codebook, ``'shared'`` for ``shared=True``, or by
      its label. ``aux.errors[name]`` is ``||W - W_shared||^2 / ||W||^2``.

    Raises:
      ValueError naming the leaf or group: bad ``k``, a group whose leaves disagree on
        ``k`` or dtype, NaN weights, an empty leaf, ``k`` above the distinct nonzero values of a group;
        TypeError for integer leaves.

    Example:
      >>> new, aux = kmeans(k=31)(params)
      >>> aux.codebooks['fc1/kernel'].shape
      (32,)
      >>> new, aux = kmeans(k={'conv': 255, 'fc': 31}, shared={r'fc[12]': 'hidden'})(params)
    """
    if init not in INITS:
        raise ValueError(f"init={init!r} must be one of {INITS}")
    iters = spec_lib.check_value(iters, arg="iters", kind=int, lo=1)
    preserve_zeros = spec_lib.check_flag(preserve_zeros, arg="preserve_zeros")
    if not spec_lib.is_pairs(k):
        spec_lib.check_value(k, arg="k", kind=int, lo=1)

    def apply(params, names, key):
        if init in ("random", "kmeans++"):
            key = base.require_key(key, what=f"kmeans(init={init!r})")
        ks = spec_lib.resolve(k, names, arg="k")
        leaves = dict(tree.named_leaves(params))
        tree.check_finite({n: leaves[n] for n in names})
        plans = []
        for group, members in _groups(list(names), shared):
            arrays = [tree.as_float_array(leaves[m], m) for m in members]
            for m, a in zip(members, arrays):
                if a.size == 0:
                    raise ValueError(
                        f"{m} is empty (shape {tuple(a.shape)}); there is nothing to share. Leave it out with jc.masked."
                    )
            group_k = {spec_lib.check_value(ks[m], arg=f"k for {m!r}", kind=int, lo=1) for m in members}
            dtypes = {a.dtype for a in arrays}
            if len(group_k) != 1:
                raise ValueError(f"leaves {members} share codebook {group!r} but get different k {sorted(group_k)}")
            if len(dtypes) != 1:
                raise ValueError(
                    f"leaves {members} share codebook {group!r} but have dtypes {sorted(map(str, dtypes))}"
                )
            plans.append((group, members, arrays, group_k.pop(), dtypes.pop()))
        # Every group is padded (with invalid entries) to the longest one, so that all groups
        # with the same k run the same compiled k-means.
        length = max(sum(a.size for a in arrays) for _, _, arrays, _, _ in plans)
        codebooks, indices, inertia, errors, updates = {}, {}, {}, {}, {}
        for gi, (group, members, arrays, kg, dtype) in enumerate(plans):
            flat, valid = _flatten_group(arrays, length=length, preserve_zeros=preserve_zeros)
            gkey = None if key is None else jax.random.fold_in(key, gi)
            try:
                res = kmeans_1d(flat, k=kg, init=init, iters=iters, key=gkey, valid=valid)
            except ValueError as e:
                raise ValueError(f"k-means of {group!r}: {e}") from None
            codebook, leaf_indices, leaf_values = _unflatten_group(
                res.centroids, res.labels, shapes=tuple(a.shape for a in arrays), dtype=jnp.dtype(dtype)
            )
            codebooks[group], inertia[group] = codebook, res.inertia
            indices[group] = dict(zip(members, leaf_indices))
            for m, a, v in zip(members, arrays, leaf_values):
                updates[m] = v
                errors[m] = base.relative_error(a, v)
        return tree.set_by_name(params, updates), base.CodebookAux(codebooks, indices, inertia, errors)

    return base.Transform(apply, "kmeans")


def reconstruct(params, aux: base.CodebookAux):
    """``params`` with every shared leaf set to ``codebook[indices]`` (others unchanged)."""
    updates = {m: aux.codebooks[g][i] for g, members in aux.indices.items() for m, i in members.items()}
    return tree.set_by_name(params, updates)
