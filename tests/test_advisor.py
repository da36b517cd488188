"""Tests of the compression advisor: Pareto front, constraints, reasons, and the CLI end to end."""

from __future__ import annotations

import itertools
import json

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from jcompress import advisor


def _row(name, accuracy, nbytes, latency, family="pruning", keeps=True):
    return {
        "name": name,
        "family": family,
        "keeps_architecture": keeps,
        "accuracy": accuracy,
        "bytes": nbytes,
        "latency_ms": latency,
    }


# ------------------------------------------------------------------------------ Pareto front


def test_pareto_front_hand_made_rows():
    rows = [
        _row("a", 0.90, 100, 1.0),
        _row("b", 0.80, 200, 1.0),  # dominated by a on accuracy and bytes
        _row("c", 0.95, 300, 1.0),  # most accurate
        _row("d", 0.90, 100, 1.0),  # exact tie with a: both stay
        _row("e", 0.85, 50, 2.0),  # smallest, slower
        _row("f", 0.85, 50, 2.5),  # dominated by e on latency only
        _row("g", 0.70, 400, 0.5),  # fastest
    ]
    front = advisor.pareto_front(rows, objectives=advisor.OBJECTIVES)
    assert [r["name"] for r in front] == ["a", "c", "d", "e", "g"]


def test_pareto_front_tolerance_and_missing_objective():
    rows = [_row("dense", 0.9, 400, 1.00, "dense"), _row("masked", 0.9, 100, 1.04), _row("other", 0.9, 100, 1.03)]
    # Exact: 'other' is faster than 'masked' by timing noise and dominates it.
    assert [r["name"] for r in advisor.pareto_front(rows)] == ["dense", "other"]
    # Within 10% the latencies are equal: 'masked' and 'other' tie; 'dense' is larger and no faster.
    assert [r["name"] for r in advisor.pareto_front(rows, tolerance={"latency_ms": 0.1})] == ["masked", "other"]
    # Latency not measured at all: the objective is dropped.
    unmeasured = [dict(r, latency_ms=None) for r in rows]
    assert [r["name"] for r in advisor.pareto_front(unmeasured)] == ["masked", "other"]
    with pytest.raises(ValueError, match="latency_ms"):
        advisor.pareto_front([rows[0], dict(rows[1], latency_ms=None)])
    with pytest.raises(ValueError, match="'max' or 'min'"):
        advisor.pareto_front(rows, objectives={"accuracy": "up"})
    # Failed recipes never appear.
    assert advisor.pareto_front(rows + [{"name": "x", "family": "custom", "error": "boom"}]) == advisor.pareto_front(rows)


