"""A training run killed with SIGKILL in the middle of a checkpoint save resumes from the
last good checkpoint and ends with exactly the params of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import textwrap

import chex
import numpy as np

from jcompress import data

CHILD = textwrap.dedent(
    """
    import os, sys, signal, threading, time, pathlib
    import numpy as np, optax
    from jcompress import data, models, train

    out = pathlib.Path(sys.argv[1])
    kill_at_save = int(sys.argv[2])  # 0: never
    with np.load(sys.argv[3]) as z:  # data.load("digits"), saved by the test: no sklearn import per process
        ds = data.Dataset("digits", *(z[f] for f in data.Dataset._fields[1:-1]), int(z["num_classes"]))
    config = dict(name="mlp", input_shape=list(ds.input_shape), num_classes=10, widths=[24], dropout=0.1)
    fn = models.functional(models.create(**config))

    if kill_at_save:
        # SIGKILL ourselves as soon as orbax has created the temporary directory of the
        # kill_at_save-th save, i.e. while that checkpoint is being written.
        def watch():
            seen = 0
            while True:
                ck = out / "ckpt"
                tmp = [p for p in ck.iterdir() if "tmp" in p.name] if ck.exists() else []
                if tmp:
                    seen_steps = {p.name.split(".")[0] for p in tmp}
                    if len(seen_steps) and int(min(seen_steps)) >= kill_at_save * 22:
                        os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(0.0005)
        threading.Thread(target=watch, daemon=True).start()

    res = train.fit(fn.apply, fn.params, fn.extra, ds, tx=optax.adam(3e-3), epochs=5, batch_size=64,
                    out_dir=out, meta={"model": config}, progress=False)
    np.savez(out / "final.npz", **{k: np.asarray(v) for k, v in
             __import__("jcompress").tree.named_leaves(res.params)})
    """
)


def _run(out, kill_at_save, digits):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(out), str(kill_at_save), str(digits)], check=False, env=env,
        timeout=300, capture_output=True, text=True,
    )  # fmt: skip


def test_sigkill_during_save_then_resume_is_exact(tmp_path):
    ds = data.load("digits")
    digits = tmp_path / "digits.npz"
    np.savez(digits, **{f: getattr(ds, f) for f in data.Dataset._fields[1:]})
    ref = _run(tmp_path / "ref", 0, digits)
    assert ref.returncode == 0, ref.stderr[-2000:]

    crashed = _run(tmp_path / "run", 3, digits)  # killed while writing the 3rd epoch's checkpoint
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert not (tmp_path / "run" / "final.npz").exists()
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "ckpt").iterdir() if p.name.isdigit())
    assert steps and max(steps) < 3 * 22  # the interrupted save did not become a checkpoint

    resumed = _run(tmp_path / "run", 0, digits)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = dict(np.load(tmp_path / "ref" / "final.npz"))
    b = dict(np.load(tmp_path / "run" / "final.npz"))
    chex.assert_trees_all_equal(a, b)
