"""The main job (``jcompress demo``): every stage evaluated on validation and test, real file sizes,
choices made on validation, and bad settings refused by name."""

import json

import pytest

from jcompress import cli, demo

STAGES = [
    "dense (float32)",
    "pruned",
    "pruned + fine-tuned",
    "clustered (fixed-width)",
    "centroids fine-tuned (fixed)",
    "huffman (file read back)",
]

# A shorter run of the same pipeline (same sparsity and bits): the test checks the report's
# structure and invariants; the full recipe's accuracy is measured in README's demo section.
QUICK = demo.RECIPE._replace(dense_epochs=4, prune_epochs=2, finetune_epochs=2, centroid_epochs=1)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, demo.run(out, seed=0, recipe=QUICK, log=lambda line: None)


def test_every_stage_has_validation_and_test_accuracy_and_a_real_file(quick):
    out, report = quick
    assert report == json.loads((out / "report.json").read_text())
    rows = report["rows"]
    assert [r["stage"] for r in rows] == STAGES
    for r in rows:
        assert 0.5 < r["val_accuracy"] <= 1 and 0.5 < r["test_accuracy"] <= 1, r
        assert r["bytes"] == (out / "files" / r["file"]).stat().st_size  # bytes of a file on disk
        assert r["ratio"] == round(rows[0]["bytes"] / r["bytes"], 2)
    n = rows[0]["nonzeros"]
    assert n == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    # exactly round(s * size) weights pruned in each kernel; biases kept
    kept = sum(round((1 - s) * size) for (_, s), size in zip(QUICK.sparsity, (784 * 300, 300 * 100, 100 * 10)))
    assert {r["nonzeros"] for r in rows[1:]} == {kept + 410}
    final = rows[-1]
    assert final["ratio"] >= 40  # the recipe's sparsity and bits give >= 40x, also after this short training
    assert final["bits_per_weight"] < 32 / 40
    # the file read back is the model that was written: same accuracy as the stage before it
    assert (final["val_accuracy"], final["test_accuracy"]) == (rows[-2]["val_accuracy"], rows[-2]["test_accuracy"])


def test_choices_are_made_on_validation(quick):
    _, report = quick
    choices = {c["what"]: c for c in report["choices"]}
    assert set(choices) == {"fine-tuning epochs", "centroid fine-tuning epochs"}
    for c, most, row in (
        (choices["fine-tuning epochs"], QUICK.finetune_epochs, report["rows"][2]),
        (choices["centroid fine-tuning epochs"], QUICK.centroid_epochs, report["rows"][4]),
    ):
        assert [k["epochs"] for k in c["candidates"]] == list(range(most + 1))
        best = max(c["candidates"], key=lambda k: (k["val_accuracy"], -k["val_loss"]))
        assert c["chosen"] == best["epochs"]
        assert row["val_accuracy"] == round(best["val_accuracy"], 4)  # the stage is the chosen candidate
        assert all("test" not in key for k in c["candidates"] for key in k)  # test never scored a candidate
    assert report["recipe"]["sparsity"] == dict(QUICK.sparsity)
    assert report["compiles"]["count"] > 0


@pytest.mark.parametrize(
    "change, arg",
    [
        ({"dense_epochs": 0}, "recipe.dense_epochs"),
        ({"finetune_lr": float("nan")}, "recipe.finetune_lr"),
        ({"bits": 0}, "recipe.bits"),
        ({"sparsity": (("fc1/kernel", 0.9),)}, "recipe.sparsity"),
        ({"sparsity": (("fc1/kernel", 1.0), ("fc2/kernel", 0.9), ("fc3/kernel", 0.7))}, "recipe.sparsity"),
    ],
)
def test_bad_recipe_is_refused_naming_the_field(change, arg, tmp_path):
    with pytest.raises((ValueError, TypeError), match=arg.replace(".", r"\.")):
        demo.run(tmp_path, recipe=demo.RECIPE._replace(**change), log=lambda line: None)
    assert not (tmp_path / "report.json").exists()


def test_demo_command_prints_the_table_and_writes_the_report(quick, tmp_path, capsys, monkeypatch):
    calls = []

    def run(out, *, seed, recipe, log):  # the pipeline ran once in the fixture; here the command's wiring
        calls.append((seed, recipe))
        return quick[1]

    monkeypatch.setattr(demo, "run", run)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--epochs", "3", "--seed", "1"]) == 0
    assert calls == [(1, demo.RECIPE._replace(dense_epochs=3))]
    printed = capsys.readouterr().out
    for stage in STAGES:
        assert stage in printed
    assert "val acc" in printed and "test acc" in printed
    assert (out / "report.png").stat().st_size > 10_000


def test_demo_refuses_a_negative_seed(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--seed", "-1", "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    assert "argument --seed:" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
