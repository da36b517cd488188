"""Top-k masks and thresholds: which entries to keep or remove, with exact counts.

Every pruning and one-shot technique decides "keep the largest scores" or "remove the
smallest". This module is the one place that does it; its names say which side a mask
marks:

- :func:`keep_largest` / :func:`remove_smallest`: masks of one array (whole, or per slice
  along ``axis``); the count may be a traced integer.
- :func:`nm_keep_mask`: keep ``n`` of every ``m`` consecutive entries along an axis.
- :func:`keep_largest_global`: keep the ``k`` largest entries over several arrays.
- :func:`kth_largest` / :func:`global_threshold`: the k-th largest value over several
  arrays, in linear time, without sorting.
- :func:`pruned_count`: ``round(sparsity * size)``, the counting rule used everywhere.
- :func:`on_host`: whether inputs are concrete arrays on one CPU device (selected with numpy).

Ties: entries are ranked by value and, among equal values, by position (flat index,
arrays in order, row-major within an array): the lower position counts as smaller. So
:func:`remove_smallest` takes the lower index first among ties and :func:`keep_largest`
keeps the higher one, and ``keep_largest(s, k) == ~remove_smallest(s, size - k)``.

How :func:`kth_largest` selects without sorting (a radix/histogram selection on the
float32 bit patterns):

1. Each float32 maps to a uint32 *key* whose unsigned order is the float order
   (non-negative floats already order like their bit patterns; negative ones are
   mirrored below them). Selecting on keys is exact: there is no rounding anywhere.
2. A pass counts every element into 2**21 buckets that split a key interval known to
   hold the answer, plus one bucket below and one above it. The counts say which
   bucket holds rank ``k``; that bucket is the next interval. When buckets are single
   keys the answer is found.
3. For large inputs the first interval is read off a 1/67 sample (every 67th element
   of each flattened leaf) with a 6-sigma margin on the rank: one histogram pass over
   the sample with buckets of 2**11 keys places both ends of the margin, so usually one
   pass over the data settles it. If the counts show the answer outside the interval the
   search restarts from the whole key range, which takes two more passes: always exact.

Concrete inputs on one CPU device are selected with numpy on the host instead (the same
sampled bracket, then one pass in cached chunks that counts the elements above it and
collects the ~1% inside, and ``np.partition`` of those): on CPU the compiled histogram
pass is an XLA scatter, several times slower than numpy's selection.

Inputs of up to 65,536 elements (single layers, samples) are simply sorted, and masks of
up to 262,144 elements come from :func:`remove_smallest` (a bisection on the keys, which
compiles faster and runs as fast at that size). Each pass streams the data once and
scatters into a histogram, in cache-sized chunks, so the work is linear. With arrays
sharded over devices each device counts its own shard and only the bucket counts are
summed across devices (an all-reduce); the weights are never gathered. The masks settle
ties at the threshold one axis at a time (:func:`_last_true`), so a leaf sharded over
explicit mesh axes is never flattened either: only per-index tie counts along one axis
are exchanged.

Example:
  >>> t = kth_largest([jnp.abs(w1), jnp.abs(w2)], k=1000)   # exact, float32 scalar
  >>> masks = keep_largest_global([jnp.abs(w1), jnp.abs(w2)], k=1000)
  >>> keep = nm_keep_mask(jnp.abs(kernel), n=2, m=4)       # 2:4 along the inputs
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jcompress.core.spec import check_value

__all__ = [
    "HOST_ABOVE",
    "float_to_key",
    "global_threshold",
    "keep_largest",
    "keep_largest_global",
    "key_to_float",
    "kth_largest",
    "kth_largest_key",
    "nm_keep_mask",
    "on_host",
    "pruned_count",
    "remove_smallest",
]

_BITS = 21  # log2 of the number of buckets per pass
_NBUCKETS = 1 << _BITS
_OFFSET = np.uint32(0x80000000)
_KEY_MIN = 0x00800000  # key of -inf (the smallest non-NaN float)
_KEY_MAX = 0xFF800000  # key of +inf
_SORT_BELOW = 1 << 16  # inputs up to this size are simply sorted
_BISECT_BELOW = 1 << 18  # masks of inputs up to this size come from remove_smallest
_SAMPLE_ABOVE = 1 << 22  # inputs with at least this many elements bracket the answer from a sample
_SAMPLE_STRIDE = 67  # prime, see _sample
_RANK_GROUPS_UP_TO = 16  # N:M groups up to this size are ranked by pairwise comparison


def float_to_key(x: jax.Array) -> jax.Array:
    """Order-preserving uint32 key of a float array (computed in float32).

    ``a < b`` as floats iff ``key(a) < key(b)`` as unsigned integers, for all non-NaN
    values including infinities; ``-0.0`` and ``+0.0`` get the same key. The key is
    ``2**31 + sign * |bits|`` where ``|bits|`` is the float's bit pattern without its
    sign (non-negative floats order like their bit patterns); computed with integer
    arithmetic only, no selects, so it streams fast on CPU.

    Args:
      x: floating array of any shape (bfloat16/float16 are cast to float32 exactly).

    Returns:
      uint32 array of the same shape.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"float_to_key needs a floating array, got dtype {x.dtype}")
    i = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    sign = i >> 31  # 0 or -1
    magnitude = i & jnp.int32(0x7FFFFFFF)
    signed = (magnitude ^ sign) - sign  # +|bits| or -|bits|
    return lax.bitcast_convert_type(signed, jnp.uint32) + _OFFSET


