"""B5 quick run: the rows carry the contract's fields and the correctness parts hold."""

import math

from jcompress.bench import b5_distill


def test_b5_quick_rows():
    rows = b5_distill.run(quick=True)
    assert len(rows) == 6
    for r in rows:
        assert {"name", "ratio", "target", "met"} <= set(r)
        assert r["name"].startswith("B5 ") and isinstance(r["met"], bool)
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0
    live, cached, *scaling = rows
    # the FLOP prediction for 1200-1200 teacher / 800-800 student on 784 inputs
    t_fwd = 2 * (784 * 1200 + 1200 * 1200 + 1200 * 10)
    s_fwd = 2 * (784 * 800 + 800 * 800 + 800 * 10)
    s_fb = 3 * s_fwd - 2 * 784 * 800
    assert abs(live["predicted_ratio"] - (s_fb + t_fwd) / s_fb) < 1e-9
    assert abs(live["predicted_ratio_3x"] - (1 + t_fwd / (3 * s_fwd))) < 1e-9
    assert cached["predicted_ratio"] == 1.0
    # data parallel on 1/2/4/8 host devices gives the one-device params
    assert [r["devices"] for r in scaling] == [1, 2, 4, 8]
    assert scaling[0]["ratio"] == 1.0
    for r in scaling:
        assert r["met"] and r["max_rel_param_diff"] <= 1e-5