_rows = st.lists(
    st.tuples(st.integers(0, 5), st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=12
).map(lambda ts: [_row(f"r{i}", a / 5, b, float(c)) for i, (a, b, c) in enumerate(ts)])


@settings(max_examples=200, deadline=None)
@given(_rows)
def test_pareto_front_matches_definition(rows):
    front = advisor.pareto_front(rows)
    names = {r["name"] for r in front}

    def dominates(a, b):
        ge = a["accuracy"] >= b["accuracy"] and a["bytes"] <= b["bytes"] and a["latency_ms"] <= b["latency_ms"]
        gt = a["accuracy"] > b["accuracy"] or a["bytes"] < b["bytes"] or a["latency_ms"] < b["latency_ms"]
        return ge and gt

    for r in rows:
        dominated = any(dominates(o, r) for o in rows)
        assert (r["name"] in names) == (not dominated)
    for a, b in itertools.product(front, front):  # no front row dominates another
        assert not dominates(a, b)
    for r in rows:  # every row off the front is dominated by a row on it
        if r["name"] not in names:
            assert any(dominates(f, r) for f in front)


# ------------------------------------------------------------------------------ constraints


def _measured():
    return [
        _row("dense", 0.980, 1_000_000, 2.0, "dense"),
        _row("prune 90%", 0.978, 120_000, 2.0, "pruning"),
        _row("int8", 0.979, 260_000, 2.0, "quantization"),
        _row("int4", 0.960, 130_000, 2.0, "quantization"),
        _row("prune + share + huffman", 0.975, 30_000, 2.0, "combination"),
        _row("student x0.25", 0.950, 70_000, 0.4, "distillation", keeps=False),
    ]


def test_recommendation_meets_each_constraint_and_optimises_the_right_thing():
    rows = _measured()
    # Size budget: the most accurate candidate under it.
    adv = advisor.summarize(rows, max_bytes=150_000)
    assert adv.recommended["name"] == "prune 90%"
    assert adv.recommended["bytes"] <= 150_000 and adv.recommended["pareto"]
    assert "keeps the architecture" in adv.reason
    # Only an accuracy budget: the smallest file within it.
    adv = advisor.summarize(rows, max_accuracy_drop=0.01)
    assert adv.recommended["name"] == "prune + share + huffman"
    assert adv.recommended["accuracy_drop"] <= 0.01
    assert adv.recommended["ratio"] == pytest.approx(1_000_000 / 30_000)
    # Latency: masked models run at dense speed; only the student is fast enough.
    adv = advisor.summarize(rows, max_latency_ms=1.0)
    assert adv.recommended["name"] == "student x0.25"
    assert adv.recommended["latency_ms"] <= 1.0
    assert "smaller architecture" in adv.reason and "dense speed" in adv.reason
    # A tight size budget that no single technique meets: the combination, and the reason says so.
    adv = advisor.summarize(rows[:5], max_bytes=50_000, max_accuracy_drop=0.01)
    assert adv.recommended["name"] == "prune + share + huffman"
    assert "No single technique was enough" in adv.reason
    # Every row carries its verdict.
    for r in adv.rows:
        assert r["feasible"] == (r["bytes"] <= 50_000 and r["accuracy_drop"] <= 0.01 + 1e-12)


def test_keep_architecture_and_no_constraints():
    rows = _measured()
    adv = advisor.summarize(rows, max_latency_ms=1.0, keep_architecture=True)
    assert adv.recommended is None
    assert adv.closest["keeps_architecture"]
    # No constraints at all: one point of accuracy is assumed and the smallest such file wins.
    adv = advisor.summarize(rows)
    assert adv.constraints["max_accuracy_drop"] == advisor.DEFAULT_ACCURACY_DROP
    assert adv.recommended["name"] == "prune + share + huffman"
    assert "assumed" in adv.reason


def test_infeasible_names_the_closest_candidate():
    rows = _measured()
    adv = advisor.summarize(rows, max_bytes=20_000, max_accuracy_drop=0.001)
    assert adv.recommended is None
    assert adv.closest["name"] == "prune + share + huffman"  # 50% over on bytes, 0.5 points over on accuracy
    assert "No candidate meets the constraints" in adv.reason
    assert "prune + share + huffman" in adv.reason and "size limit by 10.0 KB (50%)" in adv.reason
    assert set(adv.closest["violations"]) == {"max_bytes", "max_accuracy_drop"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_bytes": 0}, "max_bytes"),
        ({"max_bytes": -5}, "max_bytes"),
        ({"max_accuracy_drop": 1.5}, "max_accuracy_drop"),
        ({"max_accuracy_drop": -0.1}, "max_accuracy_drop"),
        ({"max_latency_ms": 0}, "max_latency_ms"),
    ],
)
def test_bad_constraints_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        advisor.summarize(_measured(), **kwargs)


def test_rows_need_one_dense_reference_and_unique_names():
    rows = _measured()
    with pytest.raises(ValueError, match="dense"):
        advisor.summarize(rows[1:])
    with pytest.raises(ValueError, match="unique"):
        advisor.summarize(rows + [rows[1]])
    with pytest.raises(ValueError, match="latency was not measured"):
        advisor.summarize([dict(r, latency_ms=None) for r in rows], max_latency_ms=1.0)


# ------------------------------------------------------------------------------ advise() on plain params