def key_to_float(key: jax.Array) -> jax.Array:
    """Inverse of :func:`float_to_key`: uint32 keys back to float32 values."""
    key = jnp.asarray(key, jnp.uint32)
    positive = key >= _OFFSET
    bits = jnp.where(positive, key - _OFFSET, (_OFFSET - key) | _OFFSET)
    return lax.bitcast_convert_type(bits, jnp.float32)


def _bucket_index(x: jax.Array, below: jax.Array, above: jax.Array, shift: jax.Array) -> jax.Array:
    """Bucket of every element for one counting pass (int32, same shape as ``x``).

    Keys ``<= below`` go to bucket 0, keys ``>= above`` to the last bucket, and key
    ``below + j`` (``j >= 1``) to bucket ``ceil(j / 2**shift)``. Clamping instead of
    branching keeps the loop free of selects.
    """
    offset = jnp.clip(float_to_key(x), below, above) - below
    return lax.shift_right_logical(offset + ((jnp.uint32(1) << shift) - 1), shift).astype(jnp.int32)


def _is_sharded(x: jax.Array) -> bool:
    """True when ``x`` is split over devices: a concrete array placed on several devices,
    or a traced one whose type names mesh axes (explicit sharding)."""
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        return len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
    spec = getattr(jax.typeof(x).sharding, "spec", None)
    return spec is not None and any(axis is not None for axis in spec)


def _replicated(x: jax.Array) -> jax.sharding.NamedSharding:
    """Sharding that replicates an array over the mesh of ``x`` (a traced, sharded array)."""
    return jax.sharding.NamedSharding(jax.typeof(x).sharding.mesh, jax.sharding.PartitionSpec())


def _count_into(hist: jax.Array, index: jax.Array, ones: jax.Array) -> jax.Array:
    """``hist[i] += number of times i occurs in index`` (index of any shape, in bounds).

    For an index sharded over explicit mesh axes the histogram is asked to come out
    replicated: each device counts its shard and the counts are summed (all-reduce).
    """
    out_sharding = _replicated(index) if _is_sharded(index) else None
    return hist.at[index].add(ones, mode="promise_in_bounds", out_sharding=out_sharding)


def _counts(values: Sequence[jax.Array], below, above, shift, chunk: int | None) -> jax.Array:
    """Histogram (``_NBUCKETS + 2`` int32 counts) of all elements for one pass.

    With ``chunk`` set, each leaf is processed ``chunk`` elements at a time (``lax.scan``)
    so the bucket indices of a chunk stay in cache instead of going through memory.
    Without it each leaf is counted whole and keeps its shape (and sharding).
    """
    hist = jnp.zeros((_NBUCKETS + 2,), jnp.int32)
    for v in values:
        if chunk and v.size > chunk and not _is_sharded(v):
            flat = v.reshape(-1)
            n_chunks = flat.shape[0] // chunk
            rows = flat[: n_chunks * chunk].reshape(n_chunks, chunk)
            ones = jnp.ones((chunk,), jnp.int32)

            def step(h, row, ones=ones):
                return _count_into(h, _bucket_index(row, below, above, shift), ones), None

            hist, _ = lax.scan(step, hist, rows)
            v = flat[n_chunks * chunk :]
        if v.size:
            index = _bucket_index(v, below, above, shift)
            hist = _count_into(hist, index, jnp.ones_like(index))
    return hist


