"""B3: 1-D k-means weight sharing against the same algorithm in numpy, and against scikit-learn.

Every method runs Lloyd's algorithm from the same initial centroids (``k`` evenly spaced
over ``[min, max]``, computed once and passed to all of them), the same maximum number of
iterations and the same stopping rule (the assignment no longer changes), on the same
float32 weights (normal, std 0.05). The outputs are the centroids, the label of every
weight and the inertia.

Figures (each measured side by side in the same run, calls interleaved):

* ``B3 k-means ... vs numpy, warm``: :func:`jcompress.sharing.kmeans_1d` seconds divided
  by :func:`reference_kmeans_1d` seconds (the same sorted-data algorithm, written plainly
  in numpy: sort, prefix sums, ``searchsorted`` of the midpoints, labels by
  ``searchsorted``), medians of interleaved calls after one untimed call; target
  ``<= 1.0``. ``met`` also needs the same iteration count, centroids within 1e-5 and the
  same inertia (relative 1e-5).
* ``B3 k-means ... vs numpy, cold``: the first call of each in this process (for
  jcompress, XLA compilation included, with no persistent compilation cache); target
  ``<= 1.0``.
* ``B3 k-means ... vs scikit-learn``: scikit-learn's ``KMeans`` (general ``O(nk)`` Lloyd,
  ``n_init=1``, ``tol=0``) seconds / jcompress seconds, the user-facing comparison;
  target ``>= 10``, and jcompress's inertia must be no worse.
* ``B3 k-means cold, persistent compilation cache`` (full runs only): the first call in a
  fresh process with ``jax_compilation_cache_dir`` pointing at an empty directory, then in
  a second fresh process with that directory filled by the first; ratio = the second
  first-call over the numpy reference's first call.

Sizes: 1M and 16M weights, ``k`` = 16, 32, 256 (quick mode: 200K weights, ``k`` = 32, 256).
Run: ``python -m jcompress.bench --only b3_kmeans``.
"""

from __future__ import annotations

import numpy as np

from jcompress import timing
from jcompress.bench import cold

__all__ = ["reference_kmeans_1d", "run"]


def reference_kmeans_1d(x: np.ndarray, init: np.ndarray, iters: int):
    """Exact Lloyd on 1-D data, plainly in numpy: sorted data, prefix sums, midpoints.

    An empty cluster takes one of the points farthest from their centre (farthest first,
    the lower sorted position among equal distances), which leaves its old cluster.

    Args:
      x: float32 array of any shape (flattened).
      init: ``(k,)`` initial centroids.
      iters: maximum iterations; it stops after the first iteration whose assignment
        equals the previous one.

    Returns:
      ``(centroids, labels, inertia, iterations)``: sorted float32 ``(k,)``, int ``(n,)``
      (the nearest centroid, the lower one on a midpoint), float64, int.
    """
    x = np.ravel(x).astype(np.float32)
    xs = np.sort(x)
    cs = np.concatenate([[0.0], np.cumsum(xs, dtype=np.float64)])
    n, k = xs.size, len(init)
    c, previous = np.sort(np.asarray(init, np.float32)), None
    for it in range(1, iters + 1):
        c = np.sort(c)
        b = np.concatenate([[0], np.searchsorted(xs, (c[1:] + c[:-1]) / 2, side="right"), [n]])
        count, total = np.diff(b), cs[b[1:]] - cs[b[:-1]]
        empty = count == 0
        if empty.any():
            owner = np.repeat(np.arange(k), count)
            dist = (xs - c[owner]) ** 2
            far = np.flatnonzero(dist >= np.partition(dist, n - k)[n - k])
            far = far[np.lexsort((far, -dist[far]))][: empty.sum()]
            np.subtract.at(total, owner[far], xs[far])
            np.subtract.at(count, owner[far], 1)
            total[empty], count[empty] = xs[far], 1
        c = np.where(count > 0, total / np.maximum(count, 1), c).astype(np.float32)
        if previous is not None and np.array_equal(b, previous):
            break
        previous = b
    c = np.sort(c)
    labels = np.searchsorted((c[1:] + c[:-1]) / 2, x, side="left")
    inertia = float(np.sum((x.astype(np.float64) - c[labels]) ** 2))
    return c, labels, inertia, it


def _weights(n: int) -> np.ndarray:
    return (np.random.default_rng(0).standard_normal(n) * 0.05).astype(np.float32)