def test_advise_on_plain_params_measures_real_files(tmp_path):
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 4)).astype(np.float32)
    x = jnp.asarray(rng.normal(size=(64, 16)).astype(np.float32))
    params = {"fc": {"kernel": jnp.asarray(w), "bias": jnp.zeros(4, jnp.float32)}}

    def apply_fn(p, inputs):
        return inputs @ p["fc"]["kernel"] + p["fc"]["bias"]

    labels = jnp.argmax(apply_fn(params, x), -1)  # the dense model is right by construction

    def eval_fn(p, apply):
        return float(jnp.mean(jnp.argmax(apply(p, x), -1) == labels))

    def broken(subject):
        raise ValueError("this recipe does not apply here")

    cands = [advisor.quantization_candidate(8), advisor.Candidate("broken", "custom", True, broken)]
    adv = advisor.advise(params, apply_fn, eval_fn, inputs=x, candidates=cands, workdir=tmp_path, repeats=2)
    by_name = {r["name"]: r for r in adv.rows}
    assert list(by_name) == ["dense float32", "int8 PTQ", "broken"]  # the dense reference is added first
    assert by_name["broken"]["error"] == "ValueError: this recipe does not apply here"
    assert by_name["dense float32"]["accuracy"] == 1.0
    for name, fname in (("dense float32", "dense_float32.jcz"), ("int8 PTQ", "int8_PTQ.jcz")):
        assert by_name[name]["bytes"] == (tmp_path / fname).stat().st_size
        assert by_name[name]["latency_ms"] > 0
    assert by_name["int8 PTQ"]["bytes"] < by_name["dense float32"]["bytes"]
    assert "broken" not in [r["name"] for r in adv.pareto]
    # Eager and jitted apply agree on the int8 params read back from the file.
    from jcompress import export

    back = export.load_params(tmp_path / "int8_PTQ.jcz")
    np.testing.assert_allclose(jax.jit(apply_fn)(back, x), apply_fn(back, x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="inputs="):
        advisor.advise(params, apply_fn, eval_fn, max_latency_ms=1.0, candidates=cands)
    with pytest.raises(ValueError, match="apply_fn is required"):
        advisor.advise(params, None, eval_fn)
    with pytest.raises(ValueError, match="NaN"):
        advisor.advise({"fc": {"kernel": jnp.full((2, 2), jnp.nan)}}, apply_fn, eval_fn)


def test_student_config_scales_widths():
    assert advisor.student_config({"name": "lenet300", "input_shape": [8, 8, 1], "num_classes": 10}, 0.25) == {
        "input_shape": [8, 8, 1], "num_classes": 10, "name": "mlp", "widths": [75, 25],
    }  # fmt: skip
    assert advisor.student_config({"name": "lenet5"}, 0.5) == {"name": "lenet5", "channels": [10, 25], "hidden": 250}
    with pytest.raises(ValueError, match="width_fraction"):
        advisor.student_config({"name": "mlp"}, 0.0)
    with pytest.raises(ValueError, match="no rule"):
        advisor.student_config({"name": "bert"}, 0.5)


# ------------------------------------------------------------------------------ the command line


def test_cli_advise_end_to_end(tmp_path, capsys):
    from jcompress import cli

    run = tmp_path / "dense"
    assert cli.main(["train", "--model", "lenet300", "--data", "digits", "--epochs", "8", "--out", str(run)]) == 0
    out = tmp_path / "advice"
    argv = ["advise", "--model", str(run / "ckpt"), "--data", "digits", "--quick", "--epochs", "2",
            "--distill-epochs", "2", "--max-bytes", "80000", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "advice.json").read_text())
    names = [r["name"] for r in res["rows"]]
    assert names == [
        "dense float32", "prune 90%", "int8 PTQ", "prune 90% + share + Huffman", "distill x0.25 widths",
    ]  # fmt: skip
    assert not [r for r in res["rows"] if r.get("error")]
    assert set(res["pareto"]) <= set(names) and res["pareto"]
    dense = res["rows"][0]
    assert dense["family"] == "dense" and dense["bytes"] > 80_000  # float32 LeNet-300-100 on 8x8 inputs: 203,846 B
    if res["recommended"] is not None:
        rec = next(r for r in res["rows"] if r["name"] == res["recommended"])
        assert rec["bytes"] <= 80_000 and rec["pareto"] and rec["feasible"]
        assert res["recommended"] in printed and "Recommended" in res["reason"]
    else:
        assert "No candidate meets the constraints" in res["reason"]
    for r in res["rows"]:
        assert r["feasible"] == (r["bytes"] <= 80_000)
    assert "Pareto front" in printed
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "# Compression advice" in (out / "advice.md").read_text()