def _select_bucket(counts: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The bucket holding the k-th largest element, and k's rank inside that bucket.

    ``counts[b]`` is the number of elements in bucket ``b``; a higher bucket holds larger
    elements. Returns ``(b, k_in_b)``. Long count vectors are searched in two levels
    (rows of 1024, then within the row) to keep the prefix sums short.
    """
    if counts.shape[0] > 4096 and counts.shape[0] % 1024 == 0:
        rows = counts.reshape(-1, 1024)
        r, k_r = _select_bucket(rows.sum(axis=1), k)
        c, k_c = _select_bucket(rows[r], k_r)
        return r * 1024 + c, k_c
    at_or_above = jnp.cumsum(counts[::-1])[::-1]  # elements in buckets >= b
    bucket = jnp.sum(at_or_above >= k) - 1  # last bucket whose suffix count reaches k
    above = at_or_above[bucket] - counts[bucket]
    return bucket.astype(jnp.uint32), (k - above).astype(jnp.int32)


def _sample(x: jax.Array, stride: int, *, may_be_sharded: bool) -> jax.Array:
    """About one element in ``stride``: every ``stride``-th element of the flattened array.

    With a prime ``stride`` (no divisor of layer widths) the sample visits every row at
    columns that shift from row to row, so rows or columns of different scales are all
    represented in proportion (a sample of every ``stride``-th row would miss most rows,
    and the bracket read off it would often miss the answer). A leaf that is or may be
    sharded over devices (``may_be_sharded``: under ``jax.jit`` with an ``Auto`` mesh the
    sharding is invisible) is sampled by strided slicing from the leading axis on instead,
    with ``stride`` rounded down to a power of two (so that sliced sharded axes stay
    divisible by the mesh), which keeps the sample on the devices that hold it (flattening
    a column-sharded leaf would gather it).
    """
    if not (may_be_sharded or _is_sharded(x)):
        return x.reshape(-1)[::stride]
    stride = 1 << (stride.bit_length() - 1)
    index = []
    for d in x.shape:
        step = max(1, min(stride, d))
        index.append(slice(None, None, step))
        stride = max(1, stride // step)
    return x[tuple(index)]


def _sample_bracket(sample: Sequence[jax.Array], rank_lo: int, rank_hi: int, chunk: int | None):
    """Key interval ``[lo, hi]`` holding the ``rank_lo``-th and ``rank_hi``-th largest sample
    elements (``rank_lo >= rank_hi``), from one histogram pass over the whole key range.

    The ``2**21`` buckets of ``2**11`` keys each cover all keys, so one pass places both
    ranks to within a bucket; the interval runs from the lower edge of ``rank_lo``'s bucket
    to the upper edge of ``rank_hi``'s (a bracket needs no exact ends, and 2,048 keys are
    about 0.02% of a value, far inside the sampling margin).
    """
    shift = 32 - _BITS
    counts = _counts(sample, jnp.uint32(0), jnp.uint32(_KEY_MAX), jnp.uint32(shift), chunk)
    inner = counts[1 : _NBUCKETS + 1]  # inner[i]: keys i * 2**11 + 1 ... (i + 1) * 2**11
    b_lo, _ = _select_bucket(inner, jnp.int32(rank_lo))
    b_hi, _ = _select_bucket(inner, jnp.int32(rank_hi))
    # b_hi < 2**21 - 1 for every non-NaN key (<= _KEY_MAX), so the upper edge does not wrap
    return (b_lo << shift) + 1, ((b_hi + 1) << shift)


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def kth_largest_key(values: Sequence[jax.Array], k: int, *, chunk: int | None = 1 << 18) -> jax.Array:
    """Exact k-th largest :func:`float_to_key` key (1-indexed) over all elements.

    The search keeps a key interval ``[lo, hi]`` known to hold the answer and counts all
    elements into ``2**21`` buckets spanning it plus one bucket below and one above;
    the bucket holding rank ``k`` becomes the next interval, until buckets are single
    keys. Large inputs start from an interval read off a strided 1/67 sample with a
    6-sigma margin (one histogram pass over the sample, see :func:`_sample_bracket`), which usually makes one pass over the data enough; if the counts
    show the answer outside it, the search restarts from the full key range (at most
    two more passes). Every pass is a histogram, so the work is linear and sharded
    inputs only exchange bucket counts.

    Args:
      values: floating arrays (not NaN).
      k: static rank, ``1 <= k <= total size``.
      chunk: elements per histogram step (bucket indices stay in cache); ``None``
        histograms each leaf whole. Leaves sharded over devices are always counted
        whole (chunking them would gather them); under ``jax.jit`` with an ``Auto``
        mesh their sharding is invisible here, so pass ``chunk=None`` yourself.

    Returns:
      uint32 scalar key; :func:`key_to_float` gives the value.
    """
    return _kth_search(values, k, chunk)[0]


def _kth_search(values: Sequence[jax.Array], k: int, chunk: int | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`kth_largest_key`'s search (traced), returning ``(key, needed, tied)``: the key,
    how many entries equal to it rank ``k`` reaches into (``k`` minus the number above it),
    and how many entries equal it (both int32, read off the last histogram)."""
    n = sum(int(np.prod(v.shape)) for v in values)
    if n <= _SORT_BELOW and chunk and not any(_is_sharded(v) for v in values):
        # A small sort beats a 2**21-bucket histogram (but would gather sharded arrays).
        keys = jnp.concatenate([float_to_key(v).reshape(-1) for v in values])
        t = jnp.sort(keys)[n - k]
        return t, k - jnp.sum(keys > t, dtype=jnp.int32), jnp.sum(keys == t, dtype=jnp.int32)
    full = (jnp.uint32(_KEY_MIN), jnp.uint32(_KEY_MAX))
    if n >= _SAMPLE_ABOVE:
        # chunk=None is how a caller under jit with an Auto mesh says leaves may be sharded
        sample = [_sample(v, _SAMPLE_STRIDE, may_be_sharded=chunk is None) for v in values]
        m = sum(int(np.prod(x.shape)) for x in sample)
        p = k / n
        margin = 6.0 * math.sqrt(m * p * (1.0 - p)) + 16.0
        rank_hi = int(min(max(math.floor(p * m - margin), 1), m))
        rank_lo = int(min(max(math.ceil(p * m + margin), 1), m))
        start = _sample_bracket(sample, rank_lo, rank_hi, chunk)
    else:
        start = full
    k_arr = jnp.int32(k)

    def one_pass(state):
        lo, hi = state[:2]
        span = hi - lo  # interval holds span + 1 keys
        shift = jnp.sum((span >> (_BITS + jnp.arange(32 - _BITS, dtype=jnp.uint32))) > 0).astype(jnp.uint32)
        n_buckets = (span >> shift) + 1  # buckets 1..n_buckets cover [lo, lo + n_buckets << shift)
        top = lo + (n_buckets << shift) - 1
        counts = _counts(values, lo - 1, top + 1, shift, chunk)
        n_above = counts[n_buckets + 1]
        inner = jnp.where(jnp.arange(_NBUCKETS) < n_buckets, counts[1 : _NBUCKETS + 1], 0)
        missed = (n_above >= k_arr) | (n_above + jnp.sum(inner) < k_arr)
        b, needed = _select_bucket(inner, k_arr - n_above)
        new_lo = lo + (b << shift)
        done = ~missed & (shift == 0)
        new_hi = new_lo + ((jnp.uint32(1) << shift) - 1)
        return (
            jnp.where(missed, full[0], new_lo),
            jnp.where(missed, full[1], new_hi),
            done,
            new_lo,
            needed,
            inner[b],  # with single-key buckets (done): the entries equal to the answer
        )

    state = (start[0], start[1], jnp.bool_(False), jnp.uint32(0), jnp.int32(0), jnp.int32(0))
    return lax.while_loop(lambda s: ~s[2], one_pass, state)[3:]


