"""B4 benchmark (SparseGPT vs numpy reference): quick run, fields and correctness parts."""

import numpy as np

from jcompress.bench import b4_sparsegpt


def test_b4_quick_rows_and_correctness():
    rows = b4_sparsegpt.run(quick=True)
    assert len(rows) == 3
    for row in rows:
        assert {"name", "ratio", "target", "met"} <= set(row)
        assert isinstance(row["ratio"], float) and np.isfinite(row["ratio"]) and row["ratio"] > 0
        assert row["name"].startswith("B4 ")
    err, speed, cold = rows
    # correctness: same algorithm, same error (to float32 rounding) and the same exact zero count
    assert err["met"] and abs(err["ratio"] - 1.0) < 1e-3
    assert err["zeros_jax"] == err["zeros_numpy"] == 768 * 256 // 2
    assert 0 < err["error_jax"] < 0.1
    assert speed["seconds_jax"] > 0 and speed["seconds_numpy"] > 0 and speed["met"] == (speed["ratio"] <= 1.0)
    assert speed["seconds_jax_min_max"][0] <= speed["seconds_jax"] <= speed["seconds_jax_min_max"][1]
    # the first call includes compilation, so it is no faster than the steady state
    assert cold["first_call_jax"] >= speed["seconds_jax_min_max"][0] and cold["met"] == (cold["ratio"] <= 1.0)
    assert abs(cold["ratio"] - cold["first_call_jax"] / cold["first_call_numpy"]) < 1e-12


def test_reference_is_the_paper_algorithm_on_a_tiny_case():
    """With one block and H = I (no correlation), SparseGPT reduces to magnitude pruning per block."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 8)).astype(np.float32)
    new = b4_sparsegpt.reference_sparsegpt(w, np.eye(8, dtype=np.float32), sparsity=0.5, block=8)
    keep = np.zeros(w.size, bool)
    keep[np.argsort(np.abs(w).ravel())[16:]] = True
    np.testing.assert_allclose(new, np.where(keep.reshape(w.shape), w, 0), atol=1e-6)
