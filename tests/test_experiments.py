"""Every experiment runs end to end in quick mode through the CLI and shows its paper's
direction; configs, overrides, seeds and the paired comparisons.

The experiments are the ``jcompress.experiments`` entry points (``experiments_cli.available()``),
so an experiment declared in pyproject.toml is covered here without editing this file. Each
experiment's quick run happens once, in one test, which then runs that experiment's checks
(``CHECKS``): they read its files and assert the direction its paper reports, at seed 0.
"""

from __future__ import annotations

import itertools
import json
import math
import textwrap
import types
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from experiments import common, oneshot_llm
from jcompress import cli, experiments_cli

NAMES = experiments_cli.available()


def _load(out):
    return json.loads((out / "results.json").read_text())


def _claim(res, words):
    """The comparison of ``res`` whose name contains every string of ``words``."""
    found = [c for c in res["comparisons"] if all(w in c["name"] for w in words)]
    assert len(found) == 1, f"{words}: {[c['name'] for c in res['comparisons']]}"
    return found[0]


def test_discovery_finds_every_experiment_file():
    files = {p.stem for p in (Path(common.__file__).parent).glob("*.py")} - {"__init__", "common"}
    assert set(NAMES) == files  # every experiments/*.py is declared as an entry point, and nothing else
    assert {"han2015", "lottery_ticket", "gradual_vs_oneshot"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_experiment_has_paper_and_quick_configs(name):
    _, module = experiments_cli.load(name)
    paper, quick = module.get_config(), module.get_config("quick")
    for config in (paper, quick):
        assert isinstance(config, ml_collections.ConfigDict)
        assert {"quick", "data", "seed"} <= set(config.keys())
    assert paper.quick is False and quick.quick is True
    assert paper.to_dict() != quick.to_dict()
    assert set(paper.keys()) == set(quick.keys())  # quick changes values, never the fields
    with pytest.raises(ValueError, match="variant"):
        module.get_config("fast")


@pytest.mark.parametrize("name", NAMES)
def test_quick_run_writes_results_and_shows_the_papers_direction(name, tmp_path):
    """One quick run per experiment, in one test: the files every run writes, then the
    experiment's own checks (``CHECKS`` below), all reading this run's results. One test per
    run, so that no two pytest-xdist workers run the same experiment."""
    out = tmp_path / name
    rc = cli.main(["run", name, "--quick", "--out", str(out)])
    assert rc == 0, f"jcompress run {name} --quick exited with {rc}"
    res = _load(out)
    assert isinstance(res["rows"], list) and res["rows"], "results.json must hold a non-empty rows list"
    assert all(isinstance(r, dict) and r for r in res["rows"])
    md = (out / "results.md").read_text()
    assert md.count("\n|") >= len(res["rows"]) + 1  # header separator + one line per row
    png = (out / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]  # atomic writes leave no temporaries
    _, module = experiments_cli.load(name)
    assert res["config"] == json.loads(json.dumps(module.get_config("quick").to_dict()))  # the resolved config
    for check in CHECKS.get(name, ()):
        check(out)


def test_unknown_experiment_lists_the_available_ones(capsys):
    assert cli.main(["run", "no_such_experiment", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'no_such_experiment'" in err and "han2015" in err


def test_experiment_without_rows_is_an_error(monkeypatch, tmp_path):
    fake = types.ModuleType("fake_empty")
    fake.get_config = lambda variant="paper": common.base_config(variant, data="digits")
    fake.run = lambda config, workdir: {"rows": [], "table": ""}
    monkeypatch.setattr(experiments_cli, "load", lambda name: (name, fake))
    with pytest.raises(RuntimeError, match="returned no rows"):
        experiments_cli.run_experiment("fake_empty", out=tmp_path)


# A user's own experiment: a file outside the package, run by path. It trains nothing, so
# the overrides and the results file are checked in well under a second.
MY_EXPERIMENT = textwrap.dedent(
    """
    from experiments import common, oneshot_llm


    def get_config(variant="paper"):
        config = common.base_config(variant, data="digits", epochs=30, lr=0.1, widths=(8, 4), note="x", train=True,
                                    model={"name": "mlp", "dropout": 0.5})
        if config.quick:
            config.epochs = 1
        return config


    def run(config, workdir):
        ds = common.load_data(config.data, config.data_dir)
        fig, ax = common.figure()
        ax.plot([0, 1], [0, 1])
        rows = [{"epochs": config.epochs, "lr": config.lr, "seed": config.seed, "images": len(ds.x_test),
                 "widths": list(config.widths), "dropout": config.model.dropout, "train": config.train}]
        return common.write_results(workdir, rows, figure=fig, name="mine", config=config)
    """
)


@pytest.fixture
def my_experiment(tmp_path):
    path = tmp_path / "my_exp.py"
    path.write_text(MY_EXPERIMENT)
    return path


def test_user_experiment_file_runs_with_typed_overrides(my_experiment, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["run", str(my_experiment), "--quick", "--out", str(out), "--config.epochs=5", "--config.seed", "3",
            "--config.lr=1", "--config.widths=(16,)", "--config.model.dropout=0.25", "--config.train=false"]  # fmt: skip
    assert cli.main(argv) == 0
    res = _load(out)
    assert res["rows"] == [
        {"epochs": 5, "lr": 1.0, "seed": 3, "images": res["rows"][0]["images"], "widths": [16], "dropout": 0.25,
         "train": False}
    ]  # fmt: skip
    assert res["config"] == {
        "quick": True, "data": "digits", "data_dir": "", "seed": 3, "epochs": 5, "lr": 1.0, "widths": [16], "note": "x",
        "train": False, "model": {"name": "mlp", "dropout": 0.25},
    }  # fmt: skip
    assert isinstance(res["config"]["lr"], float)  # an int given for a float field stays a float
    assert "| 5 |" in capsys.readouterr().out


def test_data_option_sets_the_config_field(my_experiment, tmp_path):
    assert cli.main(["run", str(my_experiment), "--data", "digits", "--out", str(tmp_path / "o")]) == 0
    assert _load(tmp_path / "o")["config"]["data"] == "digits"


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.epoch=5", "unknown config field 'epoch'; fields: data, data_dir, epochs, lr, model.dropout, model.name"),
        ("--config.model.size=3", "unknown config field 'model.size'"),
        ("--config.epochs=2.5", r"--config.epochs='2.5': expected int"),
        ("--config.lr=fast", r"--config.lr='fast': expected float"),
        ("--config.train=maybe", "expected true or false"),
        ("--config.model=3", "config field 'model' is a group"),
        ("--config.widths=oops", "expected a Python literal"),
        ("--epochs=5", "unrecognized argument '--epochs=5'"),
    ],
)
def test_bad_overrides_exit_2_naming_the_field(my_experiment, tmp_path, capsys, override, message):
    assert cli.main(["run", str(my_experiment), "--out", str(tmp_path), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jcompress run: error:")
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "results.json").exists()  # nothing ran


def test_options_of_other_commands_are_not_overrides(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--out", "x", "--config.epochs=3"])
    assert e.value.code == 2 and "unrecognized arguments: --config.epochs=3" in capsys.readouterr().err


def test_missing_experiment_file_and_incomplete_module(tmp_path, capsys):
    assert cli.main(["run", str(tmp_path / "nope.py")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "half.py").write_text("def run(config, workdir):\n    return {}\n")
    assert cli.main(["run", str(tmp_path / "half.py")]) == 2
    assert "does not define get_config" in capsys.readouterr().err


def test_config_is_locked_while_the_experiment_runs(my_experiment):
    _, module = experiments_cli.load(str(my_experiment))
    config = experiments_cli.resolve_config(module, overrides=["--config.epochs=2"])
    assert config.epochs == 2
    with pytest.raises(AttributeError):
        config.new_field = 1  # an experiment cannot read a setting the config does not declare


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


def test_load_data_by_name():
    assert common.load_data("digits").name == "digits"
    with pytest.raises(ValueError, match="unknown dataset"):
        common.load_data("nope")


# ----------------------------------------------------------------- per-experiment checks


def check_han2015_reported_counts_match_the_masks(out):
    res = _load(out)
    with np.load(out / "seed-0" / "pruned_params.npz") as z:
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
        # the paper's direction: at least 10x fewer parameters within a few points of the dense error
        assert r["compression"] >= 10.0
        assert r["pruned_error"] - r["dense_error"] < 0.03, r
    assert _claim(res, ["lenet300", "pruned vs dense,"])["verdict"] == "one seed, no verdict"


def check_lottery_ticket_sparsity_follows_the_schedule(out):
    res = _load(out)
    tickets = [r for r in res["rows"] if r["init"] == "rewound"]
    assert tickets
    by_task: dict = {}
    for r in tickets:
        by_task.setdefault(r["task"], []).append(r)
    for rows in by_task.values():
        sparsities = [r["sparsity"] for r in sorted(rows, key=lambda r: r["round"])]
        assert sparsities[0] == 0.0 and all(b > a for a, b in itertools.pairwise(sparsities))
        # rate of the hidden-layer survivors and output_rate of the output layer's per round
        rate, output_rate = res["config"]["rate"], res["config"]["output_rate"]
        assert output_rate < sparsities[1] <= rate
        for r in rows:
            assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["val_accuracy"] <= 1.0
    # every pruned round's masks are also trained by both controls at the same sparsity
    for control in ("reinit", "random_mask"):
        got = {(r["task"], r["round"]): r["sparsity"] for r in res["rows"] if r["init"] == control}
        assert got == {(r["task"], r["round"]): r["sparsity"] for r in tickets if r["round"] > 0}
    # the paper's direction: the winning ticket beats the same masks re-initialised
    claim = _claim(res, ["lenet300", "ticket vs reinit"])
    assert claim["mean_difference"] > 0.02, claim


def check_gradual_vs_oneshot_reaches_the_target_sparsity(out):
    res = _load(out)
    methods = {r["method"] for r in res["rows"]}
    assert {"gradual", "one-shot"} <= methods
    for r in res["rows"]:
        if r["method"] in ("gradual", "one-shot"):
            # measured from the final weights, so the schedule really ended at the target
            assert abs(r["measured_sparsity"] - r["target_sparsity"]) < 1e-3
            assert r["epochs"] == res["config"]["budget_epochs"]
    # the paper's direction: gradual pruning beats one-shot at high sparsity
    claim = _claim(res, ["gradual vs one-shot at 98%"])
    assert claim["mean_difference"] > 0.05, claim


def test_a_group_field_given_once_sets_every_group():
    _, module = experiments_cli.load("han2015")
    config = experiments_cli.resolve_config(module, overrides=["--config.epochs=5", "--config.seed=3"])
    assert (config.lenet300.epochs, config.lenet5.epochs, config.seed) == (5, 5, 3)
    assert config.lenet300.rounds == 6 and config.lenet5.rounds == 5  # other fields keep the paper's values
    config = experiments_cli.resolve_config(module, overrides=["--config.lenet5.epochs=2"])
    assert (config.lenet300.epochs, config.lenet5.epochs) == (30, 2)


def test_data_dir_option_sets_the_config_field(my_experiment, tmp_path, capsys):
    _, module = experiments_cli.load("han2015")
    assert module.get_config().data_dir == ""  # TFDS's default directory
    config = experiments_cli.resolve_config(module, data="tfds:mnist", data_dir=str(tmp_path))
    assert (config.data, config.data_dir) == ("tfds:mnist", str(tmp_path))
    assert cli.main(["run", str(my_experiment), "--data-dir", str(tmp_path / "tfds"), "--out", str(tmp_path / "o")]) == 0
    assert _load(tmp_path / "o")["config"]["data_dir"] == str(tmp_path / "tfds")
    # a config without the field says so instead of ignoring the option
    bare = tmp_path / "bare.py"
    bare.write_text("import ml_collections\n\ndef get_config(variant='paper'):\n"
                    "    return ml_collections.ConfigDict({'quick': False, 'data': 'digits', 'seed': 0})\n\n"
                    "def run(config, workdir):\n    return {}\n")  # fmt: skip
    assert cli.main(["run", str(bare), "--data-dir", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "has no data_dir field" in capsys.readouterr().err


def check_hinton2015_distilled_student_beats_the_student_alone(out):
    res = _load(out)
    gap = _claim(res, ["the gap"])
    assert gap["mean_difference"] < -10, gap  # the teacher is well ahead of the student alone, on validation
    for which in ("paper's T", "tuned on validation"):
        claim = _claim(res, [which])
        assert claim["metric"] == "test_errors" and claim["mean_difference"] < -5, claim  # fewer test errors
    tuned = next(r for r in res["rows"] if r["setting"] == "T and alpha chosen on validation")
    swept = [r for r in res["rows"] if r["setting"].startswith("T=")]
    assert tuned["val_errors"] == min(r["val_errors"] for r in swept)  # chosen on validation, not test


def check_deep_compression_is_small_and_close_to_dense(out):
    res = _load(out)
    rows = {r["stage"]: r for r in res["rows"]}
    final, dense = rows["final file (read back)"], rows["dense (float32)"]
    assert final["ratio"] >= 30.0, final
    assert final["accuracy"] > dense["accuracy"] - 0.03, (final, dense)
    assert "dense, trained as long (control)" in rows
    settings = {d["setting"] for d in res["deviations"]}
    assert {"fc1 kept, LeNet-300-100", "fc1 kept, LeNet-5"} <= settings  # disclosed for both models


def check_technique_sweep_int8_keeps_accuracy_and_deep_compression_is_smallest(out):
    res = _load(out)
    rows = {r["technique"]: r for r in res["rows"]}
    dense = next(r for r in res["rows"] if r["family"] == "dense")
    int8 = next(r for name, r in rows.items() if "int8" in name and "prune" not in name)
    assert abs(int8["accuracy"] - dense["accuracy"]) <= 0.01 and int8["ratio"] > 3.5
    smallest = min(res["rows"], key=lambda r: r["bytes"])
    assert "Huffman" in smallest["technique"] and smallest["ratio"] > 20
    assert smallest["accuracy"] > dense["accuracy"] - 0.03
    assert len(res["comparisons"]) == 3


def check_oneshot_minilm_sparsegpt_beats_magnitude_and_gptq_beats_rtn(out):
    res = _load(out)
    # one layer compressed: the embeddings move little, but the order is the papers' at every seed
    # (seeds 0-2: +0.013-0.014 and +0.005-0.009 of cosine similarity)
    assert _claim(res, ["sparsegpt vs magnitude at 50%"])["mean_difference"] > 0.005
    assert _claim(res, ["gptq vs rtn at 3-bit"])["mean_difference"] > 0.003
    error = {(r["setting"], r["method"]): r["layer_error"] for r in res["rows"]}
    assert error[("50%", "sparsegpt")] < 0.5 * error[("50%", "magnitude")]  # 0.012 vs 0.042
    assert error[("3-bit", "gptq")] < 0.5 * error[("3-bit", "rtn")]  # 0.010 vs 0.044


def check_oneshot_llm_reproduces_the_papers_ordering(out):
    quick = _load(out / "seed-0")  # the run's own file, beside the summary
    rows = {(r["method"], r["setting"]): r for r in quick["rows"]}
    dense = rows["dense", "float32"]["test_ppl"]
    assert set(rows) == {("dense", "float32"), ("smoothquant", "W8A8")} | oneshot_llm.QUICK
    # measured with seeds 0, 1, 2 (quick: 2 layers, hidden 64, dense test ppl 109-123): SparseGPT below
    # magnitude at 50% by 5.4 / 8.5 / 7.6 ppl, GPTQ below RTN at 3 bits by 3.2 / 1.8 / 4.7 ppl, SmoothQuant
    # W8A8 within 0.06% of dense; block errors in the same order in every seed
    assert rows["sparsegpt", "50%"]["test_ppl"] < rows["magnitude", "50%"]["test_ppl"] - 2.0
    assert rows["gptq", "3-bit"]["test_ppl"] < rows["rtn", "3-bit"]["test_ppl"] - 0.8
    assert abs(rows["smoothquant", "W8A8"]["ratio_to_dense"] - 1) < 0.005
    for r in quick["rows"]:
        assert r["ratio_to_dense"] == pytest.approx(r["test_ppl"] / dense)
        assert r["method"] == "dense" or r["test_ppl"] > dense * 0.995  # compression does not help
    # the one-shot solvers fit their calibration inputs better than the data-free baselines
    assert rows["sparsegpt", "50%"]["block_error"] < rows["magnitude", "50%"]["block_error"]
    assert rows["gptq", "3-bit"]["block_error"] < rows["rtn", "3-bit"]["block_error"]


def check_oneshot_llm_chooses_on_validation_and_records_deviations(out):
    quick = _load(out / "seed-0")
    (sq,) = [r for r in quick["rows"] if r["method"] == "smoothquant"]
    by_alpha = quick["smoothquant_validation"]
    assert sq["val_ppl"] == min(by_alpha.values()) and by_alpha[f"{sq['alpha']:g}"] == sq["val_ppl"]
    assert {"model", "evaluation text", "calibration set", "SmoothQuant alpha"} <= {
        d["setting"] for d in quick["deviations"]
    }
    names = [c["name"] for c in quick["comparisons"]]
    assert names == ["sparsegpt - magnitude at 50%", "gptq - rtn at 3-bit", "smoothquant W8A8 - dense"]
    tokens = quick["tokens"]
    assert min(tokens.values()) > 1000 and tokens["train"] > tokens["validation"] + tokens["test"]


# each experiment's checks, run on its quick run by test_quick_run_writes_results_and_shows_the_papers_direction
CHECKS = {
    "han2015": [check_han2015_reported_counts_match_the_masks],
    "lottery_ticket": [check_lottery_ticket_sparsity_follows_the_schedule],
    "gradual_vs_oneshot": [check_gradual_vs_oneshot_reaches_the_target_sparsity],
    "hinton2015": [check_hinton2015_distilled_student_beats_the_student_alone],
    "deep_compression": [check_deep_compression_is_small_and_close_to_dense],
    "technique_sweep": [check_technique_sweep_int8_keeps_accuracy_and_deep_compression_is_smallest],
    "oneshot_minilm": [check_oneshot_minilm_sparsegpt_beats_magnitude_and_gptq_beats_rtn],
    "oneshot_llm": [
        check_oneshot_llm_reproduces_the_papers_ordering,
        check_oneshot_llm_chooses_on_validation_and_records_deviations,
    ],
}


# ----------------------------------------------------------------- seeds and paired comparisons

SEEDED = textwrap.dedent(
    """
    import os
    from pathlib import Path

    from experiments import common, oneshot_llm


    def get_config(variant="paper"):
        return common.base_config(variant, data="digits")


    def run(config, workdir):
        if str(config.seed) == os.environ.get("SEEDED_KILL_AT"):
            raise RuntimeError("killed")
        Path(workdir).mkdir(parents=True, exist_ok=True)
        with open(Path(workdir).parent / "runs.log", "a") as f:
            f.write(f"{config.seed}\\n")
        fig, ax = common.figure()
        rows = [{"method": "new", "accuracy": 0.90 + 0.01 * config.seed, "n": 3},
                {"method": "old", "accuracy": 0.80 + 0.02 * (config.seed % 2), "n": 3}]
        claims = [common.comparison("new vs old", metric="accuracy", a={"method": "new"}, b={"method": "old"})]
        deviations = [common.deviation("data", paper="MNIST", ours="digits", reason="offline")]
        return common.write_results(workdir, rows, figure=fig, name="seeded", comparisons=claims,
                                    deviations=deviations, config=config)
    """
)


def test_seeds_run_each_seed_and_summarize_with_paired_verdicts(tmp_path, capsys, monkeypatch):
    path = tmp_path / "seeded.py"
    path.write_text(SEEDED)
    out = tmp_path / "out"
    argv = ["run", str(path), "--seeds", "3", "--config.seed=5", "--out", str(out)]
    monkeypatch.setenv("SEEDED_KILL_AT", "6")
    assert cli.main(argv) == 2  # killed at the second seed
    assert (out / "seed-5" / "results.json").exists() and not (out / "seed-6" / "results.json").exists()
    monkeypatch.delenv("SEEDED_KILL_AT")
    assert cli.main(argv) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["seed-5", "seed-6", "seed-7"]
    res = _load(out)
    assert res["seeds"] == [5, 6, 7]
    assert [(r["seed"], r["method"]) for r in res["rows"]][:2] == [(5, "new"), (5, "old")]
    new = next(r for r in res["summary"] if r["method"] == "new")
    assert new["seeds"] == 3 and math.isclose(new["accuracy"], 0.96) and math.isclose(new["accuracy_std"], 0.01)
    assert new["n"] == 3 and new["n_std"] == 0
    (claim,) = res["comparisons"]
    diffs = [0.95 - 0.82, 0.96 - 0.80, 0.97 - 0.82]
    assert np.allclose(claim["differences"], diffs)
    assert math.isclose(claim["mean_difference"], np.mean(diffs))
    assert math.isclose(claim["std_difference"], np.std(diffs, ddof=1))
    assert math.isclose(claim["stderr_difference"], np.std(diffs, ddof=1) / math.sqrt(3))
    assert claim["verdict"] == "real" and claim["better"] == "a"
    assert res["deviations"] == [{"setting": "data", "paper": "MNIST", "ours": "digits", "reason": "offline"}]
    md = (out / "results.md").read_text()
    assert "0.96 ± 0.01" in md and "Deviations from the paper" in md and "| new vs old |" in md
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    # seed 5 ran once (before the kill), then 6 and 7: a rerun skips finished seeds
    assert (out / "runs.log").read_text().split() == ["5", "6", "7"]
    assert cli.main(argv) == 0  # everything finished: nothing runs again
    assert (out / "runs.log").read_text().split() == ["5", "6", "7"]
    assert "new vs old: accuracy a - b = +0.1467 (std 0.0153, stderr 0.00882): real" in capsys.readouterr().out


def test_compare_verdicts_and_errors():
    claim = common.comparison("x", metric="m", a={"k": "a"}, b={"k": "b"})
    rows = lambda da, db: [{"k": "a", "m": da}, {"k": "b", "m": db}]
    noisy = experiments_cli.compare({0: rows(1.0, 0.0), 1: rows(0.0, 1.0), 2: rows(0.6, 0.5)}, claim)
    assert noisy["verdict"] == "within noise"
    one = experiments_cli.compare({0: rows(1.0, 0.0)}, claim)
    assert one["verdict"] == "one seed, no verdict" and one["std_difference"] is None
    lower = common.comparison("err", metric="m", a={"k": "a"}, b={"k": "b"}, higher_is_better=False)
    assert experiments_cli.compare({0: rows(0.1, 0.2), 1: rows(0.1, 0.21)}, lower)["better"] == "a"
    same_row = common.comparison("cols", metric="m", a={"k": "a"}, b={"k": "a"}, b_metric="n")
    assert experiments_cli.compare({0: [{"k": "a", "m": 3.0, "n": 1.0}]}, same_row)["mean_difference"] == 2.0
    with pytest.raises(ValueError, match=r"comparison 'x': \{'k': 'b'\} matches 0 rows of seed 0"):
        experiments_cli.compare({0: [{"k": "a", "m": 1.0}]}, claim)
    with pytest.raises(ValueError, match="non-empty"):
        common.deviation("", paper=1, ours=2, reason="")
    with pytest.raises(ValueError, match="--seeds|seeds=0"):
        experiments_cli.run_experiment("han2015", seeds=0)


def test_summary_of_values_that_differ_between_seeds_lists_them():
    """A column numeric at one seed and missing or text at another (e.g. a speedup reported
    only where it exceeds the spread) is kept per seed, and the formatted table shows each."""
    from jcompress.experiments_cli import _summary_table, summarize

    rows = [{"m": "a", "speedup": 1.5, "seed": 0}, {"m": "a", "speedup": None, "seed": 1}, {"m": "a", "speedup": 2.25, "seed": 2}]
    summary = summarize(rows, ["m"])
    assert summary[0]["speedup"] == [1.5, None, 2.25] and summary[0]["seeds"] == 3
    table = _summary_table(summary, ["m", "speedup"], ["m"], {"speedup": "{:.1f}x"})
    assert "| a | 1.5x / - / 2.2x |" in table
