"""B1 quick run: the fields the bench runner needs, and the correctness parts on every distribution."""

from jcompress.bench import b1_threshold


def test_b1_quick_fields_and_exact_thresholds_and_counts():
    rows = b1_threshold.run(quick=True)
    timed = [r for r in rows if r.get("path") in ("eager", "jit")]
    user = [r for r in rows if r.get("path") == "user call"]
    sharded = rows[-1]
    assert len(rows) == len(timed) + len(user) + 1
    assert len(timed) == 4 * len(b1_threshold.DISTRIBUTIONS)  # threshold and mask, eager and jit
    assert {r["distribution"] for r in timed} == set(b1_threshold.DISTRIBUTIONS)
    for row in rows:
        assert {"name", "ratio", "target", "met"} <= set(row)
        assert isinstance(row["ratio"], float) and isinstance(row["met"], bool)
        assert row["equal"] is True  # jcompress's threshold equals np.partition's exactly
    for row in timed:
        assert row["elements"] == 4 * 2**20 and row["k"] == row["elements"] - round(0.9 * row["elements"])
        assert row["kept_jcompress"] == row["k"]  # exact count, ties and zeros included
        assert row["kept_numpy_mask"] >= row["k"]  # |w| >= t keeps every tie
        assert row["seconds_jcompress"] > 0 and row["seconds_numpy"] > 0
        assert abs(row["ratio"] - row["seconds_jcompress"] / row["seconds_numpy"]) < 1e-12
    assert {r["path"] for r in timed} == {"eager", "jit"}
    for ties in (r for r in timed if r["distribution"] == "int8_ties"):
        assert ties["kept_numpy_mask"] > ties["k"]  # the tie-resolving path was taken
    assert sharded["all_gathers"] == 0 and sharded["all_reduces"] > 0
    assert sharded["met"] is True
    assert [r["sparsity"] for r in user] == list(b1_threshold.USER_SPARSITIES)
    for row in user:  # the eager user call prunes exactly k on tied weights, like numpy off the ties
        assert row["elements"] == 4 * 2**20 and row["distribution"] == "int8_ties"
        assert row["kept_jcompress"] == row["k"] == row["elements"] - round(row["sparsity"] * row["elements"])
        assert row["kept_numpy_mask"] > row["k"]
        assert abs(row["ratio"] - row["seconds_jcompress"] / row["seconds_numpy"]) < 1e-12
