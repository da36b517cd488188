"""B3 benchmark (k-means vs scikit-learn): fields and correctness of a quick run (no timing assertions)."""

from jcompress.bench import b3_kmeans


def test_b3_quick_fields_and_inertia():
    rows = b3_kmeans.run(quick=True)
    assert len(rows) == 1
    row = rows[0]
    for key in ("name", "ratio", "target", "met", "jcompress_s", "sklearn_s", "inertia", "sklearn_inertia"):
        assert key in row
    assert row["target"] == ">= 10" and isinstance(row["met"], bool)
    assert row["ratio"] > 0 and row["n"] == 200_000 and row["k"] == 32
    # same iterations, and the inertia is no worse than scikit-learn's
    assert row["iterations"] == row["sklearn_iterations"] <= row["max_iters"]
    assert row["inertia_no_worse"] and row["inertia"] <= row["sklearn_inertia"] * (1 + 1e-6)