HOST_ABOVE = _SORT_BELOW
"""Concrete inputs on one CPU device (:func:`on_host`) with more elements than this (65,536
in all) are selected with numpy by :func:`kth_largest` and :func:`keep_largest_global`."""
_HOST_CHUNK = 1 << 18  # elements per numpy step (1 MiB of float32: temporaries stay in cache)


def on_host(values: Sequence[jax.Array]) -> bool:
    """True when every array is a concrete (not traced) ``jax.Array`` on one CPU device, so
    that numpy can read it in place (``np.asarray`` of such an array does not copy).

    :func:`kth_largest` and :func:`keep_largest_global` select such inputs with numpy when
    they hold more than :data:`HOST_ABOVE` elements; a caller that would otherwise run them
    inside ``jax.jit`` (where the values are traced) asks this first.

    Example:
      >>> on_host([jnp.ones(3)])  # True on a CPU backend; False under jax.jit
    """
    for v in values:
        if isinstance(v, jax.core.Tracer) or not isinstance(v, jax.Array):
            return False
        devices = v.sharding.device_set
        if len(devices) != 1 or next(iter(devices)).platform != "cpu":
            return False
    return True


def _host_leaf(v: jax.Array, magnitude: bool) -> np.ndarray:
    """Flat float32 numpy view of a leaf (a copy only for other dtypes, or ``|v|``)."""
    flat = np.asarray(v).reshape(-1).astype(np.float32, copy=False)
    return np.abs(flat) if magnitude else flat


