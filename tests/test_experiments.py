"""Every experiment in experiments/ runs end to end in quick mode through the CLI.

The experiments are discovered (``experiments_cli.available()``), so a new
``experiments/<name>.py`` is covered here without editing this file. Each quick run
happens once per session (a module-scoped cache); the per-experiment checks below read
its files.
"""

from __future__ import annotations

import json
import math
import sys
import types

import numpy as np
import pytest

from jcompress import cli, experiments_cli
from experiments import common

NAMES = experiments_cli.available()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``quick_run(name)`` runs ``jcompress run name --quick`` once and returns its out dir."""
    done: dict = {}

    def get(name: str):
        if name not in done:
            out = tmp_path_factory.mktemp(name)
            rc = cli.main(["run", name, "--quick", "--out", str(out)])
            assert rc == 0, f"jcompress run {name} --quick exited with {rc}"
            done[name] = out
        return done[name]

    return get


def _load(out):
    return json.loads((out / "results.json").read_text())


def test_discovery_finds_the_pruning_experiments():
    assert {"han2015", "lottery_ticket", "gradual_vs_oneshot"} <= set(NAMES)
    assert "common" not in NAMES  # helpers without run() are not experiments


@pytest.mark.parametrize("name", NAMES)
def test_quick_run_writes_results(name, quick_run, capsys):
    out = quick_run(name)
    res = _load(out)
    assert isinstance(res["rows"], list) and res["rows"], "results.json must hold a non-empty rows list"
    assert all(isinstance(r, dict) and r for r in res["rows"])
    md = (out / "results.md").read_text()
    assert md.count("\n|") >= len(res["rows"]) + 1  # header separator + one line per row
    png = (out / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]  # atomic writes leave no temporaries


def test_unknown_experiment_lists_the_available_ones(capsys):
    assert cli.main(["run", "no_such_experiment", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'no_such_experiment'" in err and "han2015" in err


def test_experiment_without_rows_is_an_error(monkeypatch, tmp_path):
    fake = types.ModuleType("experiments.fake_empty")
    fake.run = lambda *, quick, data, out: {"rows": [], "table": ""}
    monkeypatch.setitem(sys.modules, "experiments.fake_empty", fake)
    monkeypatch.setattr(experiments_cli, "available", lambda: ["fake_empty"])
    with pytest.raises(RuntimeError, match="returned no rows"):
        experiments_cli.run_experiment("fake_empty", out=tmp_path)


def test_markdown_table_formats_and_rejects_bad_rows():
    rows = [{"a": 1, "b": 0.123456, "c": None}, {"a": 2, "b": float("nan"), "c": "x|y"}]
    assert common.markdown_table(rows).splitlines() == [
        "| a | b | c |",
        "|---|---|---|",
        "| 1 | 0.1235 |  |",
        "| 2 | nan | x\\|y |",
    ]
    assert common.markdown_table(rows, ["b"], formats={"b": "{:.1%}"}).splitlines()[2] == "| 12.3% |"
    with pytest.raises(ValueError, match="rows is empty"):
        common.markdown_table([])
    with pytest.raises(ValueError, match=r"columns \['zz'\]"):
        common.markdown_table(rows, ["a", "zz"])


def test_load_data_default_and_override():
    assert common.load_data(None, default="digits").name == "digits"
    with pytest.raises(ValueError, match="unknown dataset"):
        common.load_data("nope", default="digits")


# ----------------------------------------------------------------- per-experiment checks


def _needs(name):
    return pytest.mark.skipif(name not in NAMES, reason=f"experiments/{name}.py not present")


@_needs("han2015")
def test_han2015_reported_counts_match_the_masks(quick_run):
    out = quick_run("han2015")
    res = _load(out)
    with np.load(out / "pruned_params.npz") as z:
        saved = {k: z[k] for k in z.files}
    layers = [r for r in res["rows"] if r.get("layer") not in (None, "total")]
    assert layers
    for r in layers:
        name = f"{r['model']}/{r['layer']}"
        w = saved[name]
        assert r["params"] == w.size
        assert r["kept"] == int(np.count_nonzero(w))
        assert math.isclose(r["kept_fraction"], np.count_nonzero(w) / w.size, rel_tol=0, abs_tol=1e-12)
    for r in [r for r in res["rows"] if r.get("layer") == "total"]:
        leaves = {k: v for k, v in saved.items() if k.startswith(r["model"] + "/")}
        assert r["params"] == sum(v.size for v in leaves.values())
        assert r["kept"] == sum(int(np.count_nonzero(v)) for v in leaves.values())
        assert math.isclose(r["compression"], r["params"] / r["kept"], rel_tol=1e-9)
        assert r["compression"] > 1.0


@_needs("lottery_ticket")
def test_lottery_ticket_sparsity_follows_the_schedule(quick_run):
    res = _load(quick_run("lottery_ticket"))
    tickets = [r for r in res["rows"] if r["init"] == "rewound"]
    assert tickets
    by_task: dict = {}
    for r in tickets:
        by_task.setdefault(r["task"], []).append(r)
    for rows in by_task.values():
        sparsities = [r["sparsity"] for r in sorted(rows, key=lambda r: r["round"])]
        assert sparsities[0] == 0.0 and all(b > a for a, b in zip(sparsities, sparsities[1:]))
        # 20% of hidden-layer survivors and 10% of the output layer's per round
        assert 0.19 < sparsities[1] <= 0.2
        for r in rows:
            assert 0.0 <= r["accuracy"] <= 1.0
    # every pruned round's masks are also trained by both controls at the same sparsity
    for control in ("reinit", "random_mask"):
        got = {(r["task"], r["round"]): r["sparsity"] for r in res["rows"] if r["init"] == control}
        assert got == {(r["task"], r["round"]): r["sparsity"] for r in tickets if r["round"] > 0}


@_needs("gradual_vs_oneshot")
def test_gradual_vs_oneshot_reaches_the_target_sparsity(quick_run):
    res = _load(quick_run("gradual_vs_oneshot"))
    methods = {r["method"] for r in res["rows"]}
    assert {"gradual", "one-shot"} <= methods
    for r in res["rows"]:
        if r["method"] in ("gradual", "one-shot"):
            # measured from the final weights, so the schedule really ended at the target
            assert abs(r["measured_sparsity"] - r["target_sparsity"]) < 1e-3
            assert r["epochs"] == res["budget_epochs"]
