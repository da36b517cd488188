"""B3 benchmark (k-means vs the numpy reference and scikit-learn): fields and correctness of a quick run."""

import numpy as np

from jcompress.bench import b3_kmeans


def test_b3_quick_fields_and_same_results():
    rows = b3_kmeans.run(quick=True)
    numpy_rows, sk = rows[:-1], rows[-1]
    assert [r["k"] for r in numpy_rows] == [32, 32, 256, 256]
    for r in numpy_rows:
        assert {"name", "ratio", "target", "met"} <= set(r) and r["target"] == "<= 1.0"
        # the same algorithm: same iterations, centroids and inertia as the numpy reference
        assert r["same_result"] and r["iterations"] == r["iterations_numpy"] <= r["max_iters"]
        assert abs(r["inertia"] - r["inertia_numpy"]) <= 1e-5 * r["inertia_numpy"]
        assert r["seconds_jcompress_min_max"][0] <= r["seconds_jcompress"] <= r["seconds_jcompress_min_max"][1]
        assert r["met"] == (r["ratio"] <= 1.0)
    warm, cold = numpy_rows[0], numpy_rows[1]
    assert abs(warm["ratio"] - warm["seconds_jcompress"] / warm["seconds_numpy"]) < 1e-12
    assert abs(cold["ratio"] - cold["first_call_jcompress"] / cold["first_call_numpy"]) < 1e-12
    assert sk["target"] == ">= 10" and isinstance(sk["met"], bool) and sk["n"] == 200_000
    assert sk["iterations"] == sk["sklearn_iterations"] <= sk["max_iters"]
    assert sk["inertia_no_worse"] and sk["inertia"] <= sk["sklearn_inertia"] * (1 + 1e-6)


def test_reference_matches_brute_force_lloyd_with_empty_clusters():
    """The numpy reference against O(nk) Lloyd on a case where clusters start empty."""
    x = (np.random.default_rng(1).standard_normal(3000) ** 3).astype(np.float32)
    init = np.linspace(x.min(), x.max(), 8, dtype=np.float32)
    c, labels, inertia, _ = b3_kmeans.reference_kmeans_1d(x, init, 100)
    brute = np.argmin(np.abs(x[:, None].astype(np.float64) - c[None].astype(np.float64)), axis=1)
    np.testing.assert_array_equal(labels, brute)
    for j in range(8):  # every centroid is the mean of its points (a fixed point of Lloyd)
        np.testing.assert_allclose(c[j], x[labels == j].astype(np.float64).mean(), rtol=1e-5)
    assert np.isclose(inertia, ((x - c[labels]).astype(np.float64) ** 2).sum(), rtol=1e-9)