def _host_select(values: Sequence[jax.Array], k: int, magnitude: bool, masks: bool):
    """:func:`kth_largest` (and with ``masks`` the masks of :func:`keep_largest_global`)
    with numpy on the host: exact, in one pass over the data.

    A strided sample (every 67th element, see :func:`_sample`) gives a bracket
    ``[lo, hi]`` holding rank ``k`` with a 6-sigma margin; one pass, in chunks that stay
    in cache, counts the elements above ``hi`` (writing them into the masks) and collects
    the positions inside the bracket (about 1% of them); ``np.partition`` of those values
    gives the answer, and the tied entries are settled among them alone. If the counts
    show the answer outside the bracket, everything is selected with ``np.partition``.

    Returns:
      ``(t, masks)``: the k-th largest as ``np.float32`` (``-0.0`` as ``0.0``), and a
      list of bool numpy arrays with exactly ``k`` True (or ``None``).
    """
    flats = [np.asarray(v).reshape(-1) for v in values]
    n = sum(f.shape[0] for f in flats)
    sample = np.concatenate([f[::_SAMPLE_STRIDE] for f in flats]).astype(np.float32)
    sample = np.abs(sample) if magnitude else sample
    m, p = sample.shape[0], k / n
    margin = 6.0 * math.sqrt(m * p * (1.0 - p)) + 16.0
    rank_hi = int(min(max(math.floor(p * m - margin), 1), m))
    rank_lo = int(min(max(math.ceil(p * m + margin), 1), m))
    part = np.partition(sample, [m - rank_lo, m - rank_hi])
    lo, hi = part[m - rank_lo], part[m - rank_hi]
    out = [np.empty(f.shape, bool) for f in flats] if masks else None
    above, inside, where = 0, [], []
    for leaf, f in enumerate(flats):
        for i in range(0, f.shape[0], _HOST_CHUNK):
            c = f[i : i + _HOST_CHUNK].astype(np.float32, copy=False)
            c = np.abs(c) if magnitude else c
            big = np.greater(c, hi, out=None if out is None else out[leaf][i : i + c.shape[0]])
            above += int(np.count_nonzero(big))
            inb = (c >= lo) & (c <= hi)
            if out is None:
                inside.append(c[inb])
            else:
                idx = np.flatnonzero(inb)
                inside.append(c[idx])
                where.append((leaf, idx + i))
    inside = np.concatenate(inside)
    rank = k - above  # rank of the answer among the elements inside the bracket
    if not 1 <= rank <= inside.shape[0]:  # the sample missed: select over everything
        inside = np.concatenate([_host_leaf(v, magnitude) for v in values])
        rank, above, where = k, 0, [(leaf, np.arange(f.shape[0])) for leaf, f in enumerate(flats)]
        if out is not None:
            out = [np.zeros(f.shape, bool) for f in flats]
    t = np.partition(inside, inside.shape[0] - rank)[inside.shape[0] - rank]
    if out is not None:
        keep = inside >= t
        tied = np.flatnonzero(inside == t)
        keep[tied[: int(np.count_nonzero(keep)) - rank]] = False  # drop the lowest-placed ties
        start = 0
        for leaf, idx in where:
            out[leaf][idx] = keep[start : start + idx.shape[0]]
            start += idx.shape[0]
        out = [o.reshape(np.shape(v)) for o, v in zip(out, values)]
    return np.float32(t + np.float32(0)), out


def _check_k(k: int, total: int) -> int:
    if isinstance(k, (jax.Array, np.ndarray)) and np.ndim(k) == 0 and not isinstance(k, jax.core.Tracer):
        k = int(k)
    if not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be a Python int (static), got {type(k).__name__}")
    if not 1 <= k <= total:
        raise ValueError(f"k={k} is outside [1, {total}] (the total number of elements)")
    return int(k)


def _float_leaves(values: Sequence[jax.Array], arg: str) -> list[jax.Array]:
    out = []
    for i, v in enumerate(values):
        v = jnp.asarray(v)
        if not jnp.issubdtype(v.dtype, jnp.floating):
            raise TypeError(
                f"{arg}[{i}] has dtype {v.dtype}; a floating dtype is needed (cast with .astype(jnp.float32))."
            )
        out.append(v)
    if not out:
        raise ValueError(f"{arg} is empty; pass at least one array")
    return out


def _chunk_for(values: Sequence[jax.Array], chunk: int | None) -> int | None:
    """No chunking when any leaf is spread over devices (it would be gathered)."""
    return None if any(_is_sharded(v) for v in values) else chunk


def kth_largest(
    values: Sequence[jax.Array], k: int, *, chunk: int | None = 1 << 18, magnitude: bool = False
) -> jax.Array:
    """Exact k-th largest value (1-indexed, counting repeats) over several float arrays.

    Equals ``np.partition(np.concatenate([v.ravel() for v in values]), n - k)[n - k]``
    for float32 input, in linear time (histogram passes, see the module docstring).
    Works eagerly, under ``jax.jit`` and on sharded arrays without gathering them.
    Called eagerly on concrete arrays that each sit on one CPU device (more than
    65,536 elements in all), it selects with numpy on the host instead, reading the
    arrays in place: a sampled bracket, one pass and a small ``np.partition`` (the
    compiled path's histogram pass is an XLA scatter, several times slower on CPU).

    Args:
      values: floating arrays of any shapes; NaN is not allowed (not checked here).
      k: static rank, ``1 <= k <= total number of elements``.
      chunk: see :func:`kth_largest_key` (``None`` for arrays sharded over devices).
      magnitude: rank ``|values|`` instead of ``values`` (``|w|`` for magnitude pruning,
        without materialising it).

    Returns:
      float32 scalar.

    Example:
      >>> kth_largest([jnp.array([3., 1.]), jnp.array([2., 2.])], k=2)  # -> 2.0
      >>> kth_largest([w1, w2], k=1000, magnitude=True)  # the 1000-th largest |w|
    """
    values = _float_leaves(values, "values")
    n = sum(int(np.prod(v.shape)) for v in values)
    k = _check_k(k, n)
    if n > HOST_ABOVE and on_host(values):
        return jnp.float32(_host_select(values, k, magnitude, masks=False)[0])
    if magnitude:
        values = [jnp.abs(v) for v in values]
    return key_to_float(kth_largest_key(values, k, chunk=_chunk_for(values, chunk)))


