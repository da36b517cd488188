"""B1 quick run: the fields the bench runner needs, and the correctness parts."""

from jcompress.bench import b1_threshold


def test_b1_quick_fields_and_exact_thresholds():
    rows = b1_threshold.run(quick=True)
    assert len(rows) == 3
    for row in rows:
        assert {"name", "ratio", "target", "met"} <= set(row)
        assert isinstance(row["ratio"], float) and isinstance(row["met"], bool)
        assert row["equal"] is True  # jcompress's threshold equals np.partition's exactly
    timed, sharded = rows[:2], rows[2]
    for row in timed:
        assert row["seconds_jcompress"] > 0 and row["seconds_np_partition"] > 0
        assert abs(row["ratio"] - row["seconds_jcompress"] / row["seconds_np_partition"]) < 1e-12
    assert sharded["all_gathers"] == 0 and sharded["all_reduces"] > 0
    assert sharded["met"] is True
