"""The command line: train, the subcommand package, and clear errors (the demo: test_demo.py)."""

import json
import subprocess
import sys

import pytest

from jcompress import checkpoint, cli


def test_train_then_resume_via_cli(tmp_path, capsys):
    args = ["train", "--model", "mlp", "--widths", "16", "--data", "digits", "--epochs", "1", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    # a checkpoint written before evaluation moved to validation (history keys test_*) still resumes
    meta_file = tmp_path / "ckpt" / "10" / "meta" / "metadata"
    meta_file.write_text(meta_file.read_text().replace('"val_', '"test_'))
    assert cli.main(args[:-4] + ["--epochs", "2", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # the second call resumed, it did not restart
    assert all("val_accuracy" in r and not any(k.startswith("test_") for k in r) for r in rows)
    ck = checkpoint.Checkpointer(tmp_path / "ckpt")
    history = ck.read_meta()["history"]
    ck.close()
    assert "test_accuracy" in history[0] and "val_accuracy" in history[1]  # the old row is kept as it was
    final = json.loads((tmp_path / "final.json").read_text())  # test measured once, after the last epoch
    assert final["epochs"] == 2 and final["val_accuracy"] == rows[-1]["val_accuracy"]
    assert 0.0 < final["test_accuracy"] <= 1.0 and final["test_examples"] == 359
    assert f"test accuracy {final['test_accuracy']:.4f}" in capsys.readouterr().out


def test_diverging_learning_rate_exits_2_naming_the_epoch(tmp_path, capsys):
    argv = ["train", "--model", "mlp", "--widths", "16", "--data", "digits", "--lr", "1e30", "--out", str(tmp_path)]
    assert cli.main([*argv, "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar: one line
    assert err.split("\r")[-1].startswith("jcompress train: error: --lr 1e+30: epoch 1: training diverged")
    assert "nothing was checkpointed" in err and not (tmp_path / "metrics.jsonl").exists()


def test_bad_input_exits_2_with_message(tmp_path, capsys):
    assert cli.main(["train", "--data", "imagenet", "--out", str(tmp_path)]) == 2
    assert "unknown dataset 'imagenet'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--widths", "a,b", "--out", str(tmp_path)])


def test_every_subcommand_is_registered_explicitly():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {"train", "demo", "bench", "distill", "run", "advise", "oneshot"}
    assert [m.__name__ for m in cli.COMMANDS] == [
        f"jcompress.cli.{n}" for n in ("train", "demo", "distill", "run", "advise", "oneshot")
    ]


def test_cli_imports_no_library_until_a_command_runs():
    """``jcompress --help`` stays fast: the subcommand modules import jax, flax and orbax only when run."""
    code = "import sys, jcompress.cli; print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'flax', 'orbax'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
    help_text = subprocess.run(
        [sys.executable, "-m", "jcompress.cli", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "--config.FIELD=VALUE" in help_text


@pytest.mark.parametrize("text", ["a,b", "0", "8,-1", ""])
def test_widths_must_be_positive_integers(text, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["distill", "--teacher", "t", "--widths", text, "--out", "o"])
    assert e.value.code == 2 and "--widths" in capsys.readouterr().err