def keep_largest_global(
    values: Sequence[jax.Array], k: int, *, chunk: int | None = 1 << 18, magnitude: bool = False
) -> list[jax.Array]:
    """Bool masks keeping exactly the ``k`` largest entries over all ``values`` together.

    Entries strictly above the k-th largest value are kept; among entries equal to it,
    those with the highest flat index are kept, where the flat index runs over
    ``values`` in order and row-major within each array (so a tie is pruned at the
    lower index first). The result is the same as keeping the last ``k`` positions of
    a stable ascending argsort of the concatenated values. Concrete arrays on one CPU
    device (more than 65,536 elements in all) are handled with numpy on the host, as in
    :func:`kth_largest`; the masks are the same.

    Args:
      values: floating arrays of any shapes.
      k: static number of entries to keep, ``0 <= k <= total size``.
      chunk: see :func:`kth_largest_key`.
      magnitude: rank ``|values|`` instead of ``values``.

    Returns:
      list of bool arrays with the shapes of ``values``; exactly ``k`` True in total.

    Example:
      >>> keep_largest_global([jnp.array([3., 1.]), jnp.array([2., 2.])], 2)
      [Array([ True, False]), Array([False,  True])]
    """
    values = _float_leaves(values, "values")
    total = sum(int(np.prod(v.shape)) for v in values)
    if k == 0:
        return [jnp.zeros(v.shape, bool) for v in values]
    k = _check_k(k, total)
    if total > HOST_ABOVE and on_host(values):
        return [jnp.asarray(m) for m in _host_select(values, k, magnitude, masks=True)[1]]
    if magnitude:
        values = [jnp.abs(v) for v in values]
    return _keep_top(values, k, chunk=_chunk_for(values, chunk))


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def _keep_top(values: list[jax.Array], k: int, chunk: int | None) -> list[jax.Array]:
    sizes = [math.prod(v.shape) for v in values]
    if sum(sizes) <= _BISECT_BELOW and not any(_is_sharded(v) for v in values):
        # Small inputs (single layers): bisection compiles faster and runs as fast.
        flat = jnp.concatenate([jnp.ravel(v).astype(jnp.float32) for v in values])
        keep = ~remove_smallest(flat, sum(sizes) - k)
        return [part.reshape(v.shape) for part, v in zip(jnp.split(keep, np.cumsum(sizes)[:-1]), values)]
    keys = [float_to_key(v) for v in values]
    t, n_equal_needed, n_equal = _kth_search(values, k, chunk)  # no sums over the masks needed
    above = [x > t for x in keys]
    equal = [x == t for x in keys]

    def all_ties(_):
        return [a | e for a, e in zip(above, equal)]

    def resolve_ties(_):
        # Keep the n_equal_needed last-placed equal entries: those of later leaves first.
        out, after = [], jnp.int32(0)
        for a, e in reversed(list(zip(above, equal))):
            n_e = jnp.sum(e, dtype=jnp.int32)
            out.append(a | _last_true(e, jnp.clip(n_equal_needed - after, 0, n_e)))
            after = after + n_e  # equal entries in the later leaves
        return out[::-1]

    return lax.cond(n_equal == n_equal_needed, all_ties, resolve_ties, None)


def _last_true(e: jax.Array, r: jax.Array) -> jax.Array:
    """``e`` with only its ``r`` last-placed True entries left (row-major order), for a
    traced int32 ``0 <= r <= sum(e)``, without flattening ``e``.

    A leaf sharded over explicit mesh axes cannot be flattened (nor summed cumulatively
    along a sharded axis) without gathering it, so the cut is found one axis at a time:
    the True entries per index of axis 0 say at which index ``c0`` the ``r``-th last one
    lies and how many lie at later indices (all kept); the same is repeated inside the
    slice at ``c0`` along axis 1, and so on. Each step is one masked sum over the leaf;
    only the per-index counts (a vector of one axis' length) are exchanged between devices.
    """
    cut_on = []  # per axis: entries whose index equals the cut along that axis
    keep = jnp.zeros(e.shape, bool)
    rest = r  # True entries still to keep, all inside the slice ``cut_on`` selects
    for axis in range(e.ndim):
        inside = functools.reduce(jnp.logical_and, cut_on, e)
        counts = jnp.sum(inside, axis=tuple(i for i in range(e.ndim) if i != axis), dtype=jnp.int32)
        if _is_sharded(counts):
            counts = jax.sharding.reshard(counts, _replicated(counts))
        later = jnp.cumsum(counts[::-1])[::-1] - counts  # True entries at later indices
        cut = jnp.sum(later + counts >= rest) - 1  # last index with at least ``rest`` from it on
        index = jnp.arange(e.shape[axis]).reshape([-1 if i == axis else 1 for i in range(e.ndim)])
        keep = keep | (inside & (index > cut))
        rest = rest - later[cut]
        cut_on.append(index == cut)
    return keep | (functools.reduce(jnp.logical_and, cut_on, e) & (rest > 0))