def _numpy_rows(n: int, k: int, iters: int, repeats: int) -> list[dict]:
    from jcompress.sharing import kmeans_1d

    w = _weights(n)
    init = np.linspace(w.min(), w.max(), k, dtype=np.float32)
    ts = timing.compare(
        {
            "jcompress": lambda: kmeans_1d(w, k=k, init=init, iters=iters),
            "numpy": lambda: reference_kmeans_1d(w, init, iters),
        },
        repeats=repeats,
    )
    ours, ref = ts["jcompress"], ts["numpy"]
    c_ref, _, inertia_ref, it_ref = ref.output
    res = ours.output
    inertia = float(np.sum((w.astype(np.float64) - np.asarray(res.centroids, np.float64)[np.asarray(res.labels)]) ** 2))
    same = bool(
        int(res.iterations) == it_ref
        and np.allclose(np.asarray(res.centroids), c_ref, rtol=0, atol=1e-5)
        and abs(inertia - inertia_ref) <= 1e-5 * inertia_ref
    )
    common = {
        "n": n,
        "k": k,
        "max_iters": iters,
        "iterations": int(res.iterations),
        "iterations_numpy": it_ref,
        "inertia": inertia,
        "inertia_numpy": inertia_ref,
        "same_result": same,
        "seconds_jcompress": ours.median,
        "seconds_jcompress_min_max": [ours.low, ours.high],
        "seconds_numpy": ref.median,
        "seconds_numpy_min_max": [ref.low, ref.high],
        "first_call_jcompress": ours.first,
        "first_call_numpy": ref.first,
        "repeats": repeats,
    }
    label = f"B3 k-means k={k} {n / 2**20:.3g}M weights vs numpy"
    warm, cold = ours.median / ref.median, ours.first / ref.first
    return [
        {"name": f"{label}, warm", "ratio": warm, "target": "<= 1.0", "met": bool(warm <= 1.0 and same), **common},
        {
            "name": f"{label}, cold (compilation included, no persistent cache)",
            "ratio": cold,
            "target": "<= 1.0",
            "met": bool(cold <= 1.0 and same),
            **common,
        },
    ]


def _sklearn_row(n: int, k: int, iters: int, repeats: int) -> dict:
    from sklearn.cluster import KMeans

    from jcompress.sharing import kmeans_1d

    w = _weights(n)
    xd = w.astype(np.float64)
    init = np.linspace(w.min(), w.max(), k, dtype=np.float32)

    def sk():
        return KMeans(k, init=init[:, None], n_init=1, max_iter=iters, tol=0, algorithm="lloyd").fit(w[:, None])

    ts = timing.compare(
        {"jcompress": lambda: kmeans_1d(w, k=k, init=init, iters=iters), "sklearn": sk}, repeats=repeats
    )
    ours, theirs = ts["jcompress"], ts["sklearn"]
    res, km = ours.output, theirs.output
    ours_inertia = float(((xd - np.asarray(res.centroids, np.float64)[np.asarray(res.labels)]) ** 2).sum())
    sk_inertia = float(((xd - km.cluster_centers_[:, 0].astype(np.float64)[km.labels_]) ** 2).sum())
    ratio = theirs.median / ours.median
    inertia_ok = ours_inertia <= sk_inertia * (1 + 1e-6)
    return {
        "name": f"B3 k-means k={k} {n // 1000}K weights vs scikit-learn",
        "ratio": ratio,
        "target": ">= 10",
        "met": bool(ratio >= 10 and inertia_ok),
        "jcompress_s": ours.median,
        "jcompress_s_min_max": [ours.low, ours.high],
        "sklearn_s": theirs.median,
        "sklearn_s_min_max": [theirs.low, theirs.high],
        "iterations": int(res.iterations),
        "sklearn_iterations": int(km.n_iter_),
        "inertia": ours_inertia,
        "sklearn_inertia": sk_inertia,
        "inertia_no_worse": bool(inertia_ok),
        "n": n,
        "k": k,
        "max_iters": iters,
        "repeats": repeats,
    }


def _persistent_cache_row(n: int, k: int) -> dict:
    """First calls in two fresh processes sharing one compilation cache directory."""
    from jcompress.sharing import kmeans_1d  # noqa: F401  (fail here, not in the subprocess)

    setup = (
        "import numpy as np\n"
        "from jcompress.bench.b3_kmeans import _weights\n"
        "from jcompress.sharing import kmeans_1d\n"
        f"w = _weights({n})\n"
        f"init = np.linspace(w.min(), w.max(), {k}, dtype=np.float32)"
    )
    firsts = cold.first_calls(setup, f"kmeans_1d(w, k={k}, init=init, iters=300)")
    w = _weights(n)
    ref = timing.timeit(
        lambda: reference_kmeans_1d(w, np.linspace(w.min(), w.max(), k, dtype=np.float32), 300), repeats=1
    )
    return cold.row(f"B3 k-means k={k} {n / 2**20:.3g}M weights", firsts, ref.first, n=n, k=k)


def run(quick: bool) -> list[dict]:
    sizes, ks = ([200_000], (32, 256)) if quick else ([1 << 20, 1 << 24], (16, 32, 256))
    rows = []
    for n in sizes:
        for k in ks:
            rows += _numpy_rows(n, k, iters=300, repeats=(5 if n <= 1 << 20 else 3) if not quick else 3)
    rows.append(
        _sklearn_row(200_000 if quick else 1_000_000, 32, iters=100 if quick else 300, repeats=1 if quick else 3)
    )
    if not quick:
        rows.append(_persistent_cache_row(1 << 20, 32))
    return rows
