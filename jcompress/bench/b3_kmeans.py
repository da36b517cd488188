"""B3: 1-D k-means weight sharing vs scikit-learn's KMeans on the same weights.

Both run Lloyd's algorithm from the same linear initialisation (k centroids evenly
spaced over [min, max], passed to scikit-learn as ``init=``), ``n_init=1``,
``algorithm='lloyd'``, ``tol=0`` and the same maximum iterations, on the same float32
weights (normal, std 0.05). Ratio = scikit-learn seconds / jcompress seconds (median of
the repeats; jcompress after a compile warm-up, timing includes the sort). Correctness:
both inertias are recomputed in float64 from each method's centroids and labels, and
jcompress's must be <= scikit-learn's * (1 + 1e-6).
"""

from __future__ import annotations

import jax
import numpy as np

from jcompress import timing

__all__ = ["run"]


def run(quick: bool) -> list[dict]:
    from sklearn.cluster import KMeans

    from jcompress.sharing import kmeans_1d

    n, k = (200_000, 32) if quick else (1_000_000, 32)
    iters = 100 if quick else 300
    w = (np.random.default_rng(0).standard_normal(n) * 0.05).astype(np.float32)
    xd = w.astype(np.float64)
    init = np.linspace(w.min(), w.max(), k, dtype=np.float32)

    fn = jax.jit(lambda x: kmeans_1d(x, k=k, init="linear", iters=iters))
    jax.block_until_ready(fn(w))  # compile
    ours = timing.timeit(fn, w, repeats=5, warmup=0)
    ours_s, res = ours.median, ours.output
    c = np.asarray(res.centroids, np.float64)
    ours_inertia = float(((xd - c[np.asarray(res.labels)]) ** 2).sum())

    def sk():
        return KMeans(k, init=init[:, None], n_init=1, max_iter=iters, tol=0, algorithm="lloyd").fit(w[:, None])

    theirs = timing.timeit(sk, repeats=1 if quick else 2, warmup=0)
    sk_s, km = theirs.median, theirs.output
    sk_inertia = float(((xd - km.cluster_centers_[:, 0].astype(np.float64)[km.labels_]) ** 2).sum())
    ratio = sk_s / ours_s
    inertia_ok = ours_inertia <= sk_inertia * (1 + 1e-6)
    return [
        {
            "name": f"B3 k-means k={k} {n // 1000}K weights",
            "ratio": round(ratio, 2),
            "target": ">= 10",
            "met": bool(ratio >= 10 and inertia_ok),
            "jcompress_s": round(ours_s, 4),
            "sklearn_s": round(sk_s, 4),
            "iterations": int(res.iterations),
            "sklearn_iterations": int(km.n_iter_),
            "inertia": ours_inertia,
            "sklearn_inertia": sk_inertia,
            "inertia_no_worse": bool(inertia_ok),
            "n": n,
            "k": k,
            "max_iters": iters,
        }
    ]