def remove_smallest(score: jax.Array, count, *, axis: int | None = None) -> jax.Array:
    """Bool mask, True at the ``count`` smallest entries of ``score`` (the ones to remove).

    The same as ``rank < count`` with ``rank`` from a stable ascending argsort (so among
    equal values the lower index is taken first), over the whole array (``axis=None``)
    or independently along ``axis`` for every other index. ``count`` may be a traced
    integer (then clipped to the valid range), so a jitted caller is compiled once for
    all counts. It bisects on the order-preserving keys of :func:`float_to_key`: 32
    counting passes, each a compare and a sum, instead of the two sorts an argsort rank
    needs (on CPU about 25x faster for a 100k-entry block).

    Args:
      score: floating array, no NaN (``-inf`` marks entries to take first).
      count: int (scalar, possibly traced), ``0 <= count <=`` the number of entries
        compared (the whole array, or ``score.shape[axis]``).
      axis: compare along this axis only; ``None`` for the whole array.

    Returns:
      bool array of ``score``'s shape; ``count`` True in total (per slice with ``axis``).

    Raises:
      ValueError: a concrete ``count`` outside the range.

    Example:
      >>> remove_smallest(jnp.array([3., 1., 2., 1.]), 2)  # -> [False, True, False, True]
    """
    if axis is None:
        return remove_smallest(jnp.ravel(score), count, axis=0).reshape(jnp.shape(score))
    n = jnp.shape(score)[axis]
    if not isinstance(count, jax.core.Tracer) and not 0 <= int(count) <= n:
        raise ValueError(f"count={int(count)} must be in [0, {n}] (the entries compared along axis {axis})")
    return _remove_smallest(jnp.asarray(score), jnp.asarray(count, jnp.int32), axis=axis % jnp.ndim(score))


@functools.partial(jax.jit, static_argnames=("axis",))
def _remove_smallest(score: jax.Array, count: jax.Array, *, axis: int) -> jax.Array:
    """:func:`remove_smallest` along ``axis`` (arguments checked), compiled once per shape and
    axis: called eagerly, the bisection loop would otherwise be traced and compiled anew on
    every call (about 0.4 s each for a 256 x 256 score on CPU)."""
    n = score.shape[axis]
    keys = float_to_key(score)
    count = jnp.clip(count, 0, n)
    lo = jnp.zeros(tuple(1 if a == axis % keys.ndim else d for a, d in enumerate(keys.shape)), jnp.uint32)

    def halve(_, bounds):  # invariant: the count-th smallest key lies in [lo, hi]
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(keys <= mid, axis=axis, keepdims=True, dtype=jnp.int32) >= count
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    t, _ = lax.fori_loop(0, 32, halve, (lo, jnp.full_like(lo, 0xFFFFFFFF)))
    below, tie = keys < t, keys == t
    needed = count - jnp.sum(below, axis=axis, keepdims=True, dtype=jnp.int32)
    return below | (tie & (jnp.cumsum(tie, axis=axis, dtype=jnp.int32) <= needed))


def keep_largest(score: jax.Array, count, *, axis: int | None = None) -> jax.Array:
    """Bool mask, True at the ``count`` largest entries of ``score`` (the ones to keep).

    ``keep_largest(score, count, axis=axis) == ~remove_smallest(score, n - count,
    axis=axis)`` with ``n`` the number of entries compared, so among equal values the
    higher index is kept. ``count`` may be traced (then clipped to ``[0, n]``).

    Args:
      score: floating array, no NaN; ``-inf`` marks entries that must go first.
      count: number of entries kept (over the whole array, or per slice along ``axis``).
      axis: compare along this axis only; ``None`` for the whole array.

    Returns:
      bool array of ``score``'s shape with ``count`` True entries (per slice with ``axis``).

    Example:
      >>> keep_largest(jnp.array([3., 1., 2., 1.]), 2)  # -> [True, False, True, False]
    """
    n = jnp.size(score) if axis is None else jnp.shape(score)[axis]
    if not isinstance(count, jax.core.Tracer) and not 0 <= int(count) <= n:
        raise ValueError(
            f"count={int(count)} must be in [0, {n}] (the entries kept{'' if axis is None else f' along axis {axis}'})"
        )
    return ~remove_smallest(score, n - jnp.clip(jnp.asarray(count, jnp.int32), 0, n), axis=axis)


