"""B10 (one-shot compression of a decoder, block by block): the quick rows and the memory probe.

The quick benchmark runs one child process (SparseGPT on a 2- and a 4-block Llama with
64-wide projections), so the test pays one JAX start-up and one compilation.
"""

import json
import sys

import numpy as np
import pytest

from jcompress.bench import b10_blockwise as b10
from jcompress.bench.__main__ import main

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="B10 reads /proc")


def test_peak_counter_sees_an_allocation_and_resets():
    """The in-process instrument: an array written after the reset raises the peak by its size."""
    size = 64 << 20
    base = b10._settle()
    b10._reset_peak()
    assert b10._status_kib("VmHWM") * 1024 - base < 8 << 20  # the reset brought the peak down to now
    a = np.ones(size // 8)
    del a
    seen = b10._status_kib("VmHWM") * 1024 - base
    assert 0.95 * size <= seen <= size + (8 << 20)


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    out = tmp_path_factory.mktemp("b10") / "b10.json"
    assert main(["--quick", "--only", "b10_blockwise", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_quick_rows_are_well_formed(doc):
    rows = doc["benchmarks"]
    for r in rows:
        assert {"name", "ratio", "target", "met", "module"} <= set(r) and r["module"] == "b10_blockwise"
        assert isinstance(r["ratio"], float) and r["ratio"] > 0
        assert (r["met"] is None) == (r["target"] == "report")
    names = [r["name"] for r in rows]
    assert len(rows) == 5 and names[0].startswith("B10 memory probe")
    assert sum("4 layers / 2 layers" in n for n in names) == 2 and sum("(block params" in n for n in names) == 2
    q = b10.QUICK
    d, ff = q["hidden"], q["intermediate"]
    block = 4 * (4 * d * d + 3 * d * ff + 2 * d)  # q, k, v, o (4 heads of 16), MLP, two norms; float32
    states = q["num_sequences"] * q["seq_len"] * d * 4
    by_layers = {}
    for r in rows[1:]:
        assert r["block_param_bytes"] == block and r["calibration_state_bytes"] == states
        if "(block params" in r["name"]:
            assert r["ratio"] == r["peak_extra_warm_bytes"] / (block + states)
            assert r["peak_extra_warm_bytes"] > 0 and r["baseline_rss_bytes"] > 50 << 20
            by_layers[r["num_layers"]] = r["peak_extra_warm_bytes"]
    growth = rows[1]
    assert growth["ratio"] == by_layers[4] / by_layers[2]
    assert growth["met"] == (growth["ratio"] <= 1.2)
    # the first run in the fresh process compiles: its peak is far above the warm one
    small = next(r for r in rows if r.get("num_layers") == 2)
    assert small["peak_extra_cold_bytes"] > 10 * small["peak_extra_warm_bytes"]


def test_child_measurement_sees_the_probe_array(doc):
    """The child's peak extra memory grows by the size of an array written while it is measured."""
    probe = doc["benchmarks"][0]
    assert probe["probe_bytes"] == b10.QUICK["probe_bytes"]
    grew = probe["peak_extra_with_probe_bytes"] - probe["peak_extra_without_bytes"]
    assert 0.9 * probe["probe_bytes"] <= grew <= 1.1 * probe["probe_bytes"]
    assert probe["met"] is True and probe["ratio"] == grew / probe["probe_bytes"]
