"""The bench runner's JSON contract, with B2 (correctness of the timed transforms) and B7."""

import json

from jcompress.bench.__main__ import main


def test_runner_writes_one_row_per_figure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--quick", "--only", "b2_elementwise,b7_pipeline", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["quick"] is True and {"backend", "jax", "devices"} <= set(doc["machine"])
    rows = {r["name"].split(",")[0].split(" (")[0]: r for r in doc["benchmarks"]}
    for r in doc["benchmarks"]:
        assert {"name", "ratio", "target", "met", "module"} <= set(r)
        assert isinstance(r["ratio"], float) and r["ratio"] > 0
    fq = rows["B2 mask + per-channel int8 fake-quant"]
    # The timed library call is a correct symmetric int8 quantizer: within half a step of
    # the masked weights, and the same codes as numpy except for float ties.
    assert fq["max_error_in_steps"] <= 0.5 + 1e-4
    assert fq["codes_differing_from_numpy"] <= 1e-5 * fq["bytes_counted"] / 9
    assert fq["met"] == (fq["ratio"] >= 0.5)
    b7 = [r for r in doc["benchmarks"] if r["module"] == "b7_pipeline"]
    assert len(b7) == 2 and all(r["met"] is None and r["target"] == "report" for r in b7)
    assert b7[0]["final_file_bytes"] * 20 < b7[0]["dense_file_bytes"]
    # both times are rounded to 0.01 s in the row, the ratio is not
    assert abs(b7[0]["ratio"] - b7[0]["pipeline_s"] / b7[0]["training_s"]) <= 0.01 * b7[0]["ratio"]
    printed = capsys.readouterr().out
    assert printed.count("B2 ") == 2 and "NOT met" not in printed.split("B7")[1]
