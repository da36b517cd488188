"""Bad input on the command line: one line naming the argument or path, exit status 2, no traceback.

Every number of every subcommand is checked by an argparse type before anything is
loaded; library errors a user can fix come out as ``jcompress CMD: error: ...``; a run
directory whose saved settings differ from the command line is not resumed silently.
"""

import json
import shutil
import subprocess
import sys

import pytest

from jcompress import checkpoint, cli

TRAIN = ["train", "--model", "mlp", "--widths", "8", "--data", "digits"]

BAD_NUMBERS = [
    # argv before --out, the argument the message must name
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--epochs", "-3"], "--epochs"),
    (["train", "--epochs", "2.5"], "--epochs"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--dropout", "1.5"], "--dropout"),
    (["train", "--dropout", "1"], "--dropout"),
    (["train", "--dropout", "-0.1"], "--dropout"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--lr", "inf"], "--lr"),
    (["train", "--lr", "0"], "--lr"),
    (["train", "--lr", "-1e-3"], "--lr"),
    (["train", "--widths", "0,5"], "--widths"),
    (["train", "--widths", "16,x"], "--widths"),
    (["train", "--seed", "-1"], "--seed"),
    (["distill", "--teacher", "t", "--epochs", "0"], "--epochs"),
    (["distill", "--teacher", "t", "--batch-size", "-8"], "--batch-size"),
    (["distill", "--teacher", "t", "--temperature", "0"], "--temperature"),
    (["distill", "--teacher", "t", "--temperature", "inf"], "--temperature"),
    (["distill", "--teacher", "t", "--alpha", "1.5"], "--alpha"),
    (["distill", "--teacher", "t", "--lr", "nan"], "--lr"),
    (["distill", "--teacher", "t", "--seed", "-2"], "--seed"),
    (["demo", "--epochs", "0"], "--epochs"),
    (["advise", "--model", "m", "--data", "digits", "--max-bytes", "-1"], "--max-bytes"),
    (["advise", "--model", "m", "--data", "digits", "--max-accuracy-drop", "2"], "--max-accuracy-drop"),
    (["advise", "--model", "m", "--data", "digits", "--max-latency-ms", "nan"], "--max-latency-ms"),
    (["advise", "--model", "m", "--data", "digits", "--epochs", "-1"], "--epochs"),
    (["advise", "--model", "m", "--data", "digits", "--distill-epochs", "0"], "--distill-epochs"),
]


def _one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"jcompress {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv, arg", BAD_NUMBERS, ids=[" ".join([a[0], *a[-2:]]) for a, _ in BAD_NUMBERS])
def test_bad_number_exits_2_naming_the_argument(argv, arg, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    line = _one_error_line(capsys.readouterr().err, argv[0])
    assert f"argument {arg}:" in line
    assert not (tmp_path / "run").exists()  # nothing was written


def test_boundary_values_are_accepted():
    args = cli.build_parser().parse_args(
        [*TRAIN, "--epochs", "1", "--batch-size", "1", "--dropout", "0", "--lr", "1e-9", "--seed", "0", "--out", "o"]
    )
    assert (args.epochs, args.batch_size, args.dropout, args.lr, args.seed) == (1, 1, 0.0, 1e-9, 0)
    args = cli.build_parser().parse_args(["distill", "--teacher", "t", "--alpha", "1", "--out", "o"])
    assert args.alpha == 1.0
    args = cli.build_parser().parse_args(["advise", "--model", "m", "--data", "d", "--epochs", "0"])
    assert args.epochs == 0


@pytest.mark.parametrize(
    "argv",
    [["train"], ["demo"], ["distill", "--teacher", "t"], ["advise", "--model", "m", "--data", "digits"], ["run", "x"]],
    ids=lambda a: a[0],
)
def test_existing_file_as_out_dir(argv, tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("keep me")
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--out", str(f)])
    assert e.value.code == 2
    line = _one_error_line(capsys.readouterr().err, argv[0])
    assert "argument --out:" in line and str(f) in line and "not a directory" in line
    assert f.read_text() == "keep me"


def test_unknown_argument_names_the_command(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--bogus", "3", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "unrecognized arguments: --bogus 3" in _one_error_line(capsys.readouterr().err, "train")


def test_missing_teacher_and_unknown_dataset(tmp_path, capsys):
    assert cli.main(["distill", "--teacher", str(tmp_path / "nope"), "--out", str(tmp_path / "s")]) == 2
    line = _one_error_line(capsys.readouterr().err, "distill")
    assert f"--teacher {tmp_path / 'nope'}: no such checkpoint directory" in line
    assert cli.main(["train", "--data", "imagenet", "--out", str(tmp_path / "r")]) == 2
    assert "unknown dataset 'imagenet'" in _one_error_line(capsys.readouterr().err, "train")


def test_library_errors_are_one_line_and_verbose_shows_the_traceback(tmp_path, capsys):
    empty = tmp_path / "empty_ckpt"
    empty.mkdir()
    argv = ["distill", "--teacher", str(empty), "--data", "digits", "--out", str(tmp_path / "s")]
    assert cli.main(argv) == 2
    assert "no checkpoint in this directory" in _one_error_line(capsys.readouterr().err, "distill")
    assert cli.main(["--verbose", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "FileNotFoundError" in err
    assert cli.main([*argv, "--verbose"]) == 2  # also accepted after the subcommand
    assert "Traceback" in capsys.readouterr().err


def test_long_messages_are_cut(tmp_path, capsys, monkeypatch):
    from jcompress import data

    def load(name, data_dir=None):
        raise ValueError("first line naming --data\n" + "internal detail " * 200)

    monkeypatch.setattr(data, "load", load)
    assert cli.main([*TRAIN, "--out", str(tmp_path / "r")]) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    assert line.startswith("jcompress train: error: first line naming --data internal detail")
    assert line.endswith("(--verbose for the full message)") and len(line) < 500


def test_library_refuses_zero_epochs_and_batch_size():
    import jax.numpy as jnp
    import optax

    from jcompress import data, train

    ds = data.load("digits")
    apply = lambda p, e, x, train, key=None: (x.reshape(len(x), -1) @ p["w"], e)
    params = {"w": jnp.zeros((64, 10))}
    with pytest.raises(ValueError, match=r"epochs=0 must be in \[1, inf\]"):
        train.fit(apply, params, {}, ds, tx=optax.sgd(0.1), epochs=0, progress=False)
    with pytest.raises(ValueError, match=r"batch_size=0 must be in \[1, inf\]"):
        train.fit(apply, params, {}, ds, tx=optax.sgd(0.1), epochs=1, batch_size=0, progress=False)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A one-epoch ``jcompress train`` run directory (lr 1e-3, seed 0)."""
    out = tmp_path_factory.mktemp("run") / "r"
    assert cli.main([*TRAIN, "--epochs", "1", "--out", str(out)]) == 0
    return out


def test_resume_with_other_settings_is_refused_then_overridden(trained_run, tmp_path, capsys):
    out = tmp_path / "r"
    shutil.copytree(trained_run, out)
    changed = [*TRAIN, "--epochs", "2", "--lr", "0.01", "--seed", "3", "--out", str(out)]
    assert cli.main(changed) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    assert "lr: saved 0.001, given 0.01; seed: saved 0, given 3" in line and "--override" in line
    assert checkpoint.latest_step(out / "ckpt") == 10  # untouched: one epoch, 1295 // 128 full batches

    assert cli.main([*changed, "--override"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # resumed, not restarted
    ck = checkpoint.Checkpointer(out / "ckpt")
    meta = ck.read_meta()
    ck.close()
    assert meta["settings"]["lr"] == 0.01 and meta["settings"]["seed"] == 3
    assert meta["overrides"] == [
        {"epoch": 1, "changed": {"lr": {"saved": 0.001, "given": 0.01}, "seed": {"saved": 0, "given": 3}}}
    ]
    # the same (new) settings now resume without --override
    assert cli.main([*TRAIN, "--epochs", "2", "--lr", "0.01", "--seed", "3", "--out", str(out)]) == 0
    logged = [json.loads(line) for line in (out / "overrides.jsonl").read_text().splitlines()]
    assert logged == meta["overrides"]


def test_override_of_a_finished_run_is_recorded(trained_run, tmp_path):
    """All epochs done: --override trains nothing and saves no checkpoint, but the change is logged."""
    out = tmp_path / "r"
    shutil.copytree(trained_run, out)
    assert cli.main([*TRAIN, "--epochs", "1", "--lr", "0.02", "--out", str(out), "--override"]) == 0
    assert checkpoint.latest_step(out / "ckpt") == 10  # nothing trained
    logged = [json.loads(line) for line in (out / "overrides.jsonl").read_text().splitlines()]
    assert logged == [{"epoch": 1, "changed": {"lr": {"saved": 0.001, "given": 0.02}}}]


def test_resume_into_a_run_of_another_kind_or_with_corrupt_metadata(trained_run, tmp_path, capsys):
    out = tmp_path / "r"
    shutil.copytree(trained_run, out)
    argv = ["distill", "--teacher", str(out / "ckpt"), "--data", "digits", "--out", str(out), "--override"]
    assert cli.main(argv) == 2
    assert "holds a 'jcompress train' run, not a distill run" in _one_error_line(capsys.readouterr().err, "distill")

    meta_file = out / "ckpt" / "10" / "meta" / "metadata"
    meta_file.write_text(meta_file.read_text()[:30])
    assert cli.main([*TRAIN, "--epochs", "2", "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    assert f"{out / 'ckpt' / '10' / 'meta'}" in line and "truncated or corrupt" in line


def test_teacher_that_does_not_fit_the_data(trained_run, tmp_path, capsys, monkeypatch):
    import numpy as np

    from jcompress import data

    x, y = np.zeros((4, 28, 28, 1), np.float32), np.zeros(4, np.int32)
    monkeypatch.setattr(data, "load", lambda name, data_dir=None: data.Dataset(name, x, y, x, y, x, y, 10))
    argv = ["distill", "--teacher", str(trained_run / "ckpt"), "--data", "other", "--out", str(tmp_path / "s")]
    assert cli.main(argv) == 2
    line = _one_error_line(capsys.readouterr().err, "distill")
    assert "takes inputs (8, 8, 1) with 10 classes, but --data other has (28, 28, 1)" in line


def test_module_entry_point_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jcompress", "train", "--epochs", "0", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "jcompress train: error: argument --epochs: expected an integer >= 1, got '0'"