def nm_keep_mask(score: jax.Array, *, n: int, m: int, axis: int = -2) -> jax.Array:
    """N:M keep mask: in every group of ``m`` consecutive entries along ``axis`` the ``n``
    largest scores are kept (among equal scores the higher index).

    Args:
      score: floating array; ``score.shape[axis]`` must be a multiple of ``m``. For a
        Dense kernel ``(in, out)`` the default ``axis=-2`` groups the inputs of each output.
      n: entries kept per group, ``1 <= n < m``.
      m: group size.
      axis: the axis the groups run along.

    Returns:
      bool array of ``score``'s shape with exactly ``n`` True in every group.

    Raises:
      ValueError: ``m`` does not divide the axis, ``axis`` out of range, bad ``n``/``m``.

    Example:
      >>> nm_keep_mask(jnp.array([[4.], [1.], [3.], [2.]]), n=2, m=4)[:, 0]  # -> [T, F, T, F]
    """
    m = check_value(m, arg="m", kind=int, lo=1)
    n = check_value(n, arg="n", kind=int, lo=0, hi=m)
    score = jnp.asarray(score)
    if not -score.ndim <= axis < score.ndim:
        raise ValueError(f"axis={axis} is out of range for an array with {score.ndim} dimensions (shape {score.shape})")
    axis %= score.ndim
    if score.shape[axis] % m:
        raise ValueError(
            f"m={m} does not divide axis {axis} of shape {score.shape}; N:M groups need whole groups (choose another axis or m)"
        )
    if m <= _RANK_GROUPS_UP_TO:
        return _nm_keep_by_rank(score, n=n, m=m, axis=axis)
    moved = jnp.moveaxis(score, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    keep = ~remove_smallest(groups, m - n, axis=-1)
    return jnp.moveaxis(keep.reshape(moved.shape), -1, axis)


@functools.partial(jax.jit, static_argnames=("n", "m", "axis"))
def _nm_keep_by_rank(score: jax.Array, *, n: int, m: int, axis: int) -> jax.Array:
    """:func:`nm_keep_mask` for small groups: each entry's rank in its group by comparing it
    with the ``m - 1`` others (one fused pass; the bisection of :func:`remove_smallest` takes
    32 passes over the data, which made 2:4 masks the slow part of Wanda). Same order and
    ties: by key, then the lower index counts as smaller; the ``n`` highest ranks are kept."""
    moved = jnp.moveaxis(score, axis, -1)
    keys = float_to_key(moved).reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    mine, other = keys[..., :, None], keys[..., None, :]
    before = np.arange(m)[None, :] < np.arange(m)[:, None]  # [i, j]: j comes before i
    rank = jnp.sum((other < mine) | ((other == mine) & before), axis=-1, dtype=jnp.int32)
    return jnp.moveaxis((rank >= m - n).reshape(moved.shape), -1, axis)


def pruned_count(sparsity, size: int) -> int:
    """Entries removed for ``sparsity`` of ``size``: ``round(sparsity * size)``, halves
    rounded up (``floor(sparsity * size + 0.5)``), the rule every mask in jcompress uses.

    Args:
      sparsity: fraction removed in ``[0, 1]`` (Python, numpy or JAX scalar).
      size: number of entries (or units, blocks).

    Raises:
      TypeError / ValueError: sparsity not a finite number in ``[0, 1]``.

    Example:
      >>> pruned_count(0.9, 10)  # -> 9
    """
    sparsity = check_value(sparsity, arg="sparsity", kind=float, lo=0.0, hi=1.0)
    return math.floor(sparsity * int(size) + 0.5)


def global_threshold(values: Sequence[jax.Array], *, sparsity) -> jax.Array:
    """The value that splits kept from removed entries when ``sparsity`` of all ``values``
    (together) is removed: the k-th largest entry, ``k = total - pruned_count(sparsity, total)``.

    Entries above it survive a global top-k, entries below it do not (ties are resolved
    by :func:`keep_largest_global`).

    Args:
      values: floating arrays (scores, e.g. ``|w|`` of every kernel), no NaN.
      sparsity: fraction removed, in ``[0, 1]``.

    Returns:
      float32 scalar; ``inf`` when nothing is kept.

    Example:
      >>> global_threshold([jnp.abs(w1), jnp.abs(w2)], sparsity=0.9)
    """
    values = _float_leaves(values, "values")
    total = sum(int(np.prod(v.shape)) for v in values)
    k = total - pruned_count(sparsity, total)
    if k == 0:
        return jnp.float32(jnp.inf)
    return kth_largest(values, k)
