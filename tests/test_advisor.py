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
        "val_accuracy": accuracy,
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
        advisor.pareto_front(rows, objectives={"val_accuracy": "up"})
    # Failed recipes never appear.
    assert advisor.pareto_front(rows + [{"name": "x", "family": "custom", "error": "boom"}]) == advisor.pareto_front(
        rows
    )


_rows = st.lists(st.tuples(st.integers(0, 5), st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=12).map(
    lambda ts: [_row(f"r{i}", a / 5, b, float(c)) for i, (a, b, c) in enumerate(ts)]
)


@settings(max_examples=200, deadline=None)
@given(_rows)
def test_pareto_front_matches_definition(rows):
    front = advisor.pareto_front(rows)
    names = {r["name"] for r in front}

    def dominates(a, b):
        ge = a["val_accuracy"] >= b["val_accuracy"] and a["bytes"] <= b["bytes"] and a["latency_ms"] <= b["latency_ms"]
        gt = a["val_accuracy"] > b["val_accuracy"] or a["bytes"] < b["bytes"] or a["latency_ms"] < b["latency_ms"]
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
    adv = advisor.advise(params, apply_fn, eval_fn, inputs=x, candidates=cands, workdir=tmp_path, repeats=5)
    by_name = {r["name"]: r for r in adv.rows}
    assert list(by_name) == ["dense float32", "int8 PTQ", "broken"]  # the dense reference is added first
    assert by_name["broken"]["error"] == "ValueError: this recipe does not apply here"
    assert by_name["dense float32"]["val_accuracy"] == 1.0 and by_name["dense float32"]["test_accuracy"] is None
    for name, fname in (("dense float32", "dense_float32.jcz"), ("int8 PTQ", "int8_PTQ.jcz")):
        r = by_name[name]
        assert r["bytes"] == (tmp_path / fname).stat().st_size
        # the median with its interquartile range and extremes over the 5 timed calls; warm-up reported apart
        assert 0 < r["latency_min_ms"] <= r["latency_q1_ms"] <= r["latency_ms"] <= r["latency_q3_ms"]
        assert r["latency_q3_ms"] <= r["latency_max_ms"] and r["latency_repeats"] == 5 and r["latency_first_ms"] > 0
    verdict, speedup = advisor.latency_vs_dense(by_name["int8 PTQ"], by_name["dense float32"])
    assert by_name["int8 PTQ"]["latency_vs_dense"] == verdict and by_name["int8 PTQ"]["speedup"] == speedup
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
    with pytest.raises(ValueError, match="repeats=2 must be an int >= 3"):
        advisor.advise(params, apply_fn, eval_fn, inputs=x, candidates=cands, repeats=2)


def test_ranking_uses_validation_accuracy_never_test(tmp_path):
    """A candidate that is better on test but worse on validation is not chosen."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(1)
    w_val, w_test = rng.normal(size=(16, 4)).astype(np.float32), rng.normal(size=(16, 4)).astype(np.float32)
    x_val, x_test = (jnp.asarray(rng.normal(size=(200, 16)).astype(np.float32)) for _ in range(2))
    y_val, y_test = jnp.argmax(x_val @ w_val, -1), jnp.argmax(x_test @ w_test, -1)  # two different rules

    def apply_fn(p, inputs):
        return inputs @ p["fc"]["kernel"]

    def accuracy(x, y):
        return lambda p, apply: float(jnp.mean(jnp.argmax(apply(p, x), -1) == y))

    def int8_of(kernel, name):  # an int8 model of the given kernel: about the same file for both
        build = advisor.quantization_candidate(8).build
        return advisor.Candidate(name, "custom", True, lambda s: build(s._replace(params={"fc": {"kernel": kernel}})))

    cands = [int8_of(jnp.asarray(w_test), "fits test"), int8_of(jnp.asarray(w_val), "fits validation")]
    adv = advisor.advise(
        {"fc": {"kernel": jnp.asarray(w_val)}}, apply_fn, accuracy(x_val, y_val), test_fn=accuracy(x_test, y_test),
        inputs=x_val, candidates=cands, workdir=tmp_path, max_bytes=400, repeats=3,
    )  # fmt: skip
    rows = {r["name"]: r for r in adv.rows}
    bad, good = rows["fits test"], rows["fits validation"]
    assert bad["bytes"] <= good["bytes"] <= 400 < rows["dense float32"]["bytes"]  # the test-fitting one is no larger
    assert bad["test_accuracy"] > good["test_accuracy"] and bad["val_accuracy"] < good["val_accuracy"]
    assert adv.recommended["name"] == "fits validation"
    assert good["accuracy_drop"] == pytest.approx(rows["dense float32"]["val_accuracy"] - good["val_accuracy"])
    assert "test" in advisor.format_rows(adv.rows).splitlines()[0]


def test_latency_difference_within_the_spread_is_none():
    """Masked models run the dense matmuls: a median a little lower is "same as dense", not a speedup."""
    spread = lambda med, half: {"latency_q1_ms": med - half, "latency_q3_ms": med + half}
    rows = [
        {**_row("dense", 0.98, 1_000_000, 2.00, "dense"), **spread(2.00, 0.15)},
        {**_row("prune 90%", 0.978, 120_000, 1.90, "pruning"), **spread(1.90, 0.15)},  # 5% lower, inside the IQR
        {**_row("student", 0.95, 70_000, 0.50, "distillation", keeps=False), **spread(0.50, 0.05)},
        {**_row("slow", 0.97, 900_000, 3.00, "custom"), **spread(3.00, 0.10)},
    ]
    adv = advisor.summarize(rows, max_latency_ms=1.95)
    by = {r["name"]: r for r in adv.rows}
    assert by["dense"]["latency_vs_dense"] == "reference" and by["dense"]["speedup"] == 1.0
    assert by["prune 90%"]["latency_vs_dense"] == "same as dense" and by["prune 90%"]["speedup"] is None
    assert by["student"]["latency_vs_dense"] == "4.00x faster" and by["student"]["speedup"] == pytest.approx(4.0)
    assert by["slow"]["latency_vs_dense"] == "1.50x slower" and by["slow"]["speedup"] == pytest.approx(2 / 3)
    # on the Pareto front, latencies whose IQRs overlap are equal even beyond the relative tolerance (14% here)
    a, b = {**_row("a", 0.9, 100, 1.9), **spread(1.9, 0.15)}, {**_row("b", 0.9, 100, 2.2), **spread(2.2, 0.3)}
    front = lambda **kw: [r["name"] for r in advisor.pareto_front([a, b], tolerance={"latency_ms": 0.1}, **kw)]
    assert front(spread={"latency_ms": advisor.LATENCY_SPREAD}) == ["a", "b"] and front() == ["a"]
    assert "same as dense" in advisor.format_rows(adv.rows) and "4.00x faster" in advisor.format_rows(adv.rows)
    # the recommended pruned model is said to run the dense matmuls, at the same measured speed
    assert adv.recommended["name"] == "prune 90%" and "measured: same as dense" in adv.reason
    # without a measured spread, medians are compared as they are
    assert advisor.latency_vs_dense(_row("a", 1, 1, 1.9), _row("d", 1, 1, 2.0)) == ("1.05x faster", 2.0 / 1.9)


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
    assert cli.main(["train", "--model", "lenet300", "--data", "digits", "--epochs", "3", "--out", str(run)]) == 0
    out = tmp_path / "advice"
    argv = ["advise", "--model", str(run / "ckpt"), "--data", "digits", "--quick", "--epochs", "1",
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
    assert "Pareto front" in printed and "Chosen on validation accuracy" in printed
    for r in res["rows"]:  # ranked on validation, test measured once and reported, latency with its spread
        assert 0 <= r["val_accuracy"] <= 1 and 0 <= r["test_accuracy"] <= 1
        assert r["latency_q1_ms"] <= r["latency_ms"] <= r["latency_q3_ms"]
        if r["keeps_architecture"] and r["family"] != "dense" and r["latency_vs_dense"] != "same as dense":
            assert not (r["latency_q1_ms"] <= dense["latency_ms"] <= r["latency_q3_ms"])
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "# Compression advice" in (out / "advice.md").read_text()


def test_plot_labels_do_not_overlap():
    """Twelve candidates, nine of them at the same latency and close in accuracy: every label has its own place."""
    import matplotlib.pyplot as plt

    rows = [_row("dense", 0.975, 200_000, 0.300, "dense")]
    rows += [_row(f"masked {i}", 0.970 + 0.0005 * i, 20_000 + 3_000 * i, 0.300 + 0.001 * i) for i in range(9)]
    rows += [
        _row(f"student {i}", 0.95 + 0.01 * i, 15_000 * (i + 1), 0.1 * (i + 1), "distillation", False) for i in range(2)
    ]
    for r in rows:
        r.update(latency_q1_ms=0.97 * r["latency_ms"], latency_q3_ms=1.03 * r["latency_ms"])
    fig = advisor.plot_figure(advisor.summarize(rows, max_bytes=50_000))
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        labels = [t for t in ax.texts if t.get_text().isdigit()]
        assert sorted(int(t.get_text()) for t in labels) == list(range(1, len(rows) + 1))
        boxes = [t.get_window_extent(renderer) for t in labels]
        for i, a in enumerate(boxes):
            assert not any(a.overlaps(b) for b in boxes[i + 1 :]), labels[i].get_text()
    assert "validation accuracy" == fig.axes[0].get_ylabel()
    plt.close(fig)


def test_sharing_leaves_a_kernel_that_pruning_emptied_as_zeros(tmp_path):
    # global pruning at a high rate can empty a whole layer: k-means has nothing to share there
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jcompress import export
    from jcompress.advisor import candidates
    from jcompress.advisor.records import Subject

    rng = np.random.default_rng(0)
    params = {
        "fc1": {"kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32), "bias": jnp.zeros(8)},
        "fc2": {"kernel": jnp.zeros((8, 4), jnp.float32), "bias": jnp.zeros(4)},
    }

    def apply_fn(p, x):
        return jax.nn.relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"]) @ p["fc2"]["kernel"] + p["fc2"]["bias"]

    subject = Subject(params, apply_fn, None, None, None, tmp_path, 0, (16,))
    built = candidates.sharing_candidate().build(subject)
    back = export.load_params(built.path)
    assert np.unique(np.asarray(back["fc1"]["kernel"])).size == 31  # 5-bit codebook of a Dense kernel
    np.testing.assert_array_equal(np.asarray(back["fc2"]["kernel"]), 0.0)
    np.testing.assert_array_equal(np.asarray(built.params["fc2"]["kernel"]), 0.0)
